"""Runs the CUDA source of the fused TurboQuant kernels on the CPU.

`mx.fast.cuda_kernel` needs a GPU; this module builds the same kernel source (the CUDA
prelude, the shared header and body) as a C++ shared library in which every GPU thread
of a thread group is a CPU thread: `__shared__` memory is a static array, barriers and
warp shuffles are condition-variable barriers. Thread groups run one after another. It takes the
same arguments as the callable `mx.fast.cuda_kernel` returns, so the host code of
`turboquant_kernels` runs unchanged with backend "emulate":

    import kernel_emulator
    kernel_emulator.register()
    fused_decode_attention(q, cache, scale, mask, "emulate")

Slow (a barrier is a context switch), so tests keep the shapes small; but it checks the
kernels' logic (indexing, masks, splits, merges, every barrier and shuffle) against the
reference on this CPU-only CI, and the Metal source shares that logic.
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile

import mlx.core as mx
import numpy as np

SHIM = r"""
#include <algorithm>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#define __shared__ static
#define __device__
struct dim3 { unsigned x, y, z; };
struct float4 { float x, y, z, w; };
static thread_local dim3 threadIdx, blockIdx;

// A barrier that gives up after a while: a barrier or shuffle that only some threads
// reach (a non-uniform branch, a bug on a GPU too) ends the run with an error instead
// of hanging the test.
static bool tq_deadlock = false;
struct TqBarrier {
  std::mutex mu;
  std::condition_variable cv;
  int count, waiting = 0;
  long phase = 0;
  explicit TqBarrier(int n) : count(n) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu);
    if (tq_deadlock) return;
    const long my_phase = phase;
    if (++waiting == count) {
      waiting = 0;
      phase++;
      cv.notify_all();
      return;
    }
    auto released = [&] { return phase != my_phase || tq_deadlock; };
    if (!cv.wait_for(lock, std::chrono::seconds(TQ_BARRIER_TIMEOUT_S), released)) {
      tq_deadlock = true;
      cv.notify_all();
    }
  }
};
static TqBarrier* tq_block_barrier;
static TqBarrier* tq_warp_barriers[32];
static float tq_exchange[1024];
inline void __syncthreads() { tq_block_barrier->wait(); }
inline void __syncwarp() { tq_warp_barriers[threadIdx.x / 32]->wait(); }
inline float __shfl_xor_sync(unsigned, float x, int m) {
  const int t = threadIdx.x;
  __syncwarp();  // the slot's previous readers are done
  tq_exchange[t] = x;
  __syncwarp();
  return tq_exchange[(t & ~31) | ((t & 31) ^ m)];
}
inline float __expf(float x) { return std::exp(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
// CUDA's float max/min ignore a NaN operand (fmaxf), whatever its side.
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return std::max(a, b); }
inline int min(int a, int b) { return std::min(a, b); }
using std::sqrt;
typedef _Float16 __half;
typedef float __nv_bfloat16;  // bfloat16 arrays arrive as float32 (C_TYPES)
inline float __shfl_sync(unsigned, float x, int src) {
  const int t = threadIdx.x;
  __syncwarp();
  tq_exchange[t] = x;
  __syncwarp();
  return tq_exchange[(t & ~31) | (src & 31)];
}
inline uint32_t tq_half_bits(__half h) {
  uint16_t x;
  std::memcpy(&x, &h, 2);
  return x;
}
inline float tq_half_value(uint32_t bits) {
  const uint16_t x = static_cast<uint16_t>(bits);
  __half h;
  std::memcpy(&h, &x, 2);
  return static_cast<float>(h);
}
inline uint32_t tq_halves_bits(__half lo, __half hi) {
  return tq_half_bits(lo) | (tq_half_bits(hi) << 16);
}
inline uint32_t tq_half2_bits(float lo, float hi) {
  return tq_halves_bits(static_cast<__half>(lo), static_cast<__half>(hi));
}
inline float tq_round_half(float x) { return static_cast<float>(static_cast<__half>(x)); }
// mma.sync m16n8k16 (f32 += f16 x f16) over the warp: every lane posts its fragment
// registers, then sums its own four outputs (PTX fragment layouts; float32 sums).
static uint32_t tq_mma_a[1024][4];
static uint32_t tq_mma_b[1024][2];
template <typename C, typename A, typename B>
void tq_mma(C c, A a, B b) {
  const int t = threadIdx.x;
  const int w0 = t & ~31;
  __syncwarp();
  for (int i = 0; i < 4; i++) tq_mma_a[t][i] = a[i];
  for (int i = 0; i < 2; i++) tq_mma_b[t][i] = b[i];
  __syncwarp();
  const int g = (t & 31) >> 2, q = t & 3;
  for (int e = 0; e < 4; e++) {
    const int row = g + (e >= 2 ? 8 : 0), col = 2 * q + (e & 1);
    float sum = 0.0f;
    for (int k = 0; k < 16; k++) {
      const int a_lane = w0 + (row & 7) * 4 + ((k & 7) >> 1);
      const int a_reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
      const int b_lane = w0 + col * 4 + ((k & 7) >> 1);
      const int b_reg = k >= 8 ? 1 : 0;
      const float x = tq_half_value(tq_mma_a[a_lane][a_reg] >> (16 * (k & 1)));
      const float y = tq_half_value(tq_mma_b[b_lane][b_reg] >> (16 * (k & 1)));
      sum += x * y;
    }
    c[e] += sum;
  }
}
"""

C_TYPES = {
    mx.float32: ("float", np.float32),
    mx.float16: ("__half", np.float16),
    mx.bfloat16: ("float", np.float32),  # computed in float32, returned as bfloat16
    mx.uint32: ("uint32_t", np.uint32),
    mx.uint8: ("uint8_t", np.uint8),
    mx.int32: ("int32_t", np.int32),
}

_LIBRARIES = {}
# Seconds a barrier waits for the rest of its threads before the run is called stuck.
BARRIER_TIMEOUT_S = 20


def _compile(source: str) -> ctypes.CDLL:
    key = hashlib.sha1(source.encode()).hexdigest()[:16]
    if key in _LIBRARIES:
        return _LIBRARIES[key]
    folder = os.path.join(tempfile.gettempdir(), "tq_kernel_emulator")
    os.makedirs(folder, exist_ok=True)
    library = os.path.join(folder, f"{key}.so")
    if not os.path.exists(library):
        compiler = shutil.which("g++") or shutil.which("clang++")
        assert compiler, "the kernel emulator needs a C++ compiler (g++ or clang++)"
        path = os.path.join(folder, f"{key}.cpp")
        with open(path, "w") as f:
            f.write(source)
        flags = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas"]
        r = subprocess.run(
            [compiler, *flags, path, "-o", library + ".tmp"], capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-4000:]
        os.replace(library + ".tmp", library)
    _LIBRARIES[key] = ctypes.CDLL(library)
    return _LIBRARIES[key]


def emulated_kernel(name, input_names, output_names, source, header=""):
    """What `mx.fast.cuda_kernel(...)` returns, run on the CPU."""

    def call(inputs, grid, threadgroup, output_shapes, output_dtypes, template=(), **_):
        arrays = [
            np.ascontiguousarray(np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x))
            for x in inputs
        ]
        in_types = [C_TYPES[x.dtype][0] for x in inputs]
        outs = [np.zeros(shape, C_TYPES[dt][1]) for shape, dt in zip(output_shapes, output_dtypes)]
        out_types = [C_TYPES[dt][0] for dt in output_dtypes]
        consts = []
        for key, value in template:
            if isinstance(value, mx.Dtype):
                consts.append(f"typedef {C_TYPES[value][0]} {key};")
            else:
                consts.append(f"constexpr int {key} = {int(value)};")
        args = [f"const {t}* {n}" for t, n in zip(in_types, input_names)]
        args += [f"{t}* {n}" for t, n in zip(out_types, output_names)]
        casts = [f"({t}*)a[{i}]" for i, t in enumerate(in_types + out_types)]
        threads = threadgroup[0]
        groups = grid[0] // threads
        unit = f"#define TQ_BARRIER_TIMEOUT_S {BARRIER_TIMEOUT_S}\n" + SHIM + header + f"""
static void kernel({', '.join(args)}) {{
{chr(10).join(consts)}
{source}
}}
extern "C" int run(void** a, int groups, int threads) {{
  tq_deadlock = false;
  TqBarrier block(threads);
  tq_block_barrier = &block;
  std::vector<std::unique_ptr<TqBarrier>> warps;
  for (int w = 0; w * 32 < threads; w++) {{
    warps.emplace_back(new TqBarrier(std::min(32, threads - 32 * w)));
    tq_warp_barriers[w] = warps.back().get();
  }}
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; t++) {{
    pool.emplace_back([=, &block]() {{
      threadIdx = dim3{{static_cast<unsigned>(t), 0, 0}};
      for (int g = 0; g < groups; g++) {{
        blockIdx = dim3{{static_cast<unsigned>(g), 0, 0}};
        kernel({', '.join(casts)});
        block.wait();
      }}
    }});
  }}
  for (auto& t : pool) t.join();
  return tq_deadlock ? 1 : 0;
}}
"""
        library = _compile(unit)
        pointers = (ctypes.c_void_p * (len(arrays) + len(outs)))(
            *[x.ctypes.data for x in arrays + outs]
        )
        if library.run(pointers, groups, threads):
            raise AssertionError(
                f"{name}: some threads never reached a barrier or shuffle that others "
                "waited at (a non-uniform branch around one)"
            )
        return [mx.array(o).astype(dt) for o, dt in zip(outs, output_dtypes)]

    return call


def register():
    """Make backend "emulate" of `turboquant_kernels` run the CUDA source here."""
    from mlx_lm.models import turboquant_kernels as kernels

    kernels.KERNEL_MAKERS["emulate"] = ("cuda", lambda: emulated_kernel)
