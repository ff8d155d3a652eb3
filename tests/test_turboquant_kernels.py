"""Fused TurboQuant decode kernels against the pure-MLX reference.

On a machine without a GPU kernel backend (this CPU CI) the GPU cases are skipped and
the dispatch is checked to fall back to the reference. On the GPU machine run
`python tests/test_turboquant_kernels.py` (no pytest needed) or pytest.
"""

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
    (1, 4, 1, 2, 300, 256, 3, True, None, 1),
    (2, 8, 8, 3, 1200, 64, 3, True, None, 1),
    (1, 9, 3, 1, 900, 64, 3, True, 512, 900),  # wrapped ring, one token at a time
    (1, 8, 4, 1, 2500, 128, 4, True, 1024, 5),  # ring filled by chunks
    (1, 8, 2, 1, 500, 96, 3, True, None, 1),  # not a power of two: rotated on the host
    (4, 28, 4, 1, 4100, 128, 3, True, None, 2),  # batch 4, many splits
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


QUANTIZE_CASES = [(64, 2, True), (64, 3, False), (128, 3, True), (128, 4, True), (256, 3, False)]


def _check_quantize(D, bits, with_mean):
    """Keys (minus a mean) and values of other bits in one launch, against the
    reference quantizer."""
    from mlx_lm.models.turboquant import turboquant_quantize
    from mlx_lm.models.turboquant_codebook import lloyd_max_codebook
    from mlx_lm.models.turboquant_packing import unpack_codes
    from mlx_lm.models.turboquant_rotation import rotation_signs

    mx.random.seed(D + bits)
    x = (3.0 * mx.random.normal((2, 3, 70, D))).astype(mx.float16)
    values = mx.random.normal((2, 3, 70, D)).astype(mx.float16)
    mean = mx.random.normal((2, 3, 1, D)) if with_mean else None
    value_bits = 5 - bits if bits < 4 else 4
    kinds = [
        (x.astype(mx.float32) - mean if with_mean else x, rotation_signs(D, 0, 1, "k"), bits),
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
        BACKEND,
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

    @needs_gpu
    @pytest.mark.parametrize("case", QUANTIZE_CASES)
    def test_fused_quantize_matches_reference(case):
        _check_quantize(*case)


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
    for case in QUANTIZE_CASES:
        try:
            print("quantize", case, f"codes differing: {_check_quantize(*case):.2e}", flush=True)
        except Exception as e:
            failures += 1
            print("quantize", case, "FAILED:", str(e)[:2000], flush=True)
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
enum class mem_flags { mem_threadgroup };
inline void threadgroup_barrier(mem_flags) {}
namespace metal { namespace fast { inline float exp(float x) { return std::exp(x); } } }
using std::max;
using std::min;
using std::sqrt;  // the float overload, as on the device
struct half {
  unsigned short bits;
  half() = default;
  half(float) : bits(0) {}
  operator float() const { return 0.0f; }
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
static dim3 threadIdx, blockIdx;
inline void __syncthreads() {}
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
"""

INPUT_TYPES = dict(
    q="HALF",
    key_signs="float",
    value_signs="float",
    means="HALF",
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
)

PARTIAL_TEMPLATES = [
    dict(
        D=128,
        R=7,
        L=1,
        NT=128,
        KB=3,
        VB=3,
        KW=12,
        VW=12,
        NSEG=4,
        CAUSAL=0,
        SPLITS=4,
        VSUB=32,
        ROT=1,
    ),
    dict(
        D=64, R=12, L=4, NT=128, KB=4, VB=2, KW=8, VW=4, NSEG=0, CAUSAL=1, SPLITS=1, VSUB=32, ROT=0
    ),
]
QUANTIZE_TEMPLATES = [
    dict(D=128, KBITS=3, VBITS=3, KW=12, VW=12, NK=28, HAS_MEAN=1, PER_MEAN=1),
    dict(D=64, KBITS=4, VBITS=2, KW=8, VW=4, NK=7, HAS_MEAN=0, PER_MEAN=7),
]


def translation_unit(backend: str, segment_type: str) -> str:
    """A C++ file holding the kernels as MLX would declare them (inputs as pointers,
    template constants, the backend's thread-id parameters), instantiated."""
    header, partial, merge, quantize = kernels.kernel_sources(backend)
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
    merge_instances = [dict(D=128, R=7, SPLITS=4, ROT=1), dict(D=64, R=12, SPLITS=1, ROT=0)]
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
    return unit


def _compile(unit: str, tmp_path):
    import shutil
    import subprocess

    compiler = shutil.which("g++") or shutil.which("clang++")
    assert compiler, "a C++ compiler (g++ or clang++) is needed to check the kernel sources"
    path = tmp_path / "kernel.cpp"
    path.write_text(unit)
    r = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wno-unused-variable", str(path)],
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
        broken = translation_unit("metal", "int32_t").replace("row_l[tq_tid] * alpha", "row_l[")
        with pytest.raises(AssertionError):
            _compile(broken, tmp_path)
