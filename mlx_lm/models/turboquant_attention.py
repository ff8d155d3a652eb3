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
    if getattr(cache, "recent_keys", None) is not None:
        return windowed_attention(queries, cache, scale, mask)
    dtype = queries.dtype
    q_rot = rotate(queries.astype(mx.float32), cache.key_signs).astype(dtype)
    k_rot, v_rot = cache.rotated_keys_values(dtype)
    out_rot = mx.fast.scaled_dot_product_attention(q_rot, k_rot, v_rot, scale=scale, mask=mask)
    return inverse_rotate(out_rot.astype(mx.float32), cache.value_signs).astype(dtype)


def windowed_attention(queries: mx.array, cache, scale: float, mask: Optional[Any]) -> mx.array:
    """Attention over a TurboQuantKVCache with a float16 window (`fp16_window` = W).

    The L queries sit at positions p = offset - L .. offset - 1. The cache holds codes of
    positions [0, C) and float16 keys/values of [R, offset) (R <= C). Query p reads key j
    in float16 when max(R, p - W + 1) <= j <= p and through its codes when j is below
    that bound, so each position is counted once:

        s_pj = scale · (Π q_p) · Πk̂_j   (coded)     or   scale · q_p · k_j   (float16)
        out_p = Πᵥᵀ Σ_coded P_pj Πv̂_j  +  Σ_float16 P_pj v_j,   P = softmax over both.

    A model mask (array over the offset columns) is applied to both parts.
    """
    B, n_q, L, D = queries.shape
    n_kv = cache.recent_keys.shape[1]
    group = n_q // n_kv
    offset, coded, start, window = cache.offset, cache.coded, cache.recent_start, cache.fp16_window
    dtype = queries.dtype
    q = queries.astype(mx.float32).reshape(B, n_kv, group, L, D) * scale
    p = mx.arange(offset - L, offset)[:, None]  # query positions [L, 1]
    bound = mx.maximum(p - window + 1, start)
    kf = cache.recent_keys.astype(mx.float32)[:, :, None]
    vf = cache.recent_values.astype(mx.float32)[:, :, None]
    jf = mx.arange(start, offset)[None]
    scores = [q @ kf.swapaxes(-1, -2)]
    allowed = [(jf >= bound) & (jf <= p)]
    cols = [(start, offset)]
    if coded:
        k_rot, v_rot = cache.rotated_keys_values(mx.float32)
        q_rot = rotate(q, cache.key_signs)
        scores.insert(0, q_rot @ k_rot[:, :, None].swapaxes(-1, -2))
        allowed.insert(0, mx.arange(coded)[None] < bound)
        cols.insert(0, (0, coded))
    parts = []
    for s, ok, (a, b) in zip(scores, allowed, cols):
        s = mx.where(ok, s, -mx.inf)
        if isinstance(mask, mx.array):
            m = mask[..., a:b]
            if m.ndim == 4 and m.shape[1] == n_q > 1:
                m = m.reshape(m.shape[0], n_kv, group, L, b - a)
            elif m.ndim == 4:
                m = m[:, :, None]  # [B or 1, 1, 1, L, cols]
            s = mx.where(m, s, -mx.inf) if m.dtype == mx.bool_ else s + m
        parts.append(s)
    probs = mx.softmax(mx.concatenate(parts, axis=-1), axis=-1)
    out = probs[..., coded:] @ vf
    if coded:
        out_rot = probs[..., :coded] @ v_rot[:, :, None]
        out = out + inverse_rotate(out_rot, cache.value_signs)
    return out.reshape(B, n_q, L, D).astype(dtype)
