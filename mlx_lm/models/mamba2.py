"""Mamba-2 (transformers' `Mamba2ForCausalLM`, model_type "mamba2"): a pure state-space model.

Each block is `h + mixer(RMSNorm(h))`; the mixer (matched to transformers' torch path):
- `in_proj` gives, per token, the gate z (d_inner), the conv input xBC (d_inner + 2 *
  n_groups * state_size) and one dt per head;
- xBC goes through a causal depthwise conv (kernel `conv_kernel`, with bias) and SiLU, then
  splits into x (num_heads x head_dim), B and C (n_groups x state_size; head h reads group
  h // (num_heads / n_groups));
- the selective scan, per head: dt = clamp(softplus(dt + dt_bias), time_step_limit),
  S_t = exp(dt * A) S_{t-1} + dt x_t B_t^T, y_t = S_t C_t + D x_t, with A = -exp(A_log);
- gated RMSNorm: RMSNorm(y * silu(z)) over each of the n_groups slices of d_inner, then
  `out_proj`.

The recurrent state lives in a `MambaCache` per layer: [conv state (the last
conv_kernel - 1 conv inputs), SSM state [B, num_heads, head_dim, state_size]]. Prompts are
scanned in chunks of `chunk_size` tokens (state-space duality: a masked, decayed C.B
"attention" inside a chunk and the recurrence across chunks), so cost is linear in length.
Left-padded batches (`ArraysCache.left_padding`) are not supported.
"""

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs
from .cache import MambaCache


def _as_float(x) -> float:
    """transformers writes infinity in config.json as {"__float__": "Infinity"}."""
    if isinstance(x, dict) and "__float__" in x:
        return float(x["__float__"])
    return float(x)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_heads: int
    head_dim: int
    state_size: int
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    layer_norm_epsilon: float = 1e-5
    time_step_limit: Tuple[float, float] = (0.0, math.inf)
    chunk_size: int = 256
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.time_step_limit = tuple(_as_float(x) for x in self.time_step_limit)
        if self.hidden_size * self.expand != self.num_heads * self.head_dim:
            raise ValueError(
                f"hidden_size * expand ({self.hidden_size * self.expand}) must equal "
                f"num_heads * head_dim ({self.num_heads * self.head_dim}) in a mamba2 config."
            )
        if self.num_heads % self.n_groups != 0:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})."
            )
        if self.hidden_act != "silu":
            raise ValueError(f"mamba2 supports hidden_act 'silu' only, got {self.hidden_act!r}.")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}.")


def causal_conv(x: mx.array, weight: mx.array, bias: Optional[mx.array], cache, idx: int = 0):
    """Depthwise causal conv over time of x [B, L, C] with weight [C, K, 1], continuing from
    the cached last K - 1 inputs (zeros for a fresh sequence); updates `cache[idx]`."""
    K = weight.shape[1]
    state = cache[idx] if cache is not None else None
    if state is None:
        state = mx.zeros((x.shape[0], K - 1, x.shape[-1]), dtype=x.dtype)
    padded = mx.concatenate([state, x], axis=1)
    if cache is not None:
        cache[idx] = padded[:, padded.shape[1] - (K - 1) :]
    out = mx.conv1d(padded, weight, groups=x.shape[-1])
    return out + bias if bias is not None else out


def ssd_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    state: Optional[mx.array],
    chunk_size: int,
) -> Tuple[mx.array, mx.array]:
    """The selective scan S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t.

    x [b, T, h, p], dt [b, T, h] (already softplus'd), A [h] (negative), B and C
    [b, T, h, n] (already broadcast to heads), state [b, h, p, n] or None. Returns
    (y [b, T, h, p], final state). Works a chunk at a time: within a chunk the output is
    a decay-masked C.B "attention" over the chunk plus the decayed read of the incoming
    state; the state is carried across chunks.
    """
    b, T, h, p = x.shape
    n = B.shape[-1]
    if state is None:
        state = mx.zeros((b, h, p, n), dtype=mx.float32)
    ys = []
    for s in range(0, T, chunk_size):
        xc, dtc, Bc, Cc = (t[:, s : s + chunk_size] for t in (x, dt, B, C))
        L = xc.shape[1]
        cum = mx.cumsum(dtc * A, axis=1).transpose(0, 2, 1)  # [b, h, L] log decay from start
        # decay[t, s] = exp(cum_t - cum_s) for s <= t; mask before exp so nothing overflows.
        seg = cum[..., :, None] - cum[..., None, :]
        causal = mx.tril(mx.ones((L, L), dtype=mx.bool_))
        decay = mx.exp(mx.where(causal, seg, -mx.inf))
        scores = (Cc.transpose(0, 2, 1, 3) @ Bc.transpose(0, 2, 3, 1)) * decay  # [b, h, L, L]
        scores = scores * dtc.transpose(0, 2, 1)[:, :, None, :]
        xh = xc.transpose(0, 2, 1, 3)  # [b, h, L, p]
        y = scores @ xh
        # The incoming state, decayed to each position: exp(cum_t) * S C_t.
        y = y + mx.exp(cum)[..., None] * (Cc.transpose(0, 2, 1, 3) @ state.swapaxes(-1, -2))
        ys.append(y.transpose(0, 2, 1, 3))
        # State at the chunk's end: old state decayed over the chunk plus every token's
        # write decayed from its position to the end.
        w = mx.exp(cum[..., -1:] - cum) * dtc.transpose(0, 2, 1)  # [b, h, L]
        state = mx.exp(cum[..., -1])[..., None, None] * state + (xh * w[..., None]).swapaxes(
            -1, -2
        ) @ Bc.transpose(0, 2, 1, 3)
    y = ys[0] if len(ys) == 1 else mx.concatenate(ys, axis=1)
    return y, state


class GroupedGatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) over each of `groups` equal slices of the last axis, times weight."""

    def __init__(self, dims: int, groups: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.groups = groups
        self.eps = eps

    def __call__(self, x: mx.array, z: mx.array) -> mx.array:
        x = x * nn.silu(z)
        shape = x.shape
        x = mx.fast.rms_norm(x.reshape(*shape[:-1], self.groups, -1), None, self.eps)
        return self.weight * x.reshape(shape)


class Mamba2Mixer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads = args.num_heads
        self.head_dim = args.head_dim
        self.state_size = args.state_size
        self.n_groups = args.n_groups
        self.d_inner = args.num_heads * args.head_dim
        self.chunk_size = args.chunk_size
        self.time_step_limit = args.time_step_limit
        self.conv_dim = self.d_inner + 2 * args.n_groups * args.state_size
        self.in_proj = nn.Linear(
            args.hidden_size, self.d_inner + self.conv_dim + args.num_heads, bias=args.use_bias
        )
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            args.conv_kernel,
            groups=self.conv_dim,
            bias=args.use_conv_bias,
        )
        self.dt_bias = mx.ones((args.num_heads,))
        self.A_log = mx.zeros((args.num_heads,))
        self.D = mx.ones((args.num_heads,))
        self.norm = GroupedGatedRMSNorm(self.d_inner, args.n_groups, args.layer_norm_epsilon)
        self.out_proj = nn.Linear(self.d_inner, args.hidden_size, bias=args.use_bias)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        b, L, _ = x.shape
        z, xBC, dt = mx.split(self.in_proj(x), [self.d_inner, self.d_inner + self.conv_dim], -1)
        xBC = nn.silu(
            causal_conv(xBC, self.conv1d.weight, getattr(self.conv1d, "bias", None), cache, 0)
        )
        gn = self.n_groups * self.state_size
        xs, B, C = mx.split(xBC, [self.d_inner, self.d_inner + gn], axis=-1)
        xs = xs.reshape(b, L, self.num_heads, self.head_dim)
        rep = self.num_heads // self.n_groups
        B = mx.repeat(B.reshape(b, L, self.n_groups, -1), rep, axis=2)
        C = mx.repeat(C.reshape(b, L, self.n_groups, -1), rep, axis=2)
        lo, hi = self.time_step_limit
        dt = mx.clip(nn.softplus(dt + self.dt_bias), lo, hi)
        A = -mx.exp(self.A_log.astype(mx.float32))
        state = cache[1] if cache is not None else None
        # The scan runs in float32 whatever the model dtype: exp of long decay sums.
        y, state = ssd_scan(
            xs.astype(mx.float32),
            dt.astype(mx.float32),
            A,
            B.astype(mx.float32),
            C.astype(mx.float32),
            state,
            self.chunk_size,
        )
        if cache is not None:
            cache[1] = state
        y = y + self.D.astype(mx.float32)[:, None] * xs
        y = self.norm(y.reshape(b, L, -1).astype(x.dtype), z)
        return self.out_proj(y)


class ResidualBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon)
        self.mixer = Mamba2Mixer(args)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        return x + self.mixer(self.norm(x), cache)


class Mamba2Backbone(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [ResidualBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm_f = nn.RMSNorm(args.hidden_size, eps=args.layer_norm_epsilon)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embeddings(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        for layer, c in zip(self.layers, cache):
            h = layer(h, c)
        return self.norm_f(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.backbone = Mamba2Backbone(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        out = self.backbone(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.backbone.embeddings.as_linear(out)
        return self.lm_head(out)

    def make_cache(self) -> List[Any]:
        return [MambaCache() for _ in self.layers]

    def sanitize(self, weights):
        out = {}
        for k, v in weights.items():
            # Older checkpoints name the embedding "embedding" (transformers renames it too).
            k = k.replace("backbone.embedding.", "backbone.embeddings.")
            # torch depthwise conv weight [C, 1, K] -> MLX [C, K, 1].
            if k.endswith("conv1d.weight") and v.ndim == 3 and v.shape[1] == 1:
                v = v.swapaxes(1, 2)
            out[k] = v
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    @property
    def layers(self):
        return self.backbone.layers
