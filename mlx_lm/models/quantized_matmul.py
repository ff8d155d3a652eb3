"""4-bit weight matmuls for decode (a few rows of x) on CUDA, on tensor cores.

A decode step multiplies a handful of rows (batch x new tokens) by every weight matrix of
the model. On MLX's CUDA backend (0.32.4) `mx.quantized_matmul` runs such calls at a
fraction of the memory's bandwidth: on the H200, 49.6 µs for a 3584 x 18944 4-bit matrix
at one row (34 MB: 7 µs at 4.8 TB/s) and 266 µs at eight rows
(`benchmarks/results/decode_launch_bounds_h200.md`). At batch 8 those matmuls took 29 of
a decode step's 37 ms, for every KV cache alike. This kernel reads each weight once for
up to eight rows.

The affine 4-bit code of MLX (`mx.quantize`): row n of W, group j of `G` columns,
w[n, k] = s[n, j] q[n, k] + b[n, j], q in 0..15, eight codes a uint32 (code i in bits
4i..4i+3). So for a group

    y[m, n] += s[n, j] sum_k q[n, k] x[m, k] + b[n, j] sum_k x[m, k]        (1)

and the kernel computes both sums on tensor cores (PTX `mma.sync` m16n8k16, float32
sums): A is 16 rows of W's codes, B is x transposed (the rows of x are the 8 columns).
A tensor-core product sums over its 16 k in any order, so a lane may hold any four
columns of its row, as long as A and B agree: each lane of a quad takes G/4 consecutive
columns of the group (one, two or four uint32 of a row). The codes enter A as
float16 (bfloat16) 1024 + q (128 + q), an exact value made with bit masks
(`(word >> 4i) & 0x000F000F | magic`), and (1) takes off 1024 sum_k x from the first
sum; the second sum is the product of B with an A of ones. Scales apply once a group in
float32.

A thread group is one 16-row tile of W; its warps split the groups of K between them and
add their sums in shared memory. CUDA only: Metal's `mx.quantized_matmul` has its own
fast small-row kernels, and the CPU has no tensor cores, so there (and with
MLX_LM_TURBO_REFERENCE=1, and for shapes the kernel does not take) `mx.quantized_matmul`
runs: it is also the reference the kernel is tested against.
"""

from functools import lru_cache

import mlx.core as mx
import mlx.nn as nn

from . import turboquant_kernels as kernels

# Rows of x the kernel takes (the tensor-core product's 8 columns).
MAX_ROWS = 8
GROUP_SIZES = (32, 64, 128)
# The fewest groups of K a warp takes (its loads in flight); a tile has up to 16 warps.
MIN_GROUPS_PER_WARP = 4
# Switch for benchmarks (A/B in one process); MLX_LM_TURBO_REFERENCE=1 also turns it off.
ENABLED = True

CUDA_PRELUDE = """
#if defined(__CUDACC__)
#include <cuda_bf16.h>
// c += a b: a warp's m16n8k16 tensor-core product, float32 sums, of float16 (HALF) or
// bfloat16 a [16 x 16] and b [16 x 8] in the PTX fragment layouts.
template <bool HALF, typename C, typename A, typename B>
__device__ inline void qmm_mma(C c, A a, B b) {
  if (HALF) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#else  // the CPU emulator (tests/kernel_emulator.py): float16 only
template <bool HALF, typename C, typename A, typename B>
inline void qmm_mma(C c, A a, B b) { tq_mma(c, a, b); }
#endif
// N consecutive uint32, loaded as one 4N-byte access.
template <int N>
struct alignas(4 * N) qmm_words {
  uint32_t v[N];
};
"""

# Template constants: T (x's type), MAGIC_HALF (1 for float16, 0 for bfloat16), G (group
# size), WARPS, U (groups a warp loads before it computes), HAS_BIAS. Inputs x [M, K], w
# [N, K / 8], scales and biases [N, K / G], bias [N], dims (M, K, N); output y [M, N]. The
# sizes are inputs, not constants: a kernel compiles once for every matrix of a model
# (NVRTC takes seconds a kernel).
BODY = """
const int M = dims[0], K = dims[1], N = dims[2];
constexpr int WORDS = G / 32;  // uint32 of a row a lane reads in a group: 8 columns each
constexpr int XWORDS = G / 8;  // its G / 4 values of x, as pairs
const int NG = K / G;
const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
const int g = lane >> 2, t = lane & 3;  // the fragments' row (and x's row), column pair
const int n0 = blockIdx.x * 16;
// 1024 + q as float16 (0x6400 is 1024), 128 + q as bfloat16 (0x4300 is 128); and ones.
constexpr uint32_t MAGIC = MAGIC_HALF ? 0x64006400u : 0x43004300u;
constexpr float MAGIC_VALUE = MAGIC_HALF ? 1024.0f : 128.0f;
constexpr uint32_t ONE = MAGIC_HALF ? 0x3C003C00u : 0x3F803F80u;
const uint32_t ones[4] = {ONE, ONE, ONE, ONE};
const uint32_t* w_a = w + (size_t)(n0 + g) * (K / 8) + t * WORDS;
const uint32_t* w_b = w_a + (size_t)8 * (K / 8);
const uint32_t* x_g = reinterpret_cast<const uint32_t*>(x) + (size_t)g * (K / 2) + t * XWORDS;
const T* s_a = scales + (size_t)(n0 + g) * NG;
const T* s_b = s_a + (size_t)8 * NG;
const T* b_a = biases + (size_t)(n0 + g) * NG;
const T* b_b = b_a + (size_t)8 * NG;
float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
for (int first = warp; first < NG; first += WARPS * U) {
  // Every weight load of U groups first, then their products: U groups' bytes in
  // flight. x (a few KB, read by every warp: cache hits) is loaded where it is used.
  qmm_words<WORDS> wa[U], wb[U];
  float sa[U], sb[U], ba[U], bb[U];
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int j = first + u * WARPS;
    const bool live = j < NG;
    const int jj = live ? j : 0;
    wa[u] = *reinterpret_cast<const qmm_words<WORDS>*>(w_a + jj * (G / 8));
    wb[u] = *reinterpret_cast<const qmm_words<WORDS>*>(w_b + jj * (G / 8));
    sa[u] = live ? static_cast<float>(s_a[jj]) : 0.0f;
    sb[u] = live ? static_cast<float>(s_b[jj]) : 0.0f;
    ba[u] = live ? static_cast<float>(b_a[jj]) : 0.0f;
    bb[u] = live ? static_cast<float>(b_b[jj]) : 0.0f;
  }
#pragma unroll
  for (int u = 0; u < U; u++) {
    const int j = first + u * WARPS;
    const bool x_live = j < NG && g < M;
    const uint32_t* x_j = x_g + (j < NG ? j : 0) * (G / 2);
    float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // sum_k (magic + q) x, rows g, g + 8
    float e[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // sum_k x
#pragma unroll
    for (int i = 0; i < WORDS; i++) {
      const uint32_t qa = wa[u].v[i], qb = wb[u].v[i];
      qmm_words<4> xs = {{0u, 0u, 0u, 0u}};  // (x0, x1), (x2, x3), (x4, x5), (x6, x7)
      if (x_live) xs = *reinterpret_cast<const qmm_words<4>*>(x_j + 4 * i);
#pragma unroll
      for (int h = 0; h < 2; h++) {
        // This product's k slots (2t, 2t + 1) hold the word's columns 2h and 2h + 4,
        // slots (2t + 8, 2t + 9) its columns 2h + 1 and 2h + 5, in A and B alike.
        const uint32_t a[4] = {
            ((qa >> (8 * h)) & 0x000F000Fu) | MAGIC,
            ((qb >> (8 * h)) & 0x000F000Fu) | MAGIC,
            ((qa >> (8 * h + 4)) & 0x000F000Fu) | MAGIC,
            ((qb >> (8 * h + 4)) & 0x000F000Fu) | MAGIC};
        const uint32_t p = xs.v[h], q = xs.v[h + 2];
        const uint32_t b[2] = {(p & 0xFFFFu) | (q << 16), (p >> 16) | (q & 0xFFFF0000u)};
        qmm_mma<MAGIC_HALF>(c, a, b);
        qmm_mma<MAGIC_HALF>(e, ones, b);
      }
    }
    // (1), float32: s (sum (magic + q) x) + (b - magic s) sum x
    const float ca = ba[u] - MAGIC_VALUE * sa[u], cb = bb[u] - MAGIC_VALUE * sb[u];
    acc[0] += sa[u] * c[0] + ca * e[0];
    acc[1] += sa[u] * c[1] + ca * e[1];
    acc[2] += sb[u] * c[2] + cb * e[2];
    acc[3] += sb[u] * c[3] + cb * e[3];
  }
}
// The warps' sums, added by warp 0: rows n0 + g, n0 + g + 8; x rows 2t, 2t + 1.
__shared__ float partial[WARPS * 32 * 4];
#pragma unroll
for (int i = 0; i < 4; i++) partial[(warp * 32 + lane) * 4 + i] = acc[i];
__syncthreads();
if (warp == 0) {
  float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int v = 0; v < WARPS; v++) {
#pragma unroll
    for (int i = 0; i < 4; i++) sum[i] += partial[(v * 32 + lane) * 4 + i];
  }
  const int ra = n0 + g, rb = n0 + g + 8;
  const float bias_a = HAS_BIAS ? static_cast<float>(bias[ra]) : 0.0f;
  const float bias_b = HAS_BIAS ? static_cast<float>(bias[rb]) : 0.0f;
#pragma unroll
  for (int i = 0; i < 2; i++) {
    const int m = 2 * t + i;
    if (m < M) {
      y[(size_t)m * N + ra] = static_cast<T>(sum[i] + bias_a);
      y[(size_t)m * N + rb] = static_cast<T>(sum[i + 2] + bias_b);
    }
  }
}
"""

INPUTS = ["x", "w", "scales", "biases", "bias", "dims"]


@lru_cache(maxsize=None)
def _kernel(backend: str, template: tuple):
    """The kernel with its template constants written into its source (as
    `turboquant_kernels._specialised` does, and for the same reason: a call then passes
    no template)."""
    flavour, maker = kernels.KERNEL_MAKERS[backend]
    consts, tag = kernels.template_source(flavour, template)
    source = kernels.compact_source(consts + BODY)
    header = kernels.compact_source(CUDA_PRELUDE)
    if backend == "cuda" and kernels.INCLUDE_SOURCES:
        source, header = kernels._included(source), kernels._included(header)
    return maker()(
        name="quantized_matmul_rows" + tag,
        input_names=INPUTS,
        output_names=["y"],
        source=source,
        header=header,
    )


@lru_cache(maxsize=256)
def _dims(m: int, k: int, n: int) -> mx.array:
    return mx.array([m, k, n], dtype=mx.int32)


def warps_per_tile(k: int, group_size: int) -> int:
    """Warps that split one 16-row tile's groups of K: the most, up to 16 (a power of
    two), that leaves each MIN_GROUPS_PER_WARP groups. On the H200, Qwen2.5-7B's
    matrices ran fastest so (`benchmarks/results/decode_matmul_rows_h200.md`)."""
    warps = 16
    while warps > 1 and k // group_size < MIN_GROUPS_PER_WARP * warps:
        warps //= 2
    return warps


def _template(x, k: int, group_size: int, has_bias: bool) -> tuple:
    return (
        ("T", x.dtype),
        ("MAGIC_HALF", int(x.dtype == mx.float16)),
        ("G", group_size),
        ("WARPS", warps_per_tile(k, group_size)),
        # Groups a warp loads before it multiplies: 256 bytes of each of its 16 rows (8
        # groups of 64; 4 and 16 were slower on the H200).
        ("U", 512 // group_size),
        ("HAS_BIAS", int(has_bias)),
    )


def _launch(kernel, warps: int, x, w, scales, biases, bias, dims):
    n = w.shape[0]
    (y,) = kernel(
        inputs=[x, w, scales, biases, bias, dims],
        grid=((n // 16) * 32 * warps, 1, 1),
        threadgroup=(32 * warps, 1, 1),
        output_shapes=[(*x.shape[:-1], n)],
        output_dtypes=[x.dtype],
    )
    return y


def _rows_call(x, w, group_size: int, has_bias: bool, backend: str = "cuda", compiled=False):
    """The kernel's call for x's and w's shapes and dtype, as a function of (x, w,
    scales, biases, bias) with bias an array (`_bias`); `compiled`: through
    `mx.compile`."""
    k, n = x.shape[-1], w.shape[0]
    template = _template(x, k, group_size, has_bias)
    kernel, warps = _kernel(backend, template), dict(template)["WARPS"]
    dims = _dims(x.size // k, k, n)

    def call(x, w, scales, biases, bias):
        return _launch(kernel, warps, x, w, scales, biases, bias, dims)

    return mx.compile(call) if compiled else call


def _bias(bias, dtype):
    """The kernel's bias input: `bias`, or a stand-in the kernel does not read (HAS_BIAS
    0)."""
    return kernels._zeros(1, dtype) if bias is None else bias


def rows_matmul(x, w, scales, biases, group_size: int, bias=None, backend: str = "cuda"):
    """x [..., K] @ the 4-bit affine W [N, K] (transposed, as `nn.QuantizedLinear` holds
    it) + bias, for at most MAX_ROWS rows of x, by the kernel (see `supports`)."""
    call = _rows_call(x, w, group_size, bias is not None, backend)
    return call(x, w, scales, biases, _bias(bias, x.dtype))


def supports(x, w, scales, biases, group_size: int, bits: int, mode: str = "affine") -> bool:
    """Whether `rows_matmul` takes this call: 4-bit affine, group size 32/64/128, at
    most MAX_ROWS rows of float16 or bfloat16 x, scales of x's type, N a multiple of 16."""
    return (
        bits == 4
        and mode == "affine"
        and biases is not None
        and group_size in GROUP_SIZES
        and x.dtype in (mx.float16, mx.bfloat16)
        and scales.dtype == x.dtype
        and x.size <= MAX_ROWS * x.shape[-1]
        and x.shape[-1] % group_size == 0
        and w.shape[0] % 16 == 0
    )


# Compile the kernel's call per shape (`_rows_call`): a decode step makes ~200 of them,
# and the step is the host's at batch 1. None where the kernel does not take the call.
COMPILE_CALLS = True
_CALLS = {}


def quantized_matmul(x, w, scales, biases, group_size: int, bits: int, mode="affine", bias=None):
    """`mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)` (+ bias): on CUDA
    by `rows_matmul`'s kernel where it takes the call, else by MLX."""
    if ENABLED and kernels.fused_backend() == "cuda":
        key = (x.shape, x.dtype, w.shape, scales.dtype, group_size, bits, mode, bias is None)
        call = _CALLS.get(key, False)
        if call is False:
            call = None
            if supports(x, w, scales, biases, group_size, bits, mode):
                call = _rows_call(x, w, group_size, bias is not None, compiled=COMPILE_CALLS)
            if len(_CALLS) > 256:  # prompts of many lengths
                _CALLS.clear()
            _CALLS[key] = call
        if call is not None:
            return call(x, w, scales, biases, _bias(bias, x.dtype))
    y = mx.quantized_matmul(
        x, w, scales, biases, transpose=True, group_size=group_size, bits=bits, mode=mode
    )
    return y if bias is None else y + bias


def _layer_matmul(layer: nn.Module, x):
    """A quantized layer's x W^T (+ its bias) by `quantized_matmul`."""
    return quantized_matmul(
        x,
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        layer.group_size,
        layer.bits,
        layer.mode,
        layer.get("bias"),
    )


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose decode calls (a few rows) run `rows_matmul` on CUDA."""

    def __call__(self, x):
        return _layer_matmul(self, x)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose `as_linear` (tied output projections) dispatches as
    `QuantizedLinear` does."""

    def as_linear(self, x):
        return _layer_matmul(self, x)


def use_rows_kernel(model: nn.Module) -> nn.Module:
    """Make the model's `nn.QuantizedLinear` and `nn.QuantizedEmbedding` layers this
    module's subclasses (same parameters; the classes only add the CUDA dispatch)."""
    twins = {nn.QuantizedLinear: QuantizedLinear, nn.QuantizedEmbedding: QuantizedEmbedding}
    for _, module in model.named_modules():
        twin = twins.get(type(module))
        if twin is not None:
            module.__class__ = twin
    return model
