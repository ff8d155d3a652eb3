"""Fused TurboQuant decode kernels against the pure-MLX reference.

On a machine without a GPU kernel backend (this CPU CI) the GPU cases are skipped and
the dispatch is checked to fall back to the reference. On the GPU machine run
`python tests/test_turboquant_kernels.py` (no pytest needed) or pytest.
"""

import contextlib
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
from mlx_lm.models.turboquant_cache import (
    BatchTurboQuantKVCache,
    RotatingTurboQuantKVCache,
    TurboQuantKVCache,
)

BACKEND = kernels.fused_backend()


def reference(queries, cache, scale, mask):
    os.environ["MLX_LM_TURBO_REFERENCE"] = "1"
    try:
        return turboquant_scaled_dot_product_attention(queries, cache, scale, mask)
    finally:
        del os.environ["MLX_LM_TURBO_REFERENCE"]


def filled_cache(
    B,
    n_kv,
    T,
    D,
    bits,
    centering=True,
    ring=None,
    seed=0,
    chunks=1,
    scaling=False,
    window=0,
    decode_step=True,
):
    mx.random.seed(seed)
    # Keys with a per-channel offset and spread, like real ones, so means and scales matter.
    spread = mx.exp(mx.random.normal((1, 1, 1, D)))
    k = spread * mx.random.normal((B, n_kv, T, D)) + 2.0 * mx.random.normal((B, n_kv, 1, D))
    v = mx.random.normal((B, n_kv, T, D))
    if ring is None:
        cache = TurboQuantKVCache(
            bits, bits, key_centering=centering, key_scaling=scaling, fp16_window=window
        )
    else:
        cache = RotatingTurboQuantKVCache(
            ring, 4, 256, bits, bits, key_centering=centering, key_scaling=scaling
        )
    bounds = np.linspace(0, T, chunks + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            cache.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
    if window and T and decode_step:
        # A decode step: the update that coded the fill's tokens read them in float16;
        # the next one reads them through their codes.
        cache.update_and_fetch(k[:, :, -1:], v[:, :, -1:])
    return cache


def batch_cache(lengths, n_kv, D, bits, scaling, window, steps=3):
    """A left-padded batch from single caches of different lengths, then a few decode
    steps (rows slide their windows and open segments at different slots)."""
    singles = [
        filled_cache(1, n_kv, n, D, bits, scaling=scaling, window=window, seed=i)
        for i, n in enumerate(lengths)
    ]
    batch = BatchTurboQuantKVCache.merge(singles)
    for _ in range(steps):
        batch.update_and_fetch(
            mx.random.normal((len(lengths), n_kv, 1, D)),
            mx.random.normal((len(lengths), n_kv, 1, D)),
        )
    return batch


def case(n_q, n_kv, T, D=128, bits=3, B=1, L=1, centering=True, ring=None, chunks=1, **kw):
    return dict(
        B=B,
        n_q=n_q,
        n_kv=n_kv,
        L=L,
        T=T,
        D=D,
        bits=bits,
        centering=centering,
        ring=ring,
        chunks=chunks,
        scaling=kw.get("scaling", False),
        window=kw.get("window", 0),
        lengths=kw.get("lengths"),
    )


# Acceptance grid (GPU): head_dim 64/128/256, GQA 1/3/4/7, contexts that are and are not
# multiples of the split and warp sizes, batch 1 and 4, rings, query blocks of 1-4, and
# the defaults (key scaling with a float16 window of 64) for single and batch caches.
CASES = [
    case(4, 4, 1, D=64),
    case(9, 3, 37, D=64),
    case(9, 3, 700, D=64, bits=4),
    case(28, 4, 3000, B=2, chunks=3),
    case(28, 4, 5000, bits=2, centering=False),
    case(8, 2, 600, L=4, bits=4),
    case(4, 1, 300, D=256, L=2),
    case(8, 8, 1200, D=64, B=2, L=3),
    case(9, 3, 900, D=64, ring=512, chunks=900),  # wrapped ring, one token at a time
    case(8, 4, 2500, bits=4, ring=1024, chunks=5),  # ring filled by chunks
    case(8, 2, 500, D=96),  # not a power of two: rotated on the host
    case(28, 4, 4100, B=4, chunks=2),  # batch 4, many splits
    case(28, 4, 3000, scaling=True, window=64),  # the defaults
    case(28, 4, 700, L=3, scaling=True, window=64, chunks=2),
    case(4, 1, 2100, D=256, scaling=True, window=64),
    case(8, 2, 300, D=96, window=64),
    case(9, 3, 700, D=64, ring=512, scaling=True, chunks=700),
    case(28, 4, 0, scaling=True, window=64, lengths=[2100, 40, 700, 1500]),  # batch 4
    case(8, 2, 0, D=64, L=2, scaling=True, window=16, lengths=[300, 90]),
]
# What the CPU emulator (tests/kernel_emulator.py) runs in CI: small, and one of each
# code path (splits, segments, scaling, window, causal blocks, rings, batches, D=96).
EMULATED_CASES = [
    case(9, 3, 37, D=64),
    case(8, 2, 400, L=4, bits=4),
    case(8, 2, 700, D=64, scaling=True, window=64, chunks=2),
    case(4, 2, 300, L=3, D=64, scaling=True, window=16),
    case(4, 1, 300, D=256, L=2, centering=False),
    case(6, 3, 400, D=64, ring=256, scaling=True, chunks=400),
    case(8, 2, 300, D=96, window=64),
    case(8, 2, 0, D=64, L=2, scaling=True, window=16, lengths=[300, 90, 150]),
]


def make_case_cache(c):
    if c["lengths"] is not None:
        return batch_cache(c["lengths"], c["n_kv"], c["D"], c["bits"], c["scaling"], c["window"])
    return filled_cache(
        c["B"],
        c["n_kv"],
        c["T"],
        c["D"],
        c["bits"],
        c["centering"],
        c["ring"],
        chunks=c["chunks"],
        scaling=c["scaling"],
        window=c["window"],
    )


def _check_case(c, backend=BACKEND):
    cache = make_case_cache(c)
    B = c["B"] if c["lengths"] is None else len(c["lengths"])
    q = mx.random.normal((B, c["n_q"], c["L"], c["D"]))
    mask = "causal" if c["L"] > 1 else None
    if c["lengths"] is not None and c["L"] > 1:
        cache.update_and_fetch(
            mx.random.normal((B, c["n_kv"], c["L"], c["D"])),
            mx.random.normal((B, c["n_kv"], c["L"], c["D"])),
        )
        mask = cache.make_mask(c["L"], return_array=True)
    assert kernels.supports(q, cache, mask)
    scale = c["D"] ** -0.5
    with mx.stream(mx.cpu):  # exact float32 (GPU matmuls may round like TF32)
        ref = reference(q, cache, scale, mask)
    fused = kernels.fused_decode_attention(q, cache, scale, mask, backend)
    err = float(mx.max(mx.abs(fused - ref)) / mx.max(mx.abs(ref)))
    np.testing.assert_allclose(np.array(fused), np.array(ref), atol=2e-4, rtol=1e-3)
    return err


QUANTIZE_CASES = [(64, 2, True), (64, 3, False), (128, 3, True), (128, 4, True), (256, 3, False)]
QUANTIZE_SCALED = (128, 3, True)  # keys times 1/σ, minus μ/σ (key scaling)


def _check_quantize(D, bits, with_mean, backend=BACKEND, tokens=70, with_scale=False):
    """Keys (minus a mean) and values of other bits in one launch, against the
    reference quantizer."""
    from mlx_lm.models.turboquant import turboquant_quantize
    from mlx_lm.models.turboquant_codebook import lloyd_max_codebook
    from mlx_lm.models.turboquant_packing import unpack_codes
    from mlx_lm.models.turboquant_rotation import rotation_signs

    mx.random.seed(D + bits)
    x = (3.0 * mx.random.normal((2, 3, tokens, D))).astype(mx.float16)
    values = mx.random.normal((2, 3, tokens, D)).astype(mx.float16)
    mean = mx.random.normal((2, 3, 1, D)) if with_mean else None
    scale = mx.exp(mx.random.normal((2, 3, 1, D))) if with_scale else None
    coded = x.astype(mx.float32) * (1.0 if scale is None else scale)
    value_bits = 5 - bits if bits < 4 else 4
    kinds = [
        (coded - mean if with_mean else coded, rotation_signs(D, 0, 1, "k"), bits),
        (values, rotation_signs(D, 0, 1, "v"), value_bits),
    ]
    codebooks = [mx.array(lloyd_max_codebook(b, D), dtype=mx.float32) for _, _, b in kinds]
    fused = kernels.fused_quantize(
        x,
        mean,
        values,
        kinds[0][1],
        codebooks[0],
        bits,
        kinds[1][1],
        codebooks[1],
        value_bits,
        backend,
        scale=scale,
    )
    differing = 0.0
    for (ref_x, signs, b), codebook, packed, norms in zip(
        kinds, codebooks, fused[::2], fused[1::2]
    ):
        ref_packed, ref_norms = turboquant_quantize(ref_x, signs, codebook, b)
        same = float(mx.mean(unpack_codes(packed, b, D) == unpack_codes(ref_packed, b, D)))
        # Float32 summation order differs from mx.hadamard_transform: a value sitting on
        # a centroid boundary may round to the other side, nothing more.
        assert same > 0.999, same
        assert norms.dtype == mx.float16
        np.testing.assert_allclose(np.array(norms), np.array(ref_norms), rtol=2e-3)
        differing = max(differing, 1 - same)
    return differing


DEQUANT_CASES = [
    dict(kind="single", D=64, bits=3, scaling=True, window=16),  # the defaults
    dict(kind="single", D=128, bits=4, scaling=False, window=0),  # centering only
    dict(kind="single", D=64, bits=2, centering=False),
    dict(kind="ring", D=64, bits=3, scaling=True),
    dict(kind="batch", D=64, bits=3, scaling=True, window=16),
    dict(kind="single", D=256, bits=3, scaling=True, window=16),  # eight values a lane
]


def _check_dequantize(c, backend=BACKEND, T=100, dtypes=(mx.float32, mx.float16)):
    """The caches' dequantized context on the fused path (`fused_dequantize`, what a
    prefill chunk reads) against their reference path: rotated domain and model domain,
    float32 and float16, for single, ring and batch caches."""
    from mlx_lm.models import turboquant_cache

    D, bits = c["D"], c["bits"]
    if c["kind"] == "batch":
        cache = batch_cache([T, T // 3], 2, D, bits, c["scaling"], c["window"], steps=2)
    else:
        cache = filled_cache(
            1,
            2,
            T,
            D,
            bits,
            centering=c.get("centering", True),
            ring=64 if c["kind"] == "ring" else None,
            chunks=3 if c["kind"] == "ring" else 2,
            scaling=c.get("scaling", False),
            window=c.get("window", 0),
        )
    original = turboquant_cache.fused_backend
    worst = 0.0
    try:
        for dtype in dtypes:
            out = {}
            for fused in (True, False):
                turboquant_cache.fused_backend = (lambda: backend) if fused else (lambda: None)
                out[fused] = [*cache.coded_keys_values(dtype), *cache.dequantized(dtype)]
                mx.eval(out[fused])
            if c.get("window") and c["kind"] == "single":
                # What a prefill chunk reads on a GPU: codes of [0, recent_start), then
                # the float16 window (which holds the tokens the chunk coded), from one
                # launch; against the reference's codes joined to the window.
                chunked = filled_cache(
                    1, 2, T, D, bits, scaling=c["scaling"], window=c["window"], chunks=2,
                    decode_step=False,
                )  # fmt: skip
                first = chunked.recent_start
                assert 0 < first < chunked.coded < chunked.offset
                turboquant_cache.fused_backend = lambda: None
                coded = chunked.dequantized(dtype)
                turboquant_cache.fused_backend = lambda: backend
                out[True].extend(chunked.read_context(dtype))
                window = (chunked.recent_keys, chunked.recent_values)
                for x, recent in zip(coded, window):
                    out[False].append(mx.concatenate([x[:, :, :first], recent.astype(dtype)], 2))
                mx.eval(out[True])
            for a, b in zip(out[True], out[False], strict=True):
                assert a.dtype == b.dtype == dtype and a.shape == b.shape
                a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
                # float32: summation order only; float16: one rounding of either.
                tol = 1e-5 if dtype == mx.float32 else 2e-3
                np.testing.assert_allclose(a, b, atol=tol * np.abs(b).max(), rtol=tol)
                worst = max(worst, float(np.abs(a - b).max() / np.abs(b).max()))
    finally:
        turboquant_cache.fused_backend = original
    return worst


def _check_long_calls(c, backend, monkeypatch):
    """Calls of more than LONG_KERNEL_GROUPS thread groups (here: every call) run the
    partial kernel compiled with launch bounds (its template's MINB): the same logic,
    so the same results as the reference."""
    flavour, make = kernels.KERNEL_MAKERS[backend]
    names = []

    def recording(name, **kw):
        kernel = make()(name=name, **kw)

        def call(**args):
            names.append(name)
            return kernel(**args)

        return call

    monkeypatch.setitem(kernels.KERNEL_MAKERS, backend, (flavour, lambda: recording))
    monkeypatch.setattr(kernels, "LONG_KERNEL_GROUPS", 0)
    monkeypatch.setattr(kernels, "_COMPILED_ATTENDS", {})
    kernels._specialised.cache_clear()
    kernels._decode_kernels.cache_clear()
    try:
        _check_case(c, backend)
    finally:
        kernels._specialised.cache_clear()
        kernels._decode_kernels.cache_clear()
    partials = [n for n in names if n.startswith("turboquant_decode_partial")]
    assert partials and all(n.endswith("_MINB4") for n in partials)


def real_attention_inputs(model, tokens, layers):
    """{layer: (queries of every position, keys, values, scale)} of a real model over
    `tokens`: keys and values from its FP16 cache (after RoPE and any key norm), queries
    as its attention received them."""
    import importlib

    from mlx_lm.models.cache import KVCache, make_prompt_cache

    module = importlib.import_module(type(model).__module__)
    original = module.scaled_dot_product_attention
    calls = []

    def capture(queries, keys, values, cache, scale, mask, **kw):
        calls.append((queries, scale))
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, **kw)

    module.scaled_dot_product_attention = capture
    try:
        cache = make_prompt_cache(model)
        model(mx.array(tokens)[None], cache=cache)
    finally:
        module.scaled_dot_product_attention = original
    out = {}
    for i in layers:
        assert type(cache[i]) is KVCache, "take layers with a full (not sliding) cache"
        keys, values = cache[i].state
        out[i] = (calls[i][0], keys, values, calls[i][1])
    return out


def check_real_layer(queries, keys, values, scale, backend=BACKEND, L=1, bits=3):
    """The defaults (key scaling, float16 window 64) on a real layer's keys and values:
    the kernel against the reference for the last L queries, after a prefill of the
    tokens before them (which codes all but 64) and a step of the last L tokens."""
    cache = TurboQuantKVCache(bits, bits, key_scaling=True, fp16_window=64)
    cache.update_and_fetch(keys[:, :, :-L], values[:, :, :-L])
    cache.update_and_fetch(keys[:, :, -L:], values[:, :, -L:])
    assert 0 < cache.recent_start == cache.coded
    q = queries[:, :, -L:]
    mask = "causal" if L > 1 else None
    assert kernels.supports(q, cache, mask)
    with mx.stream(mx.cpu):
        ref = reference(q, cache, scale, mask)
    fused = kernels.fused_decode_attention(q, cache, scale, mask, backend)
    np.testing.assert_allclose(np.array(fused), np.array(ref), atol=2e-4, rtol=1e-3)
    return float(mx.max(mx.abs(fused - ref)) / mx.max(mx.abs(ref)))


def test_dispatch_uses_reference_without_a_gpu_backend():
    cache = filled_cache(1, 2, 50, 64, 3)
    q = mx.random.normal((1, 4, 1, 64))
    ours = scaled_dot_product_attention(q, None, None, cache=cache, scale=0.125, mask=None)
    if BACKEND is None:
        np.testing.assert_array_equal(np.array(ours), np.array(reference(q, cache, 0.125, None)))
    # Long query blocks (prefill) and array masks on single caches take the reference.
    assert not kernels.supports(mx.zeros((1, 4, 9, 64)), cache, "causal")
    assert not kernels.supports(q, cache, mx.zeros((1, 50), mx.bool_))
    # So does a cache whose tokens are all still in the float16 window.
    assert not kernels.supports(q, filled_cache(1, 2, 50, 64, 3, window=64), None)


def test_fused_attention_refuses_calls_the_kernels_do_not_take():
    """fused_decode_attention on a call that supports() rejects names the problem and the
    dispatch to use; try_fused_decode_attention returns None for it (the dispatch then
    takes the reference), and neither changes the cache."""
    windowed = filled_cache(1, 2, 50, 64, 3, window=64)  # nothing coded yet
    cache = filled_cache(1, 2, 50, 64, 3)
    long_block = mx.zeros((1, 4, 9, 64))  # a prefill-sized query block
    for c, q, mask in [(windowed, mx.zeros((1, 4, 1, 64)), None), (cache, long_block, "causal")]:
        offset = c.offset
        assert not kernels.supports(q, c, mask)
        assert kernels.try_fused_decode_attention(q, c, 0.125, mask, "cuda") is None
        with pytest.raises(
            ValueError, match=r"do not take queries of shape .*\(see supports\(\)\)"
        ):
            kernels.fused_decode_attention(q, c, 0.125, mask, "cuda")
        assert c.offset == offset


def test_reference_variable_is_read_at_each_call(monkeypatch):
    """MLX_LM_TURBO_REFERENCE is read from the environment's own dict (os.environ.get is
    slow for unset names): set, changed and removed at run time, as tests and benchmarks
    do, it is seen at the next call."""
    monkeypatch.delenv("MLX_LM_TURBO_REFERENCE", raising=False)
    assert not kernels._forced_reference()
    for value, forced in [("1", True), ("0", False), ("", False), ("yes", True)]:
        monkeypatch.setenv("MLX_LM_TURBO_REFERENCE", value)
        assert kernels._forced_reference() is forced, value
        if forced:
            assert kernels.fused_backend() is None
    monkeypatch.delenv("MLX_LM_TURBO_REFERENCE")
    assert not kernels._forced_reference()
    assert kernels.fused_backend() == BACKEND


def test_kernel_sources_share_one_body():
    cuda = kernels.kernel_sources("cuda")
    metal = kernels.kernel_sources("metal")
    assert cuda[1].endswith(kernels.PARTIAL_BODY) and metal[1].endswith(kernels.PARTIAL_BODY)
    assert cuda[2].endswith(kernels.MERGE_BODY) and metal[2].endswith(kernels.MERGE_BODY)
    assert cuda[0].endswith(kernels.HEADER) and metal[0].endswith(kernels.HEADER)
    assert cuda[4].endswith(kernels.DEQUANT_BODY) and metal[4].endswith(kernels.DEQUANT_BODY)
    for i, body in ((5, kernels.SEGMENT_SUMS_BODY), (6, kernels.SEGMENT_STATS_BODY)):
        assert cuda[i].endswith(body) and metal[i].endswith(body)


if pytest is not None:
    needs_gpu = pytest.mark.skipif(BACKEND is None, reason="no fused-kernel GPU backend here")

    @needs_gpu
    @pytest.mark.parametrize("c", CASES)
    def test_fused_matches_reference(c):
        _check_case(c)

    @needs_gpu
    @pytest.mark.parametrize("c", [CASES[i] for i in (3, 11, 12, 17)])
    def test_fused_long_calls_take_the_bounded_kernel(c, monkeypatch):
        _check_long_calls(c, BACKEND, monkeypatch)

    @needs_gpu
    def test_compiled_decode_graph_matches_plain(monkeypatch):
        """On a GPU a decode call's graph comes from a compiled function, traced again
        when an input's shape changes (the number of splits, a grown buffer): decode
        steps of a single cache from 1000 tokens (new splits every 128 tokens, a block
        coded every 64 steps) and of a left-padded batch give the plain calls' outputs
        bitwise."""
        mx.random.seed(0)
        single = TurboQuantKVCache(3, 3, key_scaling=True, fp16_window=64)
        single.update_and_fetch(*mx.random.normal((2, 1, 4, 1000, 128)).astype(mx.float16))
        batch = batch_cache([700, 300], 4, 128, 3, True, 64)
        for cache, steps in ((single, 300), (batch, 130)):
            B = cache.packed_keys.shape[0]
            for _ in range(steps):
                cache.update_and_fetch(*mx.random.normal((2, B, 4, 1, 128)).astype(mx.float16))
                q = mx.random.normal((B, 28, 1, 128)).astype(mx.float16)
                out = []
                for compiled in (True, False):
                    monkeypatch.setattr(kernels, "COMPILE_DECODE", compiled)
                    out.append(kernels.fused_decode_attention(q, cache, 128**-0.5, None, BACKEND))
                assert mx.array_equal(out[0], out[1])

    @needs_gpu
    def test_layers_share_one_compiled_decode_call(monkeypatch):
        """Caches of different layers (their own rotations and key means) whose calls
        have one kernel layout share one compiled function, and each still gets its own
        output: the plain calls', bitwise."""
        mx.random.seed(1)
        caches = [
            TurboQuantKVCache(3, 3, layer_idx=i, key_scaling=True, fp16_window=64) for i in range(3)
        ]
        for cache in caches:
            cache.update_and_fetch(*mx.random.normal((2, 1, 4, 700, 128)).astype(mx.float16))
        q = mx.random.normal((1, 28, 1, 128)).astype(mx.float16)
        monkeypatch.setattr(kernels, "_COMPILED_ATTENDS", {})
        for cache in caches:
            out = []
            for compiled in (True, False):
                monkeypatch.setattr(kernels, "COMPILE_DECODE", compiled)
                out.append(kernels.fused_decode_attention(q, cache, 128**-0.5, None, BACKEND))
            assert mx.array_equal(out[0], out[1])
        assert len(kernels._COMPILED_ATTENDS) == 1

    @needs_gpu
    @pytest.mark.parametrize("c", QUANTIZE_CASES)
    def test_fused_quantize_matches_reference(c):
        _check_quantize(*c)

    @contextlib.contextmanager
    def patched_merge_body(monkeypatch, old: str, new: str):
        """The decode kernels built, for the block, from MERGE_BODY with `old` (which must
        occur) replaced by `new`; the kernels and split bounds made before and during it
        are dropped on both sides (tests also change the split constants)."""
        patched = kernels.MERGE_BODY.replace(old, new)
        assert patched != kernels.MERGE_BODY
        monkeypatch.setattr(kernels, "MERGE_BODY", patched)
        caches = (kernels._specialised, kernels._decode_kernels, kernels.split_bounds)
        for made in caches:
            made.cache_clear()
        try:
            yield
        finally:
            for made in caches:
                made.cache_clear()

    @pytest.fixture(scope="module")
    def emulated():
        import kernel_emulator

        kernel_emulator.register()
        return "emulate"

    @pytest.mark.parametrize("tensor_cores", [True, False], ids=["mma", "per-lane"])
    @pytest.mark.parametrize("c", EMULATED_CASES)
    def test_emulated_kernel_matches_reference(c, tensor_cores, emulated, monkeypatch):
        """The CUDA kernel source, run on the CPU (one thread per GPU thread), against
        the reference: this CI's check of the kernels' logic, both the tensor-core path
        (mma.sync emulated from its fragment layouts) and the per-lane one, which Metal
        runs."""
        monkeypatch.setattr(kernels, "TENSOR_CORES", tensor_cores)
        _check_case(c, emulated)

    @pytest.mark.parametrize("c", [EMULATED_CASES[2], EMULATED_CASES[7]], ids=["window", "batch"])
    def test_emulated_long_calls_take_the_bounded_kernel(c, emulated, monkeypatch):
        _check_long_calls(c, emulated, monkeypatch)

    @pytest.mark.slow
    def test_emulated_kernel_on_real_smollm2_layer(emulated, smollm2, prose):
        """Real keys and values (SmolLM2, 200 tokens of prose, a middle layer)."""
        model, tokenizer = smollm2
        tokens = tokenizer.encode(prose)[:200]
        ((q, k, v, scale),) = real_attention_inputs(model, tokens, [15]).values()
        check_real_layer(q, k, v, scale, emulated, L=2)

    @pytest.mark.parametrize("c", DEQUANT_CASES)
    def test_emulated_dequantize_matches_reference(c, emulated):
        # float16 output (what prefill reads) once: the emulator is slow.
        dtypes = (mx.float32, mx.float16) if c is DEQUANT_CASES[0] else (mx.float32,)
        _check_dequantize(c, emulated, T=100 if c["D"] < 256 else 80, dtypes=dtypes)

    @needs_gpu
    @pytest.mark.parametrize("c", DEQUANT_CASES)
    def test_fused_dequantize_matches_reference(c):
        _check_dequantize(c, T=3000)

    @pytest.mark.parametrize("D, bits, with_mean", [(64, 3, True), (32, 2, True), (256, 8, False)])
    def test_emulated_quantize_matches_reference(D, bits, with_mean, emulated):
        """A warp per vector: lanes holding one (D 32) to eight (D 256) coordinates,
        and packed words past the warp's 32 lanes (8 bits at D 256: 64 words)."""
        _check_quantize(D, bits, with_mean, emulated, tokens=6, with_scale=with_mean)

    def test_emulated_prefill_chunk_attention(emulated, monkeypatch):
        """A prefill chunk's attention on the GPU path (codes and float16 window from
        one dequantize launch, attended in the model's domain) against the reference
        (rotated domains, codes and window joined), for a chunk that codes tokens."""
        from mlx_lm.models import turboquant_attention, turboquant_cache

        mx.random.seed(3)
        k, v = mx.random.normal((2, 1, 2, 100, 64))
        q = mx.random.normal((1, 4, 60, 64))
        out = []
        for backend in (emulated, None):
            for module in (turboquant_attention, turboquant_cache):
                monkeypatch.setattr(module, "fused_backend", lambda: backend)
            cache = TurboQuantKVCache(3, 3, key_scaling=True, fp16_window=16)
            cache.update_and_fetch(k[:, :, :40], v[:, :, :40])
            cache.update_and_fetch(k[:, :, 40:], v[:, :, 40:])
            assert 0 < cache.recent_start < cache.coded  # codes and window both read
            out.append(
                turboquant_attention.turboquant_scaled_dot_product_attention(
                    q, cache, 0.125, "causal"
                )
            )
        np.testing.assert_allclose(np.array(out[0]), np.array(out[1]), atol=2e-4, rtol=1e-3)

    def test_dequantize_refuses_a_window_outside_the_model_domain():
        """The float16 window's rows can follow only codes in the model's domain."""
        cache = filled_cache(1, 2, 40, 64, 3)
        pk, kn, pv, vn = cache._buffers()
        window = (mx.zeros((1, 2, 4, 64), mx.float16),) * 2
        with pytest.raises(ValueError, match="model's domain: it needs inverse=True"):
            kernels.fused_dequantize(
                pk, kn, pv, vn, cache._segment_ids(), None, None, cache.key_signs,
                cache.value_signs, cache.key_centroids, cache.value_centroids, 3, 3,
                False, mx.float16, "cuda", 40, window,
            )  # fmt: skip

    @pytest.mark.parametrize(
        "D, scaling, updates",
        [
            (32, False, ((0, 40), (40, 128), (128, 131))),
            (128, True, ((0, 20), (20, 40), (40, 128), (128, 129), (129, 131))),
        ],
    )
    def test_emulated_segment_stats_match_reference(D, scaling, updates, emulated, monkeypatch):
        """Opening a key-mean segment on the GPU path (the segment sums and stats
        kernels) gives the reference's means and scales, and so its codes: from an
        update's own piece, from stored rows and a piece (a segment that began before
        the update), and from stored rows alone (a one-token update)."""
        from mlx_lm.models import turboquant_attention, turboquant_cache

        mx.random.seed(5)
        k = mx.random.normal((1, 2, 131, D)) * 0.5 + mx.random.normal((1, 2, 1, D)) * 2
        v = mx.random.normal((1, 2, 131, D))
        caches = []
        for backend in (emulated, None):
            for module in (turboquant_attention, turboquant_cache):
                monkeypatch.setattr(module, "fused_backend", lambda: backend)
            cache = TurboQuantKVCache(3, 3, key_scaling=scaling, fp16_window=0)
            for a, b in updates:
                cache.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
            caches.append(cache)
        gpu, ref = caches
        assert gpu.segments_held == ref.segments_held == 3
        stats = [(gpu.key_means, ref.key_means)]
        stats += [(gpu.key_scales, ref.key_scales)] if scaling else []
        for ours, theirs in stats:
            ours, theirs = np.array(ours, np.float32), np.array(theirs, np.float32)
            np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)
        codes = np.array(gpu.packed_keys[:, :, :131]) != np.array(ref.packed_keys[:, :, :131])
        assert codes.mean() < 0.01

    def test_emulated_batch_segment_opening_matches_reference(emulated, monkeypatch):
        """A left-padded batch opens each row's segment in a decode step from that row's
        stored codes (its heads and padded slots, read in place) as the reference does."""
        from mlx_lm.models import turboquant_attention, turboquant_cache

        batches = []
        for backend in (emulated, None):
            for module in (turboquant_attention, turboquant_cache):
                monkeypatch.setattr(module, "fused_backend", lambda: backend)
            mx.random.seed(7)
            batches.append(batch_cache([30, 20], 2, 64, 3, scaling=True, window=0, steps=13))
        gpu, ref = batches
        assert gpu.segments_held_by == ref.segments_held_by == [2, 2]  # row 1 padded
        for ours, theirs in ((gpu.key_means, ref.key_means), (gpu.key_scales, ref.key_scales)):
            ours, theirs = np.array(ours, np.float32), np.array(theirs, np.float32)
            np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-3)

    def test_segment_stats_refuse_more_than_two_sources():
        """The sums kernel reads the stored rows and one update piece at most."""
        cache = filled_cache(1, 2, 40, 64, 3)
        source = (cache.packed_keys, cache.key_norms, 0, 0, 8)
        with pytest.raises(ValueError, match="reads one or two sources, got 3"):
            kernels.fused_segment_stats(
                [source] * 3, (1, 2), None, cache.key_signs, cache.key_centroids, 3, 32,
                True, (0.5, 0.05), "cuda",
            )  # fmt: skip

    def test_emulated_quantize_reads_rows_in_place(emulated):
        """Rows [a, b) of keys and [c, d) of values, read where they lie (a prefill's
        segment piece), code as those rows sliced out would."""
        from mlx_lm.models.turboquant_codebook import lloyd_max_codebook
        from mlx_lm.models.turboquant_rotation import rotation_signs

        D = 64
        keys = mx.random.normal((2, 3, 11, D)).astype(mx.float16)
        values = mx.random.normal((2, 3, 9, D)).astype(mx.float16)
        mean = mx.random.normal((2, 3, 1, D))
        signs = rotation_signs(D, 0, 1, "k"), rotation_signs(D, 0, 1, "v")
        books = [mx.array(lloyd_max_codebook(b, D), dtype=mx.float32) for b in (3, 2)]
        args = (signs[0], books[0], 3, signs[1], books[1], 2, emulated)
        whole = kernels.fused_quantize(keys[:, :, 4:9], mean, values[:, :, 2:8], *args)
        rows = kernels.fused_quantize(keys, mean, values, *args, key_rows=(4, 9), value_rows=(2, 8))
        for a, b in zip(whole, rows):
            assert a.shape == b.shape and mx.array_equal(a, b)

    def test_emulated_fused_quantize_through_the_caches(emulated, monkeypatch):
        """The caches' GPU coding path (one fused launch, 1/σ and μ/σ kept per segment)
        against their CPU path, for a single cache and a batch cache with key scaling
        and a window: the same codes and norms."""
        from mlx_lm.models import turboquant_cache

        def fill(fused):
            monkeypatch.setattr(
                turboquant_cache, "fused_backend", lambda: emulated if fused else None
            )
            single = filled_cache(1, 1, 150, 64, 3, scaling=True, window=16, chunks=2)
            batch = batch_cache([150, 60], 1, 64, 3, True, 16, steps=2)
            return [x for c in (single, batch) for x in c._buffers()]

        for fused, ref in zip(fill(True), fill(False)):
            if fused.dtype == mx.uint32:
                assert float(mx.mean(fused == ref)) > 0.99
            else:
                np.testing.assert_allclose(np.array(fused), np.array(ref), rtol=2e-3)

    def test_emulator_reports_a_barrier_that_only_some_threads_reach(emulated, monkeypatch):
        import kernel_emulator

        monkeypatch.setattr(kernel_emulator, "BARRIER_TIMEOUT_S", 1)
        kernel = kernel_emulator.emulated_kernel(
            "stuck", ["x"], ["y"], "if (threadIdx.x == 0) { __syncthreads(); }\ny[0] = x[0];\n"
        )
        with pytest.raises(AssertionError, match="non-uniform branch"):
            kernel(
                inputs=[mx.zeros((1,))],
                template=[],
                grid=(64, 1, 1),
                threadgroup=(64, 1, 1),
                output_shapes=[(1,)],
                output_dtypes=[mx.float32],
            )

    @pytest.mark.parametrize(
        "c",
        [
            case(4, 2, 300, L=3, D=64, scaling=True, window=16),
            case(8, 2, 0, D=64, L=2, scaling=True, window=16, lengths=[300, 90, 150]),
        ],
    )
    def test_emulated_merge_reads_a_long_window_in_chunks(c, emulated, monkeypatch):
        """The merge kernel takes the float16 window CW tokens at a time (online softmax
        across chunks, the next chunk's keys loaded while a chunk's values are summed;
        CW = 64 at head_dim 64): here chunks of 6 tokens, the last of a window mostly
        empty, and threads whose token lies past the chunk."""
        with patched_merge_body(monkeypatch, "constexpr int CW = D / TS;", "constexpr int CW = 6;"):
            _check_case(c, emulated)

    @pytest.mark.parametrize(
        "c",
        [
            case(4, 2, 420, D=64, scaling=True, window=16),
            case(8, 2, 0, D=64, L=2, window=16, lengths=[420, 90, 250]),
        ],
    )
    def test_emulated_merge_takes_the_splits_in_chunks(c, emulated, monkeypatch):
        """The merge kernel reads the splits' maxima and sums SC at a time (a running
        maximum across chunks) and sums every 4th split's output per thread: here chunks
        of 3 splits over about 12 splits a row (32 slots a split), so that chunks, empty
        splits of the shorter rows and counts that are not multiples of 4 all occur."""
        monkeypatch.setattr(kernels, "MIN_TOKENS_PER_SPLIT", 32)
        monkeypatch.setattr(kernels, "TARGET_GROUPS", 1024)
        monkeypatch.setattr(kernels, "_DECODE_PARAMS", {})  # (its bounds: 128-slot splits)
        with patched_merge_body(monkeypatch, "constexpr int SC = D;", "constexpr int SC = 3;"):
            _check_case(c, emulated)

    def test_emulated_decode_across_a_new_key_mean_segment(emulated):
        """A decode call's fixed inputs (`DecodeCall`: the segment means and scales among
        them) are kept with the cache between steps and made anew when a token opens a
        key-mean segment (position 128 here): every step matches the reference."""
        mx.random.seed(5)
        cache = TurboQuantKVCache(3, 3, key_scaling=True)
        x = mx.random.normal((1, 2, 126, 64))
        cache.update_and_fetch(x, x * 0.5 + 0.3)
        for _ in range(4):  # positions 126..129
            k = mx.random.normal((1, 2, 1, 64)) * 2 + 1
            cache.update_and_fetch(k, mx.random.normal((1, 2, 1, 64)))
            q = mx.random.normal((1, 4, 1, 64))
            with mx.stream(mx.cpu):
                ref = reference(q, cache, 0.125, None)
            fused = kernels.fused_decode_attention(q, cache, 0.125, None, emulated)
            np.testing.assert_allclose(np.array(fused), np.array(ref), atol=2e-4, rtol=1e-3)
        assert cache.segments_held == 3  # segments [0, 32), [32, 128), [128, ...)

    def test_emulated_decode_reads_the_window_buffers(emulated):
        """Decode steps write the float16 window into preallocated buffers, which the
        merge kernel reads from slot window_base on: after a block is coded (the window
        then starts past the buffers' first slot) and after the buffers are made anew
        (2W + 64 slots: here once 64 or more steps are written), and after trims, every
        checked step matches the reference."""
        mx.random.seed(6)
        W = 8
        cache = TurboQuantKVCache(3, 3, key_scaling=True, fp16_window=W)
        x = mx.random.normal((1, 2, 100, 64))
        cache.update_and_fetch(x, x * 0.5 + 0.3)
        bases, checked = set(), 0
        for step in range(78):
            if step in (75, 77):  # speculative decoding's rejections: the buffers stay
                before = cache.recent_keys
                cache.trim(2)
                assert mx.array_equal(cache.recent_keys, before[:, :, :-2])
            k = mx.random.normal((1, 2, 1, 64)) * 2 + 1
            cache.update_and_fetch(k, mx.random.normal((1, 2, 1, 64)))
            bases.add(cache.window_base)
            if step in (0, 9, 10, 70, 74, 75, 77):
                q = mx.random.normal((1, 4, 1, 64))
                with mx.stream(mx.cpu):
                    ref = reference(q, cache, 0.125, None)
                fused = kernels.fused_decode_attention(q, cache, 0.125, None, emulated)
                np.testing.assert_allclose(np.array(fused), np.array(ref), atol=2e-4, rtol=1e-3)
                checked += cache.window_base < cache.recent_start
        assert len(bases) == 2 and checked >= 2 and cache._window_buffers is not None

    def test_emulated_kernel_catches_a_wrong_mask(emulated, monkeypatch):
        """The emulated check can fail: a kernel that skips the oldest slot of the
        float16 window differs from the reference."""
        w_lo = "max(static_cast<int>(params[10 + 2 * (bh / HKV)]), first)"
        with patched_merge_body(monkeypatch, w_lo, w_lo + " + 1"):
            with pytest.raises(AssertionError):
                _check_case(case(4, 2, 300, L=3, D=64, window=16), emulated)


if __name__ == "__main__":
    print(f"backend: {BACKEND}, device: {mx.default_device()}")
    test_dispatch_uses_reference_without_a_gpu_backend()
    test_kernel_sources_share_one_body()
    if BACKEND is None:
        sys.exit("no fused-kernel backend: nothing to compare")
    failures = 0
    # `python tests/test_turboquant_kernels.py N [M]` runs cases N..M-1 (device time is
    # short); the quantize cases run only without M.
    first = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    stop = int(sys.argv[2]) if len(sys.argv) > 2 else len(CASES)
    for c in CASES[first:stop]:
        name = {k: v for k, v in c.items() if v not in (None, False, 0) or k in ("L", "B")}
        try:
            print(
                name,
                f"max |fused - reference| / max |reference| = {_check_case(c):.2e}",
                flush=True,
            )
        except Exception as e:  # report every case, then fail
            failures += 1
            print(name, "FAILED:", str(e)[:2000], flush=True)
    for c in QUANTIZE_CASES + [QUANTIZE_SCALED + (BACKEND, 70, True)] if stop == len(CASES) else []:
        try:
            print("quantize", c, f"codes differing: {_check_quantize(*c):.2e}", flush=True)
        except Exception as e:
            failures += 1
            print("quantize", c, "FAILED:", str(e)[:2000], flush=True)
    for c in DEQUANT_CASES if stop == len(CASES) else []:
        try:
            print("dequantize", c, f"max rel diff {_check_dequantize(c, T=3000):.2e}", flush=True)
        except Exception as e:
            failures += 1
            print("dequantize", c, "FAILED:", str(e)[:2000], flush=True)
    sys.exit(1 if failures else 0)


# ---- Syntax check of the kernel sources as C++ (Metal cannot run here) ----

METAL_SHIM = """
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#define device
#define threadgroup
struct uint3 { unsigned x, y, z; };
struct float4 { float x, y, z, w; };
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
inline void simdgroup_barrier(mem_flags) {}
typedef unsigned short ushort;
typedef unsigned long ulong;
inline float simd_shuffle_xor(float x, ushort) { return x; }
inline float simd_shuffle(float x, ushort) { return x; }
template <typename T, typename U>
T as_type(U) { return T(); }
inline unsigned clz(unsigned x) { return x; }
namespace metal { namespace fast { inline float exp(float x) { return std::exp(x); } } }
namespace metal { namespace precise { inline float pow(float x, float y) { return std::pow(x, y); } } }
using std::max;
using std::min;
using std::sqrt;  // the float overload, as on the device
struct half {
  unsigned short bits;
  half() = default;
  half(float) : bits(0) {}
  operator float() const { return 0.0f; }
};
struct half2 {
  half2(float, float) {}
  half2(half, half) {}
};
"""

CUDA_SHIM = """
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#define __shared__ static
#define __device__
struct dim3 { unsigned x, y, z; };
struct float4 { float x, y, z, w; };
static dim3 threadIdx, blockIdx;
inline void __syncthreads() {}
inline void __syncwarp() {}
inline float __shfl_xor_sync(unsigned, float x, int) { return x; }
inline int __clz(int x) { return x; }
inline float __expf(float x) { return std::exp(x); }
using std::max;
using std::min;
using std::sqrt;  // the float overload, as on the device
struct __half {
  unsigned short bits;
  __half() = default;
  __half(float) : bits(0) {}
  operator float() const { return 0.0f; }
};
inline float __shfl_sync(unsigned, float x, int) { return x; }
inline uint32_t tq_half2_bits(float, float) { return 0; }
inline float tq_round_half(float x) { return x; }
inline float tq_half_value(uint32_t) { return 0.0f; }
template <typename C, typename A, typename B>
void tq_mma(C c, A a, B b) { c[0] += static_cast<float>(a[0] + b[0]); }
"""

INPUT_TYPES = dict(
    q="HALF",
    key_signs="float",
    value_signs="float",
    seg_scale="float",
    seg_mean="float",
    window_keys="HALF",
    window_values="HALF",
    packed_keys="uint32_t",
    key_norms="HALF",
    packed_values="uint32_t",
    value_norms="HALF",
    segments="SEG",
    key_codebook="float",
    value_codebook="float",
    params="float",
    partial_out="float",
    partial_max="float",
    partial_sum="float",
    out="out_t",
    keys="HALF",
    values="HALF",
    mean="float",
    scale="float",
    piece_keys="uint32_t",
    piece_norms="HALF",
    sums="float",
    key_means="HALF",
    key_scales="HALF",
    new_mean="HALF",
    new_mu="float",
    new_scale="HALF",
    new_sigma="float",
    new_inv_sigma="float",
    new_mu_over_sigma="float",
)

PARTIAL_TEMPLATES = [
    dict(
        D=128,
        R=7,
        RC=7,
        L=1,
        NT=128,
        KB=3,
        VB=3,
        KW=12,
        VW=12,
        MAXSEG=8,
        SCALED=1,
        RING=0,
        WIN=1,
        CAUSAL=0,
        ROT=1,
        HKV=4,
        STAGE=0,
        MMA=1,
    ),
    dict(
        D=64,
        R=12,
        RC=12,
        L=4,
        NT=128,
        KB=4,
        VB=2,
        KW=8,
        VW=4,
        MAXSEG=8,
        SCALED=0,
        RING=1,
        WIN=0,
        CAUSAL=1,
        ROT=0,
        HKV=2,
        STAGE=1,
        MMA=0,
    ),
    dict(
        D=256,
        R=16,
        RC=8,
        L=2,
        NT=128,
        KB=2,
        VB=8,
        KW=16,
        VW=64,
        MAXSEG=3,
        SCALED=0,
        RING=0,
        WIN=1,
        CAUSAL=1,
        ROT=1,
        HKV=1,
        STAGE=0,
        MMA=0,
    ),
]
DEQUANT_TEMPLATES = [
    dict(
        D=128, NT=128, KB=3, VB=3, KW=12, VW=12, CENTERED=1, SCALED=1, INVERSE=0, SEG_ROWS=1, HKV=4
    ),
    dict(D=64, NT=128, KB=4, VB=2, KW=8, VW=4, CENTERED=0, SCALED=0, INVERSE=1, SEG_ROWS=0, HKV=2),
]
QUANTIZE_TEMPLATES = [
    dict(D=128, NT=128, KBITS=3, VBITS=3, KW=12, VW=12, HAS_MEAN=1, HAS_SCALE=1),
    dict(D=64, NT=128, KBITS=4, VBITS=2, KW=8, VW=4, HAS_MEAN=0, HAS_SCALE=0),
]
SEGMENT_SUMS_TEMPLATES = [dict(D=128, NT=128, KB=3, KW=12), dict(D=32, NT=128, KB=2, KW=2)]
SEGMENT_STATS_TEMPLATES = [
    dict(D=128, HAS_MEAN=1, HAS_SCALE=1, SCALING=1),
    dict(D=32, HAS_MEAN=0, HAS_SCALE=0, SCALING=0),
]


def translation_unit(backend: str, segment_type: str) -> str:
    """A C++ file holding the kernels as MLX would declare them (inputs as pointers,
    template constants, the backend's thread-id parameters), instantiated."""
    header, partial, merge, quantize, dequantize, sums, stats = kernels.kernel_sources(backend)
    shim = METAL_SHIM if backend == "metal" else CUDA_SHIM
    half = "half" if backend == "metal" else "__half"
    qual = "const device " if backend == "metal" else "const "
    out_qual = "device " if backend == "metal" else ""
    ids = "uint3 thread_position_in_threadgroup, uint3 threadgroup_position_in_grid"

    def params(inputs, outputs):
        def ty(name):
            return INPUT_TYPES[name].replace("HALF", half).replace("SEG", segment_type)

        args = [f"{qual}{ty(n)}* {n}" for n in inputs]
        args += [f"{out_qual}{ty(n)}* {n}" for n in outputs]
        return ", ".join(args + ([ids] if backend == "metal" else []))

    def kernel(name, body, inputs, outputs, instances, types=""):
        names = list(instances[0])
        unit = f"template <{', '.join(['int ' + n for n in names] + ([types] if types else []))}>\n"
        unit += f"void {name}({params(inputs, outputs)}) {{\n{body}}}\n"
        for t in instances:
            args = [str(t[n]) for n in names] + ([half] if types else [])
            signature = params(inputs, outputs).replace("out_t", half)
            unit += f"template void {name}<{', '.join(args)}>({signature});\n"
        return unit

    unit = shim + header
    unit += kernel(
        "partial_kernel",
        partial,
        kernels.PARTIAL_INPUTS,
        kernels.PARTIAL_OUTPUTS,
        PARTIAL_TEMPLATES,
    )
    merge_instances = [
        dict(D=128, R=7, L=1, WIN=1, ROT=1, HKV=4),
        dict(D=64, R=12, L=4, WIN=0, ROT=0, HKV=2),
    ]
    unit += kernel(
        "merge_kernel", merge, kernels.MERGE_INPUTS, ["out"], merge_instances, "typename out_t"
    )
    unit += kernel(
        "quantize_kernel",
        quantize,
        kernels.QUANTIZE_INPUTS,
        kernels.QUANTIZE_OUTPUTS,
        QUANTIZE_TEMPLATES,
    )
    unit += kernel(
        "dequantize_kernel",
        dequantize,
        kernels.DEQUANT_INPUTS,
        kernels.DEQUANT_OUTPUTS,
        DEQUANT_TEMPLATES,
        "typename out_t",
    )
    unit += kernel(
        "segment_sums_kernel",
        sums,
        kernels.SEGMENT_SUMS_INPUTS,
        ["sums"],
        SEGMENT_SUMS_TEMPLATES,
    )
    unit += kernel(
        "segment_stats_kernel",
        stats,
        kernels.SEGMENT_STATS_INPUTS,
        kernels.SEGMENT_STATS_OUTPUTS,
        SEGMENT_STATS_TEMPLATES,
    )
    return unit


def _compile(unit: str, tmp_path):
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("clang++")
    assert compiler, "a C++ compiler (g++ or clang++) is needed to check the kernel sources"
    path = tmp_path / "kernel.cpp"
    path.write_text(unit)
    r = subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-fsyntax-only",
            "-Wall",
            "-Wno-unused-variable",
            "-Wno-unknown-pragmas",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stderr


if pytest is not None:

    @pytest.mark.parametrize("backend", ["metal", "cuda"])
    @pytest.mark.parametrize("segment_type", ["int32_t", "uint8_t"])
    def test_kernel_source_compiles_as_cpp(backend, segment_type, tmp_path):
        """Metal has no compiler here: the Metal kernels (and, as a cross-check, the
        CUDA ones) are compiled as C++ against a shim of the backend's few built-ins."""
        _compile(translation_unit(backend, segment_type), tmp_path)

    def test_syntax_check_catches_errors(tmp_path):
        broken = translation_unit("metal", "int32_t").replace("l[i] * alpha", "l[")
        with pytest.raises(AssertionError):
            _compile(broken, tmp_path)


def test_cuda_kernel_sources_go_through_include_files(tmp_path, monkeypatch):
    """MLX handles a kernel's whole text at every call, so CUDA kernels reach it as
    `#include` lines of files holding their text (named by its hash); Metal's get the
    text. A file of that name holding other text is rewritten; where no file can be
    written the text goes as it is."""
    monkeypatch.setenv("MLX_LM_TURBO_KERNEL_DIR", str(tmp_path / "k"))
    text = "constexpr int D = 64;\nint x = D;\n"
    line = kernels._included(text)
    path = line.split('"')[1]
    assert line == f'#include "{path}"\n' and path.startswith(str(tmp_path / "k"))
    assert open(path).read() == text and kernels._included(text) == line
    with open(path, "w") as f:
        f.write("int planted;\n")
    assert kernels._included(text) == line and open(path).read() == text
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MLX_LM_TURBO_KERNEL_DIR", str(tmp_path / "file" / "k"))
    assert kernels._included(text) == text

    monkeypatch.setenv("MLX_LM_TURBO_KERNEL_DIR", str(tmp_path / "k"))
    made = {}

    def recorder(flavour):
        def make(name, input_names, output_names, source, header):
            made[flavour] = (source, header)

        return make

    for flavour in ("cuda", "metal"):
        monkeypatch.setitem(
            kernels.KERNEL_MAKERS, "record-" + flavour, (flavour, lambda f=flavour: recorder(f))
        )
        kernels._specialised("record-" + flavour, 1, (("D", 64), ("out_t", mx.float32)))
    header, merge = kernels.kernel_sources("cuda")[0], kernels.kernel_sources("cuda")[2]
    source, head = made["cuda"]
    assert source.startswith("#include") and head.startswith("#include")
    with open(source.split('"')[1]) as f:
        assert f.read() == kernels.compact_source(
            "constexpr int D = 64;\ntypedef float out_t;\n" + merge
        )
    with open(head.split('"')[1]) as f:
        assert f.read() == kernels.compact_source(header)
    assert "tq_hadamard" in made["metal"][1] and "#include" not in made["metal"][0]


def test_partial_kernel_has_launch_bounds_for_long_calls(monkeypatch):
    """The tensor-core partial kernel's long form (head_dim <= 128, one row tile) has a
    MINB template whose CUDA header ends by redefining __global__ with launch bounds
    (MLX writes the kernel's declaration after the header); Metal's header is left
    as it is, and head_dim 256, whose kernel holds about 234 registers, gets no bounds."""
    monkeypatch.setattr(kernels, "INCLUDE_SOURCES", False)
    made = {}

    def recorder(flavour):
        def make(name, input_names, output_names, source, header):
            made[flavour, name] = header
            return name

        return make

    for flavour in ("cuda", "metal"):
        monkeypatch.setitem(
            kernels.KERNEL_MAKERS, "record-" + flavour, (flavour, lambda f=flavour: recorder(f))
        )
    flags = (1, 0, 1, 0)
    try:
        short, long, _, _ = kernels._decode_kernels(
            "record-cuda", mx.float16, 128, 28, 4, 1, 3, 3, 12, 12, 8, flags, True
        )
        assert long == short + "_MINB4"
        bounds = "#define __global__ __location__(global) __launch_bounds__(128, 4)"
        assert bounds in made["cuda", long] and "__launch_bounds__" not in made["cuda", short]
        assert made["cuda", long].index("#undef __global__") > made["cuda", long].index("tq_mma")
        short, long, _, _ = kernels._decode_kernels(
            "record-cuda", mx.float16, 256, 4, 1, 1, 3, 3, 24, 24, 8, flags, True
        )
        assert long == short
        # The per-lane kernel (Metal's, and CUDA's without tensor cores) has none.
        short, long, _, _ = kernels._decode_kernels(
            "record-metal", mx.float16, 128, 28, 4, 1, 3, 3, 12, 12, 8, flags, False
        )
        assert long == short
        kernels._specialised("record-metal", 0, (("NT", 128), ("MINB", 4)))
        assert "__launch_bounds__" not in made["metal", "turboquant_decode_partial_NT128_MINB4"]
    finally:
        kernels._specialised.cache_clear()
        kernels._decode_kernels.cache_clear()


def test_long_contexts_get_more_thread_groups():
    """Decode splits aim at TARGET_GROUPS thread groups, and at long contexts (one group
    per SLOTS_PER_LONG_GROUP coded slots) at up to LONG_TARGET_GROUPS."""
    assert kernels.TARGET_GROUPS < kernels.LONG_TARGET_GROUPS
    per_group = kernels.SLOTS_PER_LONG_GROUP
    for groups in (4, 32):
        short = kernels.TARGET_GROUPS * per_group // groups  # slots where growth begins
        assert kernels.split_target(1024, groups) == kernels.TARGET_GROUPS // groups
        assert kernels.split_target(short, groups) == kernels.TARGET_GROUPS // groups
        assert kernels.split_target(2 * short, groups) == 2 * kernels.TARGET_GROUPS // groups
        assert kernels.split_target(100 * short, groups) == kernels.LONG_TARGET_GROUPS // groups


def test_split_bounds_cut_at_every_segment_start():
    from mlx_lm.models.turboquant_cache import segment_start

    for coded, target, pad in ((1024, 64, 0), (1000, 64, 0), (16384, 64, 0), (5000, 2, 3)):
        bounds = kernels.split_bounds(coded, target, pad, 8)
        assert bounds[0] == 0 and bounds[-1] == coded and list(bounds) == sorted(set(bounds))
        starts = {pad + segment_start(s) for s in range(1, 9)} & set(range(coded))
        assert starts <= set(bounds)  # no split spans a segment start
    # The rest are about `target` uniform cuts, a multiple of 32 (a warp's tokens) apart.
    assert kernels.split_bounds(1024, 64, 0, 8) == (0, 32, 128) + tuple(range(256, 1025, 128))
    assert kernels.split_bounds(5000, 2, 3, 8) == (0, 35, 131, 515, 2051, 2528, 5000)
    assert kernels.split_bounds(300, 1, 0, 0) == (0, 300)  # no key means: no segment cuts
    assert kernels.split_bounds(100, 64, 0, 0) == (0, 100)  # one split: too few slots
