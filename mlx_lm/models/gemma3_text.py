"""Gemma 3 text models (transformers' `Gemma3ForCausalLM`, model_type "gemma3_text").

Differences from Llama, all matched to transformers:
- RMSNorm scales by (1 + weight) (weights are stored zero-centred);
- the embedding output is multiplied by sqrt(hidden_size), rounded to the compute dtype;
- four norms per block: around attention (input/post_attention) and around the MLP
  (pre_feedforward/post_feedforward), the post norms applied before the residual add;
- RMSNorm over each query and key head (q_norm, k_norm); scale query_pre_attn_scalar**-0.5;
- a GELU (tanh approximation) gated MLP;
- sliding-window layers (HF `layer_types`, or every `sliding_window_pattern`-th layer
  global) attend to the last `sliding_window` positions, the query's own included
  (transformers: kv_idx > q_idx - sliding_window), and use RoPE base
  `rope_local_base_freq`; global layers use `rope_theta` and `rope_scaling`;
- optional final logit soft-capping: cap * tanh(logits / cap).
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs, create_attention_mask, scaled_dot_product_attention
from .cache import KVCache, RotatingKVCache
from .rope_utils import initialize_rope, split_rope_parameters

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelArgs(BaseModelArgs):
    # Defaults are transformers' Gemma3TextConfig defaults: released configs (notably the
    # text_config of multimodal "gemma3" checkpoints) leave some of these keys out.
    model_type: str = "gemma3_text"
    hidden_size: int = 2304
    num_hidden_layers: int = 26
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    vocab_size: int = 262208
    num_key_value_heads: Optional[int] = 4
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: Optional[Dict[str, Any]] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    query_pre_attn_scalar: float = 256
    sliding_window: int = 4096
    sliding_window_pattern: int = 6
    layer_types: Optional[List[str]] = None
    final_logit_softcapping: Optional[float] = None
    attn_logit_softcapping: Optional[float] = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    hidden_activation: str = "gelu_pytorch_tanh"
    use_bidirectional_attention: bool = False

    @classmethod
    def from_dict(cls, params):
        """Also accepts a multimodal "gemma3" config: its `text_config` describes the
        language model (the vision tower's weights are dropped by `Model.sanitize`)."""
        if "text_config" in params:
            params = {**params["text_config"], "model_type": params.get("model_type", "gemma3")}
        return super().from_dict(params)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            # transformers' rule: layer i is global iff (i + 1) % pattern == 0.
            self.layer_types = [
                SLIDING if (i + 1) % self.sliding_window_pattern else FULL
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers or set(self.layer_types) - {
            SLIDING,
            FULL,
        }:
            raise ValueError(
                f"layer_types must list '{SLIDING}' or '{FULL}' for each of the "
                f"{self.num_hidden_layers} layers, got {self.layer_types}."
            )
        # transformers >= 5 nests RoPE settings per layer type in `rope_parameters`.
        self.rope_local_scaling = None
        params = self.rope_parameters or {}
        if FULL in params or SLIDING in params:
            self.rope_theta, self.rope_scaling = split_rope_parameters(
                params.get(FULL), self.rope_theta, self.rope_scaling
            )
            self.rope_local_base_freq, self.rope_local_scaling = split_rope_parameters(
                params.get(SLIDING), self.rope_local_base_freq, None
            )
        else:
            self.rope_theta, self.rope_scaling = split_rope_parameters(
                params, self.rope_theta, self.rope_scaling
            )
        if self.attn_logit_softcapping is not None:
            raise ValueError(
                "attn_logit_softcapping is not supported (no Gemma 3 checkpoint sets it); "
                "set it to null in config.json."
            )
        if self.use_bidirectional_attention:
            raise ValueError(
                "use_bidirectional_attention=true (an embedding-model setting) is not "
                "supported for generation; set it to false."
            )
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise ValueError(
                f"Unsupported hidden_activation '{self.hidden_activation}': expected "
                "'gelu_pytorch_tanh' (Gemma 3's) or 'gelu'."
            )


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight)."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = n_heads = args.num_attention_heads
        self.n_kv_heads = n_kv_heads = args.num_key_value_heads
        self.head_dim = head_dim = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5
        self.is_sliding = args.layer_types[layer_idx] == SLIDING

        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, eps=args.rms_norm_eps)

        if self.is_sliding:
            self.rope = initialize_rope(
                head_dim,
                args.rope_local_base_freq,
                False,
                args.rope_local_scaling,
                args.max_position_embeddings,
            )
        else:
            self.rope = initialize_rope(
                head_dim, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings
            )

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None):
        B, L, _ = x.shape
        queries, keys, values = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        queries = self.q_norm(queries.reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        keys = self.k_norm(keys.reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        values = values.reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        if cache is not None:
            queries = self.rope(queries, offset=cache.offset)
            keys = self.rope(keys, offset=cache.offset)
            keys, values = cache.update_and_fetch(keys, values)
        else:
            queries = self.rope(queries)
            keys = self.rope(keys)

        output = scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=self.scale, mask=mask
        )
        output = output.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(output)


class MLP(nn.Module):
    """Gated GELU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self._act = nn.gelu if activation == "gelu" else nn.gelu_approx

    def __call__(self, x) -> mx.array:
        return self.down_proj(self._act(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, args.hidden_activation)
        eps = args.rms_norm_eps
        self.input_layernorm = RMSNorm(args.hidden_size, eps=eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, eps=eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, eps=eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, eps=eps)

    def __call__(self, x: mx.array, mask: Optional[Any] = None, cache: Optional[Any] = None):
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.vocab_size = args.vocab_size
        self.num_hidden_layers = args.num_hidden_layers
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, i) for i in range(args.num_hidden_layers)]
        self.norm = RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # The first layer of each kind: its cache decides that kind's mask.
        self.sliding_idx = next((i for i, t in enumerate(args.layer_types) if t == SLIDING), None)
        self.global_idx = next((i for i, t in enumerate(args.layer_types) if t == FULL), None)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        if input_embeddings is not None:
            # Like transformers' inputs_embeds: taken as already scaled.
            h = input_embeddings
        else:
            h = self.embed_tokens(inputs)
            # transformers rounds the scale to the weights' dtype before multiplying.
            h = h * mx.array(self.args.hidden_size**0.5, dtype=h.dtype)
        if cache is None:
            cache = [None] * len(self.layers)

        global_mask = sliding_mask = None
        if self.global_idx is not None:
            global_mask = create_attention_mask(h, cache[self.global_idx])
        if self.sliding_idx is not None:
            sliding_mask = create_attention_mask(
                h, cache[self.sliding_idx], window_size=self.args.sliding_window
            )
        for layer, c in zip(self.layers, cache):
            mask = sliding_mask if layer.self_attn.is_sliding else global_mask
            h = layer(h, mask, cache=c)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: Optional[mx.array] = None):
        out = self.model(inputs, cache, input_embeddings)
        if self.args.tie_word_embeddings:
            out = self.model.embed_tokens.as_linear(out)
        else:
            out = self.lm_head(out)
        cap = self.args.final_logit_softcapping
        if cap is not None:
            out = mx.tanh(out / cap) * cap
        return out

    def sanitize(self, weights):
        # Rotary frequencies are recomputed, never loaded; tied models reuse the embedding.
        weights = {k: v for k, v in weights.items() if "rotary_emb" not in k}
        if any(k.startswith(("language_model.", "model.language_model.")) for k in weights):
            # A multimodal "gemma3" checkpoint: keep the language model, renamed to ours.
            renamed = {}
            for k, v in weights.items():
                for prefix in ("model.language_model.", "language_model.model."):
                    if k.startswith(prefix):
                        renamed["model." + k[len(prefix) :]] = v
                if k.startswith(("lm_head.", "language_model.lm_head.")):
                    renamed["lm_head." + k.split("lm_head.", 1)[1]] = v
            weights = renamed
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return weights

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        """A ring buffer of `sliding_window` tokens for sliding layers, a full cache for
        global ones."""
        return [
            (
                RotatingKVCache(max_size=self.args.sliding_window, keep=0)
                if layer.self_attn.is_sliding
                else KVCache()
            )
            for layer in self.layers
        ]
