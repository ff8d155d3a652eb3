"""TurboQuant_mse quantize / dequantize of key and value vectors (arXiv 2504.19874, Alg. 1).

Per vector x in R^d (last axis):

    Quant:   r = ||x||,  y = Π (x / r),  idx_j = argmin_k |y_j - c_k|,  store (pack(idx), r')
    DeQuant: ŷ_j = r' · c_{idx_j}  (rotated domain),  x̂ = Πᵀ ŷ

with Π the randomized Hadamard rotation (turboquant_rotation) and c the Lloyd-Max codebook
of the rotated-coordinate distribution f_d (turboquant_codebook). The paper stores unit
vectors; keeping one norm per vector extends it to any x (its Sec. 4 does the same).

Norm correction: the centroid vector ĉ = c[idx] is shorter than y (a Lloyd-Max
quantizer's output has variance E[x²] - MSE), so we store r' = r / ||ĉ|| instead of r and
the reconstruction has exactly the length of x. On attention this removes the systematic
shrinkage of every score q·k̂ at a tiny cost in per-vector MSE.

Since Π is orthogonal, q·k = (Π q)·(Π k): a cache can keep keys and values in the rotated
domain (`turboquant_dequantize_rotated`), rotate the queries once and rotate the attention
output back once, instead of inverse-rotating every cached vector. Compute is float32.
"""

from typing import Tuple

import mlx.core as mx
import numpy as np

from .turboquant_codebook import quantize_to_centroids
from .turboquant_packing import pack_codes, unpack_codes
from .turboquant_rotation import inverse_rotate, rotate

# Smallest norm treated as nonzero: zero vectors quantize to norm 0 (and dequantize to 0)
# instead of dividing by zero.
_TINY = 1e-30


def _as_codebook(centroids, bits: int) -> mx.array:
    """The codebook as float32 mx (numpy input, e.g. lloyd_max_codebook's, is converted)."""
    if isinstance(centroids, mx.array):
        c = centroids.astype(mx.float32)
    else:
        c = mx.array(np.asarray(centroids, dtype=np.float32))
    if c.ndim != 1 or c.shape[0] != 1 << bits:
        raise ValueError(
            f"centroids must be a 1-D codebook of 2^bits = {1 << bits} values, got shape "
            f"{c.shape}: use lloyd_max_codebook(bits, head_dim)."
        )
    return c


def centroid_lookup(centroids, idx: mx.array, bits: int) -> mx.array:
    """c[idx], float32: each code's centroid.

    Given the codebook as constants (a tuple, list or numpy array of floats: what the
    compiled quantizers and dequantizers close over), codes of at most 4 bits select
    through a tree of `mx.where` over their bits. The values are those of `mx.take`, but
    the selection is elementwise, so a compiled dequantizer fuses it with the unpacking;
    on the CPU backend `mx.take` is a slow gather (2K tokens x 3 heads x 64 dims, 2 / 3 /
    4 bits: 0.3 / 0.8 / 1.1 ms against 7.0 / 4.3 / 6.9). A codebook given as an mx.array
    (traced, it would not fuse past 8 entries) and longer codes use `mx.take`."""
    if isinstance(centroids, mx.array) or bits > 4:
        return mx.take(_as_codebook(centroids, bits), idx)
    values = np.asarray(centroids, dtype=np.float32)
    if values.shape != (1 << bits,):
        _as_codebook(values, bits)  # raises, naming the expected shape
    leaves = [mx.array(float(v), dtype=mx.float32) for v in values]
    for b in range(bits):
        bit = ((idx >> b) & 1).astype(mx.bool_)
        leaves = [mx.where(bit, leaves[2 * k + 1], leaves[2 * k]) for k in range(len(leaves) // 2)]
    return mx.broadcast_to(leaves[0], idx.shape)


def turboquant_quantize(
    x: mx.array,
    signs: mx.array,
    centroids,
    bits: int,
    norm_correction: bool = True,
    norms_dtype=mx.float32,
) -> Tuple[mx.array, mx.array]:
    """Quant_mse of Algorithm 1 for every vector on the last axis of x [..., d].

    Returns (packed uint32 [..., ceil(d·bits/32)], norms [...] in `norms_dtype`). With
    norm_correction the norm is ||x|| / ||c[idx]||, so that dequantization returns a vector
    of length exactly ||x||; otherwise it is ||x||.
    """
    c = _as_codebook(centroids, bits)
    x = x.astype(mx.float32)
    norm = mx.sqrt(mx.sum(x * x, axis=-1, keepdims=True))
    unit = x / mx.maximum(norm, _TINY)  # zero vector -> zero unit vector, not NaN
    idx = quantize_to_centroids(rotate(unit, signs), c)
    if norm_correction:
        chat = centroid_lookup(centroids, idx, bits)
        norm = norm / mx.maximum(mx.sqrt(mx.sum(chat * chat, axis=-1, keepdims=True)), _TINY)
    return pack_codes(idx, bits), norm.squeeze(-1).astype(norms_dtype)


def turboquant_dequantize_rotated(
    packed: mx.array, norms: mx.array, centroids, bits: int, d: int
) -> mx.array:
    """ŷ = norms · c[idx] [..., d], float32, still in the rotated domain (Π x̂)."""
    idx = unpack_codes(packed, bits, d)
    return centroid_lookup(centroids, idx, bits) * norms.astype(mx.float32)[..., None]


def turboquant_dequantize(
    packed: mx.array, norms: mx.array, signs: mx.array, centroids, bits: int, d: int = None
) -> mx.array:
    """DeQuant_mse of Algorithm 1: x̂ = Πᵀ (norms · c[idx]) [..., d], float32."""
    d = signs.shape[-1] if d is None else d
    return inverse_rotate(turboquant_dequantize_rotated(packed, norms, centroids, bits, d), signs)
