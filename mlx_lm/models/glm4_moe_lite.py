"""GLM-4.7-Flash ("model_type": "glm4_moe_lite"): DeepSeek-V3's architecture under GLM's
configuration.

transformers' `Glm4MoeLiteForCausalLM` is DeepSeek-V3's multi-head latent attention and
sigmoid-routed mixture of experts unchanged (same weight names, same latent cache); what
differs is the config: which layers are dense is given per layer by `mlp_layer_types`
("dense" / "sparse", default: the first layer dense, the rest MoE), and the defaults are
GLM's (64 experts in one group, 4 per token, 20 heads, kv_lora_rank 512). Checkpoints
written before `mlp_layer_types` existed give `first_k_dense_replace` instead; we honour
it when `mlp_layer_types` is absent.
"""

from dataclasses import dataclass
from typing import List, Optional

from . import deepseek_v3


@dataclass
class ModelArgs(deepseek_v3.ModelArgs):
    model_type: str = "glm4_moe_lite"
    vocab_size: int = 154880
    hidden_size: int = 2048
    intermediate_size: int = 10240
    moe_intermediate_size: int = 1536
    num_hidden_layers: int = 47
    num_attention_heads: int = 20
    n_shared_experts: Optional[int] = 1
    n_routed_experts: Optional[int] = 64
    routed_scaling_factor: float = 1.8
    kv_lora_rank: int = 512
    q_lora_rank: Optional[int] = 768
    qk_rope_head_dim: int = 64
    v_head_dim: int = 256
    qk_nope_head_dim: int = 192
    n_group: Optional[int] = 1
    topk_group: Optional[int] = 1
    num_experts_per_tok: int = 4
    first_k_dense_replace: Optional[int] = None
    max_position_embeddings: int = 202752
    rms_norm_eps: float = 1e-5
    mlp_layer_types: Optional[List[str]] = None

    def __post_init__(self):
        super().__post_init__()
        if self.mlp_layer_types is None:
            n_dense = 1 if self.first_k_dense_replace is None else self.first_k_dense_replace
            n_dense = min(n_dense, self.num_hidden_layers)
            self.mlp_layer_types = ["dense"] * n_dense + ["sparse"] * (
                self.num_hidden_layers - n_dense
            )
        if len(self.mlp_layer_types) != self.num_hidden_layers or not set(self.mlp_layer_types) <= {
            "dense",
            "sparse",
        }:
            raise ValueError(
                f"glm4_moe_lite: mlp_layer_types must list 'dense' or 'sparse' for each of the "
                f"{self.num_hidden_layers} layers, got {self.mlp_layer_types!r}."
            )

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.n_routed_experts) and self.mlp_layer_types[layer_idx] == "sparse"


class Model(deepseek_v3.Model):
    """`deepseek_v3.Model` built from GLM's `ModelArgs` (same modules, weights, sanitize)."""
