"""Fused TurboQuant decode kernels against the pure-MLX reference.

On a machine without a GPU kernel backend (this CPU CI) the GPU cases are skipped and
the dispatch is checked to fall back to the reference. On the GPU machine run
`python tests/test_turboquant_kernels.py` (no pytest needed) or pytest.
"""

import itertools
import os
import sys

import mlx.core as mx
import numpy as np

try:
    import pytest
except ImportError:  # the GPU machine runs this file as a script
    pytest = None

from mlx_lm.models import turboquant_kernels as kernels
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.turboquant_attention import turboquant_scaled_dot_product_attention
from mlx_lm.models.turboquant_cache import RotatingTurboQuantKVCache, TurboQuantKVCache

BACKEND = kernels.fused_backend()


def reference(queries, cache, scale, mask):
    os.environ["MLX_LM_TURBO_REFERENCE"] = "1"
    try:
        return turboquant_scaled_dot_product_attention(queries, cache, scale, mask)
    finally:
        del os.environ["MLX_LM_TURBO_REFERENCE"]


def filled_cache(B, n_kv, T, D, bits, centering=True, ring=None, seed=0, chunks=1):
    mx.random.seed(seed)
    # Keys with a per-channel offset, like real ones, so the key means matter.
    k = mx.random.normal((B, n_kv, T, D)) + 2.0 * mx.random.normal((B, n_kv, 1, D))
    v = mx.random.normal((B, n_kv, T, D))
    if ring is None:
        cache = TurboQuantKVCache(bits, bits, key_centering=centering)
    else:
        cache = RotatingTurboQuantKVCache(ring, 4, 256, bits, bits, key_centering=centering)
    bounds = np.linspace(0, T, chunks + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            cache.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
    return cache


CASES = [
    # B, n_q, n_kv, L, T, D, bits, centering, ring, chunks
    (1, 4, 4, 1, 1, 64, 3, True, None, 1),
    (1, 9, 3, 1, 37, 64, 3, True, None, 1),
    (1, 9, 3, 1, 700, 64, 4, True, None, 1),
    (2, 28, 4, 1, 3000, 128, 3, True, None, 3),
    (1, 28, 4, 1, 5000, 128, 2, False, None, 1),
    (1, 8, 2, 4, 600, 128, 4, True, None, 1),
    (1, 4, 1, 4, 300, 256, 3, True, None, 1),
    (2, 8, 8, 3, 1200, 64, 3, True, None, 1),
    (1, 9, 3, 1, 900, 64, 3, True, 512, 900),  # wrapped ring, one token at a time
    (1, 8, 4, 1, 2500, 128, 4, True, 1024, 5),  # ring filled by chunks
]


def _check_case(B, n_q, n_kv, L, T, D, bits, centering, ring, chunks):
    cache = filled_cache(B, n_kv, T, D, bits, centering, ring, chunks=chunks)
    q = mx.random.normal((B, n_q, L, D))
    mask = "causal" if L > 1 else None
    assert kernels.supports(q, cache, mask)
    ref = reference(q, cache, D**-0.5, mask)
    fused = kernels.fused_decode_attention(q, cache, D**-0.5, mask, BACKEND)
    err = float(mx.max(mx.abs(fused - ref)))
    np.testing.assert_allclose(np.array(fused), np.array(ref), atol=2e-4, rtol=1e-3)
    return err


def test_dispatch_uses_reference_without_a_gpu_backend():
    cache = filled_cache(1, 2, 50, 64, 3)
    q = mx.random.normal((1, 4, 1, 64))
    ours = scaled_dot_product_attention(q, None, None, cache=cache, scale=0.125, mask=None)
    if BACKEND is None:
        np.testing.assert_array_equal(np.array(ours), np.array(reference(q, cache, 0.125, None)))
    # Long query blocks (prefill) and array masks always take the reference path.
    assert not kernels.supports(mx.zeros((1, 4, 9, 64)), cache, "causal")
    assert not kernels.supports(q, cache, mx.zeros((1, 50), mx.bool_))


def test_kernel_sources_share_one_body():
    cuda = kernels.kernel_sources("cuda")
    metal = kernels.kernel_sources("metal")
    assert cuda[1].endswith(kernels.PARTIAL_BODY) and metal[1].endswith(kernels.PARTIAL_BODY)
    assert cuda[2].endswith(kernels.MERGE_BODY) and metal[2].endswith(kernels.MERGE_BODY)
    assert cuda[0].endswith(kernels.HEADER) and metal[0].endswith(kernels.HEADER)


if pytest is not None:
    needs_gpu = pytest.mark.skipif(BACKEND is None, reason="no fused-kernel GPU backend here")

    @needs_gpu
    @pytest.mark.parametrize("case", CASES)
    def test_fused_matches_reference(case):
        _check_case(*case)


if __name__ == "__main__":
    print(f"backend: {BACKEND}, device: {mx.default_device()}")
    test_dispatch_uses_reference_without_a_gpu_backend()
    test_kernel_sources_share_one_body()
    if BACKEND is None:
        sys.exit("no fused-kernel backend: nothing to compare")
    failures = 0
    for case in CASES:
        try:
            print(case, f"max |fused - reference| = {_check_case(*case):.2e}", flush=True)
        except Exception as e:  # report every case, then fail
            failures += 1
            print(case, "FAILED:", str(e)[:2000], flush=True)
    sys.exit(1 if failures else 0)
