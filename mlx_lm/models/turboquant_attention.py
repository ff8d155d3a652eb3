"""Attention over a TurboQuantKVCache, in the rotated domain (pure MLX reference).

With k_j ≈ n_j Πₖᵀ c_j and v_j ≈ m_j Πᵥᵀ c'_j (c = centroid vectors, n/m = norms):

    q · k_j = n_j (Πₖ q) · c_j                       (rotate the query once)
    Σ_j p_j v_j = Πᵥᵀ ( Σ_j p_j m_j c'_j )           (rotate the output back once)

so the context is read as norm x centroid vectors and never inverse-rotated per token.
This path runs on every backend and is the reference the fused kernels are tested
against; on a GPU, decode steps use the fused kernels instead.

On a GPU the long query blocks that come here (prefill) attend in the model's domain: the
dequantize kernel un-rotates the context in the same launch, which saves rotating the
queries, the output and the float16 window (four more passes over the chunk), and writes
the float16 window's rows after the codes (`read_context`: no join).
"""

from typing import Any, Optional

import mlx.core as mx

from .turboquant_kernels import MAX_QUERY_TOKENS, fused_backend, try_fused_decode_attention
from .turboquant_rotation import inverse_rotate, rotate

# Most attention scores one windowed SDPA call may hold (float32: 256 MB).
MAX_SCORES = 1 << 26
# A GPU prefill evaluates its attention once the dequantized contexts of the layers
# since the last evaluation reach this many bytes (`_released`).
RELEASE_BYTES = 1 << 29
_pending_bytes = 0


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
    if backend is not None:
        out = try_fused_decode_attention(queries, cache, scale, mask, backend)
        if out is not None:
            return out
    rotated = attends_rotated(cache)
    if getattr(cache, "recent_keys", None) is not None:
        return windowed_attention(queries, cache, scale, mask, rotated)
    keys, values = cache.coded_keys_values(queries.dtype, rotated)
    return _attention(queries, cache, keys, values, scale, mask, rotated)


def attends_rotated(cache) -> bool:
    """Whether this path attends in the rotated domains (the CPU reference: a decode
    query would otherwise un-rotate the whole context) or, where the fused dequantize
    kernel runs, in the model's domain."""
    return cache.kernel_backend() is None


def _attention(queries, cache, keys, values, scale: float, mask, rotated: bool) -> mx.array:
    """softmax(scale · q kᵀ + mask) v in one SDPA call, over keys and values given in the
    model's domain, or (`rotated`) in the rotated domains: softmax(scale · Πq · Πkᵀ +
    mask) Πv, rotated back."""
    dtype = queries.dtype
    q = _domain(queries, cache.key_signs, rotated, dtype)
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    if rotated:
        out = inverse_rotate(out, cache.value_signs).astype(dtype)
    return _released(out, queries.shape[2], keys.nbytes + values.nbytes)


def _domain(x: mx.array, signs: mx.array, rotated: bool, dtype) -> mx.array:
    """x (model's domain) as the attention reads it: rotated by Π (`rotated`) or not."""
    return (rotate(x, signs) if rotated else x).astype(dtype)


def _released(x: mx.array, query_tokens: int, transient_bytes: int) -> mx.array:
    """On a GPU, evaluate the attention of a long query block (prefill) once the
    transients (`transient_bytes` here: the dequantized context) of the layers since the
    last evaluation reach RELEASE_BYTES. There a buffer freed by the graph returns to
    the allocator only when the work that used it completes, so every layer's transient
    would otherwise stay until the whole prefill chunk finished: a 32K prefill
    (Qwen2.5-7B shapes, H200) peaked at 43 GB with float32 transients and no
    evaluation, 6.2 GB evaluating every layer (FP16: 14.7 GB). Evaluating every layer
    cost a sync each: 2048-token chunks at 16K ran at 0.84x FP16, 0.94x with none."""
    global _pending_bytes
    if query_tokens > MAX_QUERY_TOKENS and mx.default_device() == mx.gpu:
        _pending_bytes += transient_bytes
        if _pending_bytes >= RELEASE_BYTES:
            mx.eval(x)
            _pending_bytes = 0
    return x


def windowed_attention(
    queries: mx.array, cache, scale: float, mask: Optional[Any], rotated: bool = True
) -> mx.array:
    """Attention over a TurboQuant cache with a float16 buffer (`fp16_window`), a
    single-sequence one or a left-padded batch.

    Row b's update began with codes of positions [0, R_b) and float16 keys/values of
    every later position (its own tokens included): every query reads positions below
    R_b through their codes and the rest in float16, causally. For a single sequence
    that is one causal attention over [codes of [0, R) | float16 of [R, n)], with the
    model's mask as it is. In a batch the rows' R_b differ and the float16 buffer
    covers slots [first, slots), from the smallest: one
    `mx.fast.scaled_dot_product_attention` over the codes' columns then the buffer's,
    with a boolean mask that picks, per row, which copy of each slot counts (row b's
    position j sits in slot pad_b + j). Both run in the model's domain, or (`rotated`)
    in the rotated domains (Πq·Πk = q·k, and Πᵥᵀ Σ P Πᵥv = Σ P v):

        out = Πᵥᵀ softmax(scale · Πq · [Πk̂ | Πk] + mask) [Πv̂ | Πᵥv]
    """
    B, n_q, L, D = queries.shape
    coded, first, slots, pad, start = cache.window_layout()
    dtype = queries.dtype
    if not getattr(cache, "is_batch", False):
        if first == 0:  # nothing read through codes: plain attention
            keys, values = cache.recent_keys.astype(dtype), cache.recent_values.astype(dtype)
            out = mx.fast.scaled_dot_product_attention(
                queries, keys, values, scale=scale, mask=mask
            )
            return _released(out, L, 0)
        if not rotated:  # a GPU: codes and window from one launch
            keys, values = cache.read_context(dtype)
            return _attention(queries, cache, keys, values, scale, mask, rotated)
        k, v = cache.coded_keys_values(dtype, rotated)
        recent_k = _domain(cache.recent_keys, cache.key_signs, rotated, dtype)
        recent_v = _domain(cache.recent_values, cache.value_signs, rotated, dtype)
        keys = mx.concatenate([k[:, :, :first], recent_k], axis=2)
        values = mx.concatenate([v[:, :, :first], recent_v], axis=2)
        return _attention(queries, cache, keys, values, scale, mask, rotated)
    q = _domain(queries, cache.key_signs, rotated, dtype)
    keys = [_domain(cache.recent_keys, cache.key_signs, rotated, dtype)]
    values = [_domain(cache.recent_values, cache.value_signs, rotated, dtype)]
    t = mx.arange(slots - L, slots)[None, :, None]  # query slots [1, L, 1]
    bound = start[:, None, None]  # [B, 1, 1]: each row's first float16 slot read
    j = mx.arange(first, slots)[None, None]
    allowed = [(j >= bound) & (j <= t)]
    cols = [(first, slots)]
    if coded:
        k, v = cache.coded_keys_values(dtype, rotated)
        keys.insert(0, k[:, :, :coded])
        values.insert(0, v[:, :, :coded])
        j = mx.arange(coded)[None, None]
        codes = (j >= pad[:, None, None]) & (j < bound)
        allowed.insert(0, mx.broadcast_to(codes, (B, L, coded)))
        cols.insert(0, (0, coded))
    allowed = mx.concatenate(allowed, axis=-1)[:, None]  # [B, 1, L, columns]
    if isinstance(mask, mx.array):
        model_mask = mx.concatenate([mask[..., a:b] for a, b in cols], axis=-1)
        if model_mask.dtype == mx.bool_:
            allowed = allowed & model_mask
        else:
            allowed = mx.where(allowed, model_mask.astype(dtype), mx.array(-mx.inf, dtype))
    keys, values = mx.concatenate(keys, axis=2), mx.concatenate(values, axis=2)
    # An array mask takes SDPA's unfused path, which holds every score: a long query
    # block goes in pieces of at most MAX_SCORES scores.
    block = max(1, MAX_SCORES // (B * n_q * allowed.shape[-1]))
    pieces, transient = [], keys.nbytes + values.nbytes
    for a in range(0, L, block):
        piece = mx.fast.scaled_dot_product_attention(
            q[:, :, a : a + block],
            keys,
            values,
            scale=scale,
            mask=allowed[..., a : a + block, :],
        )
        scores = 4 * B * n_q * piece.shape[2] * allowed.shape[-1]
        pieces.append(_released(piece, L, transient + scores))
        transient = 0  # the dequantized context counts once, with the first piece
    out = mx.concatenate(pieces, axis=2)
    return inverse_rotate(out, cache.value_signs).astype(dtype) if rotated else out
