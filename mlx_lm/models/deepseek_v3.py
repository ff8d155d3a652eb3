"""DeepSeek-V3 (and R1): multi-head latent attention (MLA) and a routed mixture of experts.

Attention. Queries come through a low-rank bottleneck (q_a_proj -> RMSNorm -> q_b_proj).
Keys and values come from one compressed latent per token: `kv_a_proj_with_mqa` yields a
`kv_lora_rank`-wide latent (RMS-normalized) plus a `qk_rope_head_dim`-wide key part that
carries RoPE and is shared by all heads; `kv_b_proj` expands the latent into every head's
un-roped key part (`qk_nope_head_dim`) and value (`v_head_dim`).

The prompt cache holds only the latents: a plain `KVCache` whose "keys" are the
normalized latents [B, 1, T, kv_lora_rank] and whose "values" are the roped shared key
parts [B, 1, T, qk_rope_head_dim] - per token (kv_lora_rank + qk_rope_head_dim) numbers
instead of num_heads * (qk_head_dim + v_head_dim). Prompts (several queries) expand the
fetched latents into per-head keys and values for the step; single-token decoding uses
absorbed attention instead: kv_b_proj's key half is folded into the query and its value
half applied to the attention output, so decoding attends over the latents directly
(one shared "KV head" of width kv_lora_rank + qk_rope_head_dim). TurboQuant, which needs
per-head keys and values, refuses these caches (`ModelArgs.kv_lora_rank` tells it).

Mixture of experts. From layer `first_k_dense_replace` on, the MLP is a sigmoid-scored
router choosing `num_experts_per_tok` of `n_routed_experts` experts: a learned per-expert
bias (`e_score_correction_bias`) shifts the choice but not the weights, experts come only
from the `topk_group` best of `n_group` groups (a group scores the sum of its two best
experts), the chosen weights are optionally renormalized and scaled by
`routed_scaling_factor`; `n_shared_experts` always-on experts are added.

Weight names are Hugging Face's, except that `sanitize` stacks the per-expert tensors
(`mlp.experts.E.gate_proj.weight`) into `mlp.switch_mlp.gate_proj.weight` [E, ...], as
upstream mlx-lm's converted checkpoints name them.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from .cache import QuantizedKVCache
from .rope_utils import initialize_rope, split_rope_parameters
from .switch_layers import SwitchGLU

# DeepSeek's FP8 checkpoints scale each 128 x 128 block of a weight by one float.
_FP8_BLOCK = 128


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: Optional[int] = None  # unused by MLA; kept for config round trips
    n_shared_experts: Optional[int] = 1
    n_routed_experts: Optional[int] = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: Optional[int] = 8
    topk_group: Optional[int] = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.rope_theta, self.rope_scaling = split_rope_parameters(
            self.rope_parameters, self.rope_theta, self.rope_scaling
        )
        self.n_group = self.n_group or 1
        self.topk_group = self.topk_group or self.n_group
        if self.hidden_act != "silu":
            raise ValueError(
                f"{self.model_type}: hidden_act '{self.hidden_act}' is not supported; "
                "only 'silu' (SwiGLU) is implemented."
            )
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group != 0:
                raise ValueError(
                    f"{self.model_type}: n_routed_experts ({self.n_routed_experts}) must be a "
                    f"multiple of n_group ({self.n_group})."
                )
            if not 1 <= self.topk_group <= self.n_group:
                raise ValueError(
                    f"{self.model_type}: topk_group ({self.topk_group}) must be between 1 and "
                    f"n_group ({self.n_group})."
                )
            available = self.topk_group * (self.n_routed_experts // self.n_group)
            if not 1 <= self.num_experts_per_tok <= available:
                raise ValueError(
                    f"{self.model_type}: num_experts_per_tok ({self.num_experts_per_tok}) must "
                    f"be between 1 and the {available} experts of the topk_group best groups."
                )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` has a routed MoE (else a dense MLP)."""
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class MultiHeadLatentAttention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.qk_head_dim = args.qk_head_dim
        dim, bias = args.hidden_size, args.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(dim, self.n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=bias)
            # The bottleneck norms use RMSNorm's default eps, not the config's rms_norm_eps.
            self.q_a_layernorm = nn.RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(
            dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias
        )
        self.kv_a_layernorm = nn.RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.n_heads * self.v_head_dim, dim, bias=bias)

        # YaRN's long-context softmax temperature: DeepSeek folds mscale_all_dim into the
        # attention scale (squared: it applies to queries and keys alike).
        self.scale = self.qk_head_dim**-0.5
        scaling = args.rope_scaling
        if scaling and scaling.get("mscale_all_dim") and scaling.get("factor"):
            self.scale *= _yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
        # Interleaved RoPE rotates (x0, x1), (x2, x3), ... pairs: MLX's "traditional" layout.
        # transformers returns the rotated pairs de-interleaved, but queries and keys are
        # permuted alike, so their dot products (all that RoPE feeds) agree.
        self.rope = initialize_rope(
            self.qk_rope_head_dim,
            args.rope_theta,
            args.rope_interleave,
            args.rope_scaling,
            args.max_position_embeddings,
        )

    def _kv_b_weights(self):
        """kv_b_proj's weight as per-head key and value parts: [H, nope, r], [H, v, r]."""
        layer = self.kv_b_proj
        if isinstance(layer, nn.QuantizedLinear):
            w = mx.dequantize(
                layer.weight,
                layer.scales,
                layer.get("biases"),
                group_size=layer.group_size,
                bits=layer.bits,
                mode=getattr(layer, "mode", "affine"),
            )
        else:
            w = layer.weight
        w = w.reshape(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None):
        B, L, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.reshape(B, L, self.n_heads, self.qk_head_dim).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [self.qk_nope_head_dim], axis=-1)

        compressed = self.kv_a_proj_with_mqa(x)
        latent, k_pe = mx.split(compressed, [self.kv_lora_rank], axis=-1)
        # One "head" each, so any [B, heads, T, dim] cache holds them.
        latent = self.kv_a_layernorm(latent).reshape(B, 1, L, self.kv_lora_rank)
        k_pe = k_pe.reshape(B, 1, L, self.qk_rope_head_dim)

        offset = cache.offset if cache is not None else 0
        q_pe = self.rope(q_pe, offset=offset)
        k_pe = self.rope(k_pe, offset=offset)

        attn_cache = cache
        if cache is not None:
            latent, k_pe = cache.update_and_fetch(latent, k_pe)
            if isinstance(cache, QuantizedKVCache):
                # --kv-bits: the latents are stored quantized; attend over them dequantized
                # (the per-head expansion below needs plain arrays anyway).
                q_args = dict(group_size=cache.group_size, bits=cache.bits)
                latent = mx.dequantize(*latent, **q_args)
                k_pe = mx.dequantize(*k_pe, **q_args)
                attn_cache = None

        if L == 1:
            # Absorbed attention: q_nope . (W_k c) = (W_k^T q_nope) . c, and the value
            # projection commutes with the attention average; keys are [c, k_pe], values c.
            w_k, w_v = self._kv_b_weights()
            queries = mx.concatenate([q_nope @ w_k, q_pe], axis=-1)
            keys = mx.concatenate([latent, k_pe], axis=-1)
            out = scaled_dot_product_attention(
                queries, keys, latent, cache=attn_cache, scale=self.scale, mask=mask
            )
            out = out @ w_v.swapaxes(-1, -2)
        else:
            # Prompt: expand the latents into per-head keys and values for this step only.
            T = latent.shape[2]
            kv = self.kv_b_proj(latent).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
            k_nope, values = mx.split(kv, [self.qk_nope_head_dim], axis=-1)
            k_pe = mx.broadcast_to(k_pe, (B, self.n_heads, T, self.qk_rope_head_dim))
            keys = mx.concatenate([k_nope, k_pe], axis=-1)
            queries = mx.concatenate([q_nope, q_pe], axis=-1)
            out = scaled_dot_product_attention(
                queries, keys, values, cache=attn_cache, scale=self.scale, mask=mask
            )
        out = out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def __call__(self, x) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """The router: (expert indices [..., k], weights [..., k] float32) per token."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_group = args.n_group
        self.topk_group = args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.routed_scaling_factor = args.routed_scaling_factor
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x: mx.array):
        # Routing runs in float32 whatever the model dtype, as the reference does.
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        scores = mx.sigmoid(logits)
        choice = scores + self.e_score_correction_bias.astype(mx.float32)
        if self.topk_group < self.n_group:
            # Keep the topk_group groups whose two best experts score highest.
            grouped = choice.reshape(*choice.shape[:-1], self.n_group, -1)
            group_scores = mx.topk(grouped, 2, axis=-1).sum(axis=-1)
            n_drop = self.n_group - self.topk_group
            drop = mx.argpartition(group_scores, kth=n_drop - 1, axis=-1)[..., :n_drop]
            grouped = mx.put_along_axis(
                grouped, drop[..., None], mx.array(-math.inf, grouped.dtype), axis=-2
            )
            choice = grouped.reshape(choice.shape)
        k = self.top_k
        inds = mx.argpartition(-choice, kth=k - 1, axis=-1)[..., :k]
        # The bias only picks experts; the weights are the plain sigmoid scores.
        weights = mx.take_along_axis(scores, inds, axis=-1)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
        return inds, weights * self.routed_scaling_factor


class MoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate = MoEGate(args)
        self.switch_mlp = SwitchGLU(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts
        )
        if args.n_shared_experts:
            self.shared_experts = MLP(
                args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
            )

    def __call__(self, x: mx.array) -> mx.array:
        inds, weights = self.gate(x)
        y = self.switch_mlp(x, inds)  # [..., k, D]
        y = (y * weights[..., None]).sum(axis=-2).astype(x.dtype)
        if "shared_experts" in self:
            y = y + self.shared_experts(x)
        return y


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = MultiHeadLatentAttention(args)
        if args.is_moe_layer(layer_idx):
            self.mlp = MoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None):
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DeepseekV3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * len(self.layers)
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, cache=c)
        return self.norm(h)


def _dequantize_fp8(weight: mx.array, scale_inv: mx.array) -> mx.array:
    """DeepSeek's block FP8: each 128 x 128 block of `weight` times one `scale_inv` entry."""
    if weight.dtype == mx.uint8:  # safetensors F8_E4M3 arrives as raw bytes
        weight = mx.from_fp8(weight, dtype=mx.float32)
    out_dims, in_dims = weight.shape
    scale = mx.repeat(mx.repeat(scale_inv.astype(mx.float32), _FP8_BLOCK, 0), _FP8_BLOCK, 1)
    return (weight.astype(mx.float32) * scale[:out_dims, :in_dims]).astype(mx.bfloat16)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = DeepseekV3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """HF checkpoint -> this module tree: drop rotary buffers and the multi-token
        prediction layers past num_hidden_layers, dequantize block-FP8 weights, stack
        per-expert tensors into the switch layers."""
        n_layers = self.args.num_hidden_layers

        def keep(key):
            if "rotary_emb.inv_freq" in key:
                return False
            parts = key.split(".")
            if len(parts) > 2 and parts[:2] == ["model", "layers"]:
                return int(parts[2]) < n_layers
            return True

        weights = {k: v for k, v in weights.items() if keep(k)}

        for key in [k for k in weights if k.endswith(".weight_scale_inv")]:
            scale_inv = weights.pop(key)
            wkey = key[: -len("_scale_inv")]
            weights[wkey] = _dequantize_fp8(weights[wkey], scale_inv)

        for i in range(n_layers):
            prefix = f"model.layers.{i}.mlp"
            # transformers >= 5 may hold experts fused: gate_up_proj [E, 2I, D], down [E, D, I].
            fused = weights.pop(f"{prefix}.experts.gate_up_proj", None)
            if fused is not None:
                gate, up = mx.split(fused, 2, axis=1)
                weights[f"{prefix}.switch_mlp.gate_proj.weight"] = gate
                weights[f"{prefix}.switch_mlp.up_proj.weight"] = up
                weights[f"{prefix}.switch_mlp.down_proj.weight"] = weights.pop(
                    f"{prefix}.experts.down_proj"
                )
                continue
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for kind in ("weight", "scales", "biases"):
                    first = f"{prefix}.experts.0.{proj}.{kind}"
                    if first not in weights:
                        continue
                    stacked = [
                        weights.pop(f"{prefix}.experts.{e}.{proj}.{kind}")
                        for e in range(self.args.n_routed_experts)
                    ]
                    weights[f"{prefix}.switch_mlp.{proj}.{kind}"] = mx.stack(stacked)

        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self):
        return self.model.layers
