"""Qwen3-Next (transformers' `Qwen3NextForCausalLM`, model_type "qwen3_next"): a hybrid of
gated DeltaNet linear-attention layers and gated full-attention layers, with MoE MLPs.

Matched to transformers' torch path:
- `layer_types` (or every `full_attention_interval`-th layer full attention) picks each
  layer's token mixer;
- full attention: `q_proj` gives queries and an output gate per head; RMSNorm over each
  query/key head; RoPE on the first `partial_rotary_factor` of the head; the attention
  output is multiplied by sigmoid(gate) before `o_proj`;
- gated DeltaNet: `in_proj_qkvz` (grouped per key head: q, k, the head's v and z slices)
  and `in_proj_ba`; a causal depthwise conv (no bias) + SiLU over [q, k, v]; q and k
  L2-normalised, q scaled by key_head_dim**-0.5; decay exp(-exp(A_log) * softplus(a +
  dt_bias)), write strength sigmoid(b); the gated delta rule
  S_t = g_t S_{t-1} + beta_t (v_t - g_t S_{t-1} k_t) k_t^T, o_t = S_t q_t;
  then RMSNorm(o) * weight * silu(z) per value head and `out_proj`;
- MLP: top-k softmax router (renormalised when `norm_topk_prob`) over SwiGLU experts plus
  a shared SwiGLU expert scaled by sigmoid(shared_expert_gate(x)); dense SwiGLU in
  `mlp_only_layers` or off the `decoder_sparse_step` grid;
- transformers' RMSNorms here scale by (1 + weight); `sanitize` adds the 1 once at load
  time (Hugging Face layout, detected by per-expert weights) so the model uses plain
  `nn.RMSNorm` - the layout upstream mlx-lm's converted checkpoints use.

Caches: `ArraysCache(2)` per linear-attention layer ([conv state, recurrent state
[B, Hv, Dv, Dk]]) and `KVCache` per full-attention layer. The recurrence uses
`mx.fast.gated_delta_update` where MLX has it, else a plain per-token loop.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from .cache import ArraysCache, KVCache
from .mamba2 import causal_conv
from .rope_utils import initialize_rope, split_rope_parameters
from .switch_layers import SwitchGLU

LINEAR, FULL = "linear_attention", "full_attention"
# Norms that transformers applies as (1 + weight); the gated DeltaNet norm is not one.
_SHIFTED_NORMS = (
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
    "q_norm.weight",
    "k_norm.weight",
)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    decoder_sparse_step: int = 1
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    num_experts_per_tok: int = 10
    num_experts: int = 512
    norm_topk_prob: bool = True
    mlp_only_layers: Optional[List[int]] = None
    layer_types: Optional[List[str]] = None
    full_attention_interval: int = 4
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    partial_rotary_factor: float = 0.25
    max_position_embeddings: Optional[int] = None
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.rope_parameters and "partial_rotary_factor" in self.rope_parameters:
            self.partial_rotary_factor = self.rope_parameters["partial_rotary_factor"]
        self.rope_theta, self.rope_scaling = split_rope_parameters(
            self.rope_parameters, self.rope_theta, self.rope_scaling
        )
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.layer_types is None:
            n = self.full_attention_interval
            self.layer_types = [
                FULL if (i + 1) % n == 0 else LINEAR for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers or not set(self.layer_types) <= {
            LINEAR,
            FULL,
        }:
            raise ValueError(
                f"layer_types must list '{LINEAR}' or '{FULL}' for each of the "
                f"{self.num_hidden_layers} layers, got {self.layer_types!r}."
            )
        if self.linear_num_value_heads % self.linear_num_key_heads != 0:
            raise ValueError(
                f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                f"linear_num_key_heads ({self.linear_num_key_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"qwen3_next supports hidden_act 'silu' only, got {self.hidden_act!r}."
            )

    def is_moe_layer(self, i: int) -> bool:
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )


def gated_delta_recurrence(q, k, v, g, beta, state=None):
    """The gated delta rule token by token, in plain MLX ops (reference and fallback).

    q, k [B, T, Hk, Dk]; v [B, T, Hv, Dv]; g (decay, linear space) and beta [B, T, Hv];
    state [B, Hv, Dv, Dk] or None. Each key head serves Hv / Hk consecutive value heads.
    Returns (o [B, T, Hv, Dv], final state)."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv != Hk:
        q, k = (mx.repeat(x, Hv // Hk, axis=2) for x in (q, k))
    if state is None:
        state = mx.zeros((B, Hv, Dv, Dk), dtype=mx.float32)
    outs = []
    for t in range(T):
        state = state * g[:, t, :, None, None]
        kt = k[:, t, :, None, :]  # [B, Hv, 1, Dk]
        delta = (v[:, t] - (state * kt).sum(-1)) * beta[:, t, :, None]
        state = state + delta[..., None] * kt
        outs.append((state * q[:, t, :, None, :]).sum(-1))
    return mx.stack(outs, axis=1), state


def gated_delta(q, k, v, g, beta, state=None):
    if hasattr(mx.fast, "gated_delta_update"):
        return mx.fast.gated_delta_update(q, k, v, g, beta, initial_state=state)
    return gated_delta_recurrence(q, k, v, g, beta, state)


def _l2norm(x: mx.array, eps: float = 1e-6) -> mx.array:
    # transformers (after FLA): x / sqrt(sum(x^2) + eps), not x / max(|x|, eps).
    return x * mx.rsqrt((x * x).sum(-1, keepdims=True) + eps)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x) * weight * silu(gate): norm before gate, plain weight."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps) * nn.silu(gate)


class GatedDeltaNet(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_k_heads = args.linear_num_key_heads
        self.num_v_heads = args.linear_num_value_heads
        self.head_k_dim = args.linear_key_head_dim
        self.head_v_dim = args.linear_value_head_dim
        self.key_dim = self.num_k_heads * self.head_k_dim
        self.value_dim = self.num_v_heads * self.head_v_dim
        conv_dim = 2 * self.key_dim + self.value_dim
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, args.linear_conv_kernel_dim, groups=conv_dim, bias=False
        )
        self.in_proj_qkvz = nn.Linear(
            args.hidden_size, 2 * self.key_dim + 2 * self.value_dim, bias=False
        )
        self.in_proj_ba = nn.Linear(args.hidden_size, 2 * self.num_v_heads, bias=False)
        self.dt_bias = mx.ones((self.num_v_heads,))
        self.A_log = mx.zeros((self.num_v_heads,))
        self.norm = GatedRMSNorm(self.head_v_dim, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, args.hidden_size, bias=False)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, L, _ = x.shape
        Hk, Hv, dk, dv = self.num_k_heads, self.num_v_heads, self.head_k_dim, self.head_v_dim
        r = Hv // Hk
        # The projections are laid out per key head: [q, k, r value heads of v, of z].
        qkvz = self.in_proj_qkvz(x).reshape(B, L, Hk, -1)
        q, k, v, z = mx.split(qkvz, [dk, 2 * dk, 2 * dk + r * dv], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, Hk, 2 * r), [r], axis=-1)
        z = z.reshape(B, L, Hv, dv)
        b, a = b.reshape(B, L, Hv), a.reshape(B, L, Hv)

        mixed = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
        mixed = nn.silu(causal_conv(mixed, self.conv1d.weight, None, cache, 0))
        q, k, v = mx.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = _l2norm(q.reshape(B, L, Hk, dk).astype(mx.float32)) * dk**-0.5
        k = _l2norm(k.reshape(B, L, Hk, dk).astype(mx.float32))
        v = v.reshape(B, L, Hv, dv).astype(mx.float32)

        beta = mx.sigmoid(b.astype(mx.float32))
        g = mx.exp(
            -mx.exp(self.A_log.astype(mx.float32))
            * nn.softplus(a.astype(mx.float32) + self.dt_bias.astype(mx.float32))
        )
        state = cache[1] if cache is not None else None
        out, state = gated_delta(q, k, v, g, beta, state)
        if cache is not None:
            cache[1] = state
        out = self.norm(out.astype(x.dtype), z)
        return self.out_proj(out.reshape(B, L, -1))


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = hd = args.head_dim
        self.scale = hd**-0.5
        bias = args.attention_bias
        # Queries and their output gate come from one projection, interleaved per head.
        self.q_proj = nn.Linear(args.hidden_size, 2 * self.n_heads * hd, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.rope = initialize_rope(
            int(hd * args.partial_rotary_factor),
            args.rope_theta,
            False,
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        B, L, _ = x.shape
        queries, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, -1), 2, axis=-1)
        gate = gate.reshape(B, L, -1)
        queries = self.q_norm(queries).transpose(0, 2, 1, 3)
        keys = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)
        out = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out * mx.sigmoid(gate))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts)
        self.shared_expert = MLP(args.hidden_size, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(args.hidden_size, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        scores = mx.take_along_axis(probs, inds, axis=-1)
        if self.norm_topk_prob:
            scores = scores / scores.sum(-1, keepdims=True)
        y = self.switch_mlp(x, inds)
        y = (y * scores[..., None].astype(y.dtype)).sum(axis=-2)
        return y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.is_linear = args.layer_types[layer_idx] == LINEAR
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(args)
        else:
            self.self_attn = Attention(args)
        if args.is_moe_layer(layer_idx):
            self.mlp = SparseMoeBlock(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        if self.is_linear:
            h = x + self.linear_attn(self.input_layernorm(x), cache)
        else:
            h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3NextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.first_full = next((i for i, t in enumerate(args.layer_types) if t == FULL), None)

    def __call__(self, inputs, cache=None, input_embeddings=None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = None
        if self.first_full is not None:
            mask = create_attention_mask(h, cache[self.first_full])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3NextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def make_cache(self) -> List[Any]:
        return [ArraysCache(size=2) if layer.is_linear else KVCache() for layer in self.layers]

    def sanitize(self, weights):
        # Multi-token-prediction heads are for speculative training, not used here.
        weights = {k: v for k, v in weights.items() if not k.startswith("mtp.")}
        hf_layout = any(".mlp.experts." in k for k in weights) or not any(
            ".switch_mlp." in k for k in weights
        )
        for i in range(self.args.num_hidden_layers):
            prefix = f"model.layers.{i}.mlp"
            # One tensor per expert (what save_pretrained writes) -> stacked [E, out, in].
            for name in ("gate_proj", "up_proj", "down_proj"):
                first = f"{prefix}.experts.0.{name}.weight"
                if first in weights:
                    weights[f"{prefix}.switch_mlp.{name}.weight"] = mx.stack(
                        [
                            weights.pop(f"{prefix}.experts.{e}.{name}.weight")
                            for e in range(self.args.num_experts)
                        ]
                    )
            # transformers' in-memory fused layout: gate_up_proj [E, 2I, H], down [E, H, I].
            if f"{prefix}.experts.gate_up_proj" in weights:
                gate_up = weights.pop(f"{prefix}.experts.gate_up_proj")
                gate, up = mx.split(gate_up, 2, axis=1)
                weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
                weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
                weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(
                    f"{prefix}.experts.down_proj"
                )
        out = {}
        for k, v in weights.items():
            if k.endswith("conv1d.weight") and v.ndim == 3 and v.shape[1] == 1:
                v = v.swapaxes(1, 2)  # torch depthwise [C, 1, K] -> MLX [C, K, 1]
            if hf_layout and (k.endswith(_SHIFTED_NORMS) or k == "model.norm.weight"):
                v = v + 1.0
            out[k] = v
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    @property
    def layers(self):
        return self.model.layers
