"""Attention over a TurboQuantKVCache, in the rotated domain (pure MLX reference).

With k_j ≈ n_j Πₖᵀ c_j and v_j ≈ m_j Πᵥᵀ c'_j (c = centroid vectors, n/m = norms):

    q · k_j = n_j (Πₖ q) · c_j                       (rotate the query once)
    Σ_j p_j v_j = Πᵥᵀ ( Σ_j p_j m_j c'_j )           (rotate the output back once)

so the context is read as norm x centroid vectors and never inverse-rotated per token.
This path runs on every backend and is the reference the fused kernels are tested
against; on a GPU, decode steps use the fused kernels instead.
"""

from typing import Any, Optional

import mlx.core as mx

from .turboquant_kernels import fused_backend, fused_decode_attention, supports
from .turboquant_rotation import inverse_rotate, rotate


def turboquant_scaled_dot_product_attention(
    queries: mx.array,
    cache,
    scale: float,
    mask: Optional[Any],
) -> mx.array:
    """softmax(scale · q Kᵀ + mask) V for queries [B, n_heads, L, D] against the whole
    context held by `cache` (a TurboQuantKVCache or RotatingTurboQuantKVCache), GQA
    included. Decode-sized query blocks go to the fused kernel where one runs
    (`turboquant_kernels`); everything else, and every CPU call, to the reference below."""
    backend = fused_backend()
    if backend is not None and supports(queries, cache, mask):
        return fused_decode_attention(queries, cache, scale, mask, backend)
    dtype = queries.dtype
    q_rot = rotate(queries.astype(mx.float32), cache.key_signs).astype(dtype)
    k_rot, v_rot = cache.rotated_keys_values(dtype)
    out_rot = mx.fast.scaled_dot_product_attention(q_rot, k_rot, v_rot, scale=scale, mask=mask)
    return inverse_rotate(out_rot.astype(mx.float32), cache.value_signs).astype(dtype)
