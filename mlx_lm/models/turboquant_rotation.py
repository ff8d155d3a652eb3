"""Random rotation of TurboQuant (arXiv 2504.19874, Sec. 3.1, Algorithm 1 line 2).

TurboQuant multiplies every key/value vector by a random orthogonal matrix Π so that each
coordinate of the rotated unit vector follows one known distribution (Lemma 1: density
∝ (1 - x²)^((d-3)/2)), whatever the input was. A dense Haar-random Π costs O(d²) per
vector; like the practical implementations we use the randomized Hadamard transform

    Π x = H D x / sqrt(d),    Π⁻¹ y = D Hᵀ y / sqrt(d),

with D = diag(random ±1) and H a d×d Hadamard matrix, which costs O(d log d) through
`mx.hadamard_transform`. MLX supports d = m·2^k with m in {1, 12, 20, 28}. For any other
head dimension we fall back to a fixed Haar-random orthogonal matrix (seeded by d only)
in place of H/sqrt(d): still orthogonal, still per-layer random through D, but a dense
O(d²) matmul.

All vectors live on the last axis; math is float32.
"""

from functools import lru_cache

import mlx.core as mx
import numpy as np

_HADAMARD_BASES = (1, 12, 20, 28)
_KINDS = {"k": 0, "v": 1}


def hadamard_supported(head_dim: int) -> bool:
    """True when `mx.hadamard_transform` handles this size (m·2^k, m in {1, 12, 20, 28})."""
    for m in _HADAMARD_BASES:
        if head_dim % m == 0:
            k = head_dim // m
            if k & (k - 1) == 0:
                return True
    return False


def rotation_signs(head_dim: int, seed: int, layer_idx: int, kind: str) -> mx.array:
    """The ±1 diagonal D of Π for one (seed, layer, "k"/"v"), float32 of shape [head_dim].

    numpy's Generator seeded with the integer list [seed, layer_idx, kind] is specified
    bit-for-bit (PCG64 + SeedSequence), so the signs are the same on every run and
    platform: a saved cache can be reloaded and dequantized elsewhere.
    """
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}.")
    if kind not in _KINDS:
        raise ValueError(f"kind must be 'k' or 'v', got {kind!r}.")
    if seed < 0 or layer_idx < 0:
        raise ValueError(f"seed and layer_idx must be >= 0, got seed={seed}, layer={layer_idx}.")
    rng = np.random.default_rng([seed, layer_idx, _KINDS[kind]])
    signs = rng.integers(0, 2, size=head_dim) * 2 - 1
    return mx.array(signs.astype(np.float32))


@lru_cache(maxsize=None)
def _mixing_matrix(head_dim: int):
    """(M, symmetric): the orthogonal matrix with rotate(x) = (x * signs) @ M.

    For Hadamard sizes M = H/sqrt(d) read off `mx.hadamard_transform` applied to the
    identity (MLX's 20·2^k and 28·2^k Hadamard matrices are not symmetric, so the inverse
    then needs Mᵀ explicitly). Otherwise M is a Haar-random orthogonal matrix: QR of a
    Gaussian matrix with the signs of R's diagonal folded into Q (Mezzadri 2007).
    """
    if hadamard_supported(head_dim):
        eye = mx.eye(head_dim, dtype=mx.float32)
        m = np.array(mx.hadamard_transform(eye, scale=1.0 / np.sqrt(head_dim)))
        symmetric = bool(np.array_equal(m, m.T))
    else:
        rng = np.random.default_rng([head_dim, 0x7475_7262])  # seed depends on d only
        q, r = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
        m = (q * np.sign(np.diag(r))).astype(np.float32)
        symmetric = False
    return mx.array(m), symmetric


def _check(x: mx.array, signs: mx.array) -> int:
    d = x.shape[-1]
    if signs.shape != (d,):
        raise ValueError(
            f"signs have shape {signs.shape} but the last axis of x is {d}: "
            "build them with rotation_signs(head_dim=x.shape[-1], ...)."
        )
    return d


def rotate(x: mx.array, signs: mx.array) -> mx.array:
    """Π x = H D x / sqrt(d) over the last axis (float32)."""
    d = _check(x, signs)
    x = x.astype(mx.float32) * signs
    if hadamard_supported(d):
        return mx.hadamard_transform(x, scale=1.0 / float(np.sqrt(d)))
    m, _ = _mixing_matrix(d)
    return x @ m


def inverse_rotate(y: mx.array, signs: mx.array) -> mx.array:
    """Π⁻¹ y = Πᵀ y = D Hᵀ y / sqrt(d) over the last axis (float32)."""
    d = _check(y, signs)
    y = y.astype(mx.float32)
    if hadamard_supported(d):
        m, symmetric = _mixing_matrix(d)
        if symmetric:
            y = mx.hadamard_transform(y, scale=1.0 / float(np.sqrt(d)))
        else:
            y = y @ m.T
    else:
        m, _ = _mixing_matrix(d)
        y = y @ m.T
    return y * signs
