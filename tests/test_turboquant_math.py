"""TurboQuant_mse math (arXiv 2504.19874): rotation, Lloyd-Max codebooks, packing, pipeline."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm.models.turboquant import (
    centroid_lookup,
    turboquant_dequantize,
    turboquant_dequantize_rotated,
    turboquant_quantize,
)
from mlx_lm.models.turboquant_codebook import (
    codebook_boundaries,
    codebook_mse,
    gaussian_lloyd_max,
    lloyd_max_codebook,
    quantize_to_centroids,
)
from mlx_lm.models.turboquant_packing import pack_codes, packed_words, unpack_codes
from mlx_lm.models.turboquant_rotation import (
    hadamard_supported,
    inverse_rotate,
    rotate,
    rotation_signs,
)


def _randn(*shape, seed=0):
    return mx.array(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def _unit(x):
    return x / mx.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------- rotation


def _sylvester(d):
    h = np.ones((1, 1))
    while h.shape[0] < d:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("d", [64, 96, 128, 160, 224, 256, 72])
def test_rotation_is_orthogonal_and_inverts(d):
    # 160 = 20·8 and 224 = 28·8 have non-symmetric Hadamard matrices; 72 uses the fallback.
    assert hadamard_supported(d) == (d != 72)
    x = _randn(3, 5, d)
    s = rotation_signs(d, seed=0, layer_idx=2, kind="k")
    y = rotate(x, s)
    assert y.dtype == mx.float32 and y.shape == x.shape
    np.testing.assert_allclose(
        np.linalg.norm(np.array(y), axis=-1), np.linalg.norm(np.array(x), axis=-1), rtol=1e-5
    )
    np.testing.assert_allclose(np.array(inverse_rotate(y, s)), np.array(x), atol=1e-5)
    # The rotation really mixes: it is not (a signed permutation of) the identity.
    m = np.array(rotate(mx.eye(d), s))
    np.testing.assert_allclose(m @ m.T, np.eye(d), atol=1e-5)
    assert np.abs(m).max() < 0.5


def test_rotation_is_randomized_hadamard():
    d = 128
    s = rotation_signs(d, seed=3, layer_idx=0, kind="v")
    x = np.random.default_rng(1).standard_normal((4, d)).astype(np.float32)
    expected = (x * np.array(s)) @ _sylvester(d).T / math.sqrt(d)  # Π x = H D x / sqrt(d)
    np.testing.assert_allclose(np.array(rotate(mx.array(x), s)), expected, atol=1e-5)


def test_rotation_signs_deterministic_and_distinct():
    a = np.array(rotation_signs(128, 0, 5, "k"))
    assert set(np.unique(a)) == {-1.0, 1.0}
    assert np.array_equal(a, np.array(rotation_signs(128, 0, 5, "k")))
    others = [(0, 6, "k"), (0, 5, "v"), (1, 5, "k")]
    for seed, layer, kind in others:
        assert not np.array_equal(a, np.array(rotation_signs(128, seed, layer, kind)))


def test_rotation_bad_input():
    with pytest.raises(ValueError, match="kind"):
        rotation_signs(64, 0, 0, "q")
    with pytest.raises(ValueError, match="signs"):
        rotate(_randn(2, 64), rotation_signs(128, 0, 0, "k"))


# ----------------------------------------------------------------------------- codebook

# Optimal scalar quantizer MSE for N(0, 1) (Max 1960); 1 bit: 1 - 2/π.
_GAUSSIAN_MSE = {1: 1 - 2 / math.pi, 2: 0.1175, 3: 0.03454, 4: 0.009497}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_gaussian_lloyd_max_mse(bits):
    c = gaussian_lloyd_max(bits)
    assert len(c) == 2 ** bits and np.all(np.diff(c) > 0)
    np.testing.assert_allclose(c, -c[::-1], atol=1e-9)
    assert codebook_mse(c) == pytest.approx(_GAUSSIAN_MSE[bits], rel=0.01)
    # Monte Carlo through the mx quantizer, independent of the quadrature.
    x = np.random.default_rng(bits).standard_normal(1 << 20).astype(np.float32)
    idx = np.array(quantize_to_centroids(mx.array(x), c))
    mse = np.mean((x - c[idx]) ** 2)
    assert mse == pytest.approx(_GAUSSIAN_MSE[bits], rel=0.01)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_sphere_codebook_d3_is_uniform(bits):
    # For d = 3 the coordinate density (1 - x²)^0 is uniform on [-1, 1] (Archimedes), whose
    # Lloyd-Max quantizer is the uniform one: centroids at the cell midpoints.
    n = 2**bits
    expected = (2 * np.arange(n) + 1) / n - 1
    np.testing.assert_allclose(lloyd_max_codebook(bits, 3), expected, atol=1e-7)


def test_sphere_codebook_tends_to_gaussian():
    for bits in (2, 4):
        scaled = lloyd_max_codebook(bits, 4096) * math.sqrt(4096)
        np.testing.assert_allclose(scaled, gaussian_lloyd_max(bits), rtol=2e-3, atol=1e-3)
    # At d = 128 the bounded Beta-shaped law quantizes a little better than the Gaussian.
    for bits in (1, 2, 3, 4):
        assert 128 * codebook_mse(lloyd_max_codebook(bits, 128), 128) < _GAUSSIAN_MSE[bits]


@pytest.mark.parametrize("bits", range(1, 9))
def test_quantize_to_centroids_is_nearest(bits):
    c = lloyd_max_codebook(bits, 64)
    assert len(c) == 2 ** bits and np.all(np.diff(c) > 0)
    assert not c.flags.writeable
    x = np.random.default_rng(bits).standard_normal((8, 64, 64)) / 8.0
    x = np.concatenate([x.ravel(), codebook_boundaries(c) + 1e-6, [-2.0, 2.0]]).astype(np.float32)
    idx = np.array(quantize_to_centroids(mx.array(x), c))
    brute = np.argmin(np.abs(x[:, None] - c[None, :].astype(np.float32)), axis=1)
    assert idx.dtype == np.uint32
    np.testing.assert_array_equal(idx, brute)


def test_codebook_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        lloyd_max_codebook(9, 128)
    with pytest.raises(ValueError, match="bits"):
        gaussian_lloyd_max(0)


# Theorem 1: D_mse <= sqrt(3)·π/2 · 4^-b for every b; the paper quotes ≈ 0.36, 0.117, 0.03,
# 0.009 for b = 1..4, i.e. the Gaussian Lloyd-Max MSE (the large-d limit).
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_turboquant_distortion_on_unit_vectors(bits):
    d = 128
    u = _unit(_randn(2048, d, seed=10 + bits))
    s = rotation_signs(d, 0, 0, "k")
    c = lloyd_max_codebook(bits, d)
    bound = math.sqrt(3) * math.pi / 2 * 4.0**-bits
    expected = d * codebook_mse(c, d)  # exact Lloyd-Max distortion for f_d, by quadrature
    for correction in (False, True):
        packed, norms = turboquant_quantize(u, s, c, bits, norm_correction=correction)
        err = mx.sum((u - turboquant_dequantize(packed, norms, s, c, bits)) ** 2, axis=-1)
        dist = mx.mean(err).item()
        assert dist <= bound
        if not correction:
            assert dist == pytest.approx(expected, rel=0.03)
            assert dist <= _GAUSSIAN_MSE[bits] * 1.01


# ----------------------------------------------------------------------------- packing


def _reference_pack(codes, bits):
    """Little-endian bit stream, bit by bit."""
    n = (codes.shape[-1] * bits + 31) // 32
    out = np.zeros((*codes.shape[:-1], n), dtype=np.uint64)
    for j in range(codes.shape[-1]):
        for k in range(bits):
            pos = j * bits + k
            out[..., pos // 32] |= ((codes[..., j].astype(np.uint64) >> k) & 1) << (pos % 32)
    return out


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("d", [64, 96, 128, 256, 5])
def test_pack_round_trip(bits, d):
    codes = np.random.default_rng(bits * d).integers(0, 2**bits, size=(2, 3, 4, d))
    codes = codes.astype(np.uint8)
    packed = pack_codes(mx.array(codes), bits)
    assert packed.dtype == mx.uint32
    assert packed.shape == (2, 3, 4, packed_words(d, bits)) == (2, 3, 4, math.ceil(d * bits / 32))
    np.testing.assert_array_equal(np.array(packed).astype(np.uint64), _reference_pack(codes, bits))
    out = unpack_codes(packed, bits, d)
    assert out.dtype == mx.uint32
    np.testing.assert_array_equal(np.array(out), codes)


def test_packed_sizes():
    assert [packed_words(128, b) for b in (2, 3, 4)] == [8, 12, 16]
    assert packed_words(64, 3) == 6 and packed_words(96, 5) == 15 and packed_words(5, 3) == 1
    with pytest.raises(ValueError, match="words"):
        unpack_codes(mx.zeros((2, 13), dtype=mx.uint32), 3, 128)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(mx.zeros((2, 8), dtype=mx.uint32), 0)


# ----------------------------------------------------------------------------- pipeline


def _cos(a, b):
    return mx.sum(a * b, -1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1))


@pytest.mark.parametrize("bits,min_cos", [(2, 0.93), (3, 0.98), (4, 0.995)])
def test_round_trip_cosine(bits, min_cos):
    d = 128
    x = 3.0 * _randn(2, 4, 256, d, seed=bits)
    s = rotation_signs(d, 0, 1, "v")
    c = lloyd_max_codebook(bits, d)
    packed, norms = turboquant_quantize(x, s, c, bits)
    assert packed.shape == (2, 4, 256, packed_words(d, bits)) and norms.shape == (2, 4, 256)
    x_hat = turboquant_dequantize(packed, norms, s, c, bits, d)
    assert x_hat.dtype == mx.float32 and x_hat.shape == x.shape
    assert mx.mean(_cos(x, x_hat)).item() >= min_cos


@pytest.mark.parametrize("d", [64, 256])
def test_norm_correction_keeps_length(d):
    x = _randn(64, d, seed=d) * mx.linspace(0.01, 100.0, 64)[:, None]
    s = rotation_signs(d, 7, 0, "k")
    c = lloyd_max_codebook(3, d)
    length = np.linalg.norm(np.array(x), axis=-1)
    x_hat = turboquant_dequantize(*turboquant_quantize(x, s, c, 3), s, c, 3)
    np.testing.assert_allclose(np.linalg.norm(np.array(x_hat), axis=-1), length, rtol=1e-5)
    # Without the correction the reconstruction is shorter on average: a Lloyd-Max output
    # has E[ĉ²] = E[y²] - MSE, so ||x̂|| ≈ ||x|| · sqrt(1 - d·MSE).
    x = _randn(4096, d, seed=d + 1)
    plain = turboquant_dequantize(*turboquant_quantize(x, s, c, 3, norm_correction=False), s, c, 3)
    ratio = mx.linalg.norm(plain, axis=-1) / mx.linalg.norm(x, axis=-1)
    assert mx.mean(ratio).item() == pytest.approx(math.sqrt(1 - d * codebook_mse(c, d)), abs=2e-3)


def test_rotated_domain_and_dtypes():
    d = 64
    x = _randn(3, 10, d).astype(mx.float16)
    s = rotation_signs(d, 0, 0, "k")
    c = lloyd_max_codebook(4, d)
    packed, norms = turboquant_quantize(x, s, c, 4, norms_dtype=mx.float16)
    assert norms.dtype == mx.float16
    y_hat = turboquant_dequantize_rotated(packed, norms, c, 4, d)
    x_hat = turboquant_dequantize(packed, norms, s, c, 4)
    np.testing.assert_allclose(np.array(rotate(x_hat, s)), np.array(y_hat), atol=1e-5)
    # q·k is the same in the rotated domain: attention can run there.
    q = _randn(3, 1, d, seed=5)
    np.testing.assert_allclose(
        np.array(rotate(q, s) @ y_hat.swapaxes(-1, -2)),
        np.array(q @ x_hat.swapaxes(-1, -2)),
        rtol=1e-4,
        atol=1e-4,
    )


def test_zero_vector():
    d = 128
    x = mx.concatenate([mx.zeros((1, d)), _randn(1, d)], axis=0)
    s = rotation_signs(d, 0, 0, "v")
    c = lloyd_max_codebook(2, d)
    packed, norms = turboquant_quantize(x, s, c, 2)
    x_hat = np.array(turboquant_dequantize(packed, norms, s, c, 2))
    assert np.all(np.isfinite(x_hat)) and np.array(norms)[0] == 0.0
    np.testing.assert_array_equal(x_hat[0], 0.0)


def test_pipeline_bad_codebook():
    with pytest.raises(ValueError, match="centroids"):
        turboquant_quantize(_randn(2, 64), rotation_signs(64, 0, 0, "k"), gaussian_lloyd_max(2), 3)


def test_pipeline_compiles():
    # Pure mx ops (no host round trips), so a cache may wrap the functions in mx.compile.
    d, bits = 64, 3
    x, s = _randn(2, 3, 16, d), rotation_signs(d, 0, 0, "k")
    c = mx.array(lloyd_max_codebook(bits, d), dtype=mx.float32)
    packed, norms = mx.compile(turboquant_quantize)(x, s, c, bits)
    ref_packed, ref_norms = turboquant_quantize(x, s, c, bits)
    assert mx.array_equal(packed, ref_packed).item()
    np.testing.assert_allclose(np.array(norms), np.array(ref_norms), rtol=1e-6)
    y = mx.compile(turboquant_dequantize_rotated)(packed, norms, c, bits, d)
    np.testing.assert_allclose(
        np.array(y), np.array(turboquant_dequantize_rotated(packed, norms, c, bits, d)), rtol=1e-6
    )


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5])
def test_centroid_lookup_selects_what_take_gathers(bits):
    """The select tree over a code's bits (a constant codebook, at most 4 bits) gives
    exactly mx.take's values, compiled or not; an mx.array codebook and longer codes
    take mx.take itself."""
    codebook = lloyd_max_codebook(bits, 64)
    idx = mx.random.randint(0, 1 << bits, (2, 3, 50, 64)).astype(mx.uint32)
    expected = mx.take(mx.array(codebook.astype(np.float32)), idx)
    compiled = mx.compile(lambda i: centroid_lookup(tuple(codebook.tolist()), i, bits))
    for got in (centroid_lookup(codebook, idx, bits), compiled(idx)):
        assert got.shape == idx.shape and got.dtype == mx.float32
        assert mx.array_equal(got, expected).item()
    as_array = centroid_lookup(mx.array(codebook.astype(np.float32)), idx, bits)
    assert mx.array_equal(as_array, expected).item()
    with pytest.raises(ValueError, match="1-D codebook"):
        centroid_lookup(codebook[:-1], idx, bits)
