"""Fused TurboQuant decode attention: one kernel reads the packed cache directly.

For each (batch, KV head, block of query rows, split of the context) a thread group

1. rotates its query rows once per key-mean segment s its tokens fall in, as Π(q∘σ_s)
   (signs, then a Walsh-Hadamard butterfly in shared memory; σ = 1 without key
   scaling), and takes their dot products with M̃_s = Π(μ_s/σ_s);
2. lets each of its warps run flash decoding on 32 tokens at a time: scores straight
   from the packed key codes, one token per lane,
   s_j = scale (n_j Σ_d (Π(q∘σ_s))_d c[idx_jd] + Π(q∘σ_s)·M̃_s),
   the online softmax of every query row (warp shuffles), and the values in the
   rotated domain from the packed value codes, a few coordinates per lane:
   o += p_j m_j c'[idx_jd];
3. merges its warps.

On CUDA (power-of-two head_dim, codes of at most 4 bits) step 2 runs on tensor cores
(`tensor_cores`, template MMA): per 32 tokens a warp computes S = Π(q∘σ_s) Ĉᵀ with
mma.sync m16n8k16 (query rows x tokens; the query in float16 hi + lo parts, so it
keeps float32 precision), its B fragments decoded straight from the packed words
through a table of float16 centroid pairs (two codes, one lookup), then Oᵀ += Ĉ'ᵀ Pᵀ,
whose B fragments are the probability tiles as the first product leaves them. Centroids
are float16-exact (`TurboQuantCodec._derive`), so the pair tables hold them as they are.
The codes are taken from the words already shifted into byte offsets of those tables
(`tq_bits_shl`): per 32 tokens a warp's loop went from 1,329 to 1,212 SASS instructions
and the kernel from 168 to 128 registers (sm_90), and one layer's call (launch and
device, H200) from 142.9 to 116.5 µs at 128K and from 234.3 to 173.3 µs at 8 x 32K.
Measured on the H200 (Qwen2.5-7B shapes, one layer's attention, per call in one process):
128K 179 µs against 204 µs per lane, 8 x 32K 276 µs against 422 µs. Metal has no such
instruction in this source and runs the per-lane path.

A second small kernel merges the splits (flash-decoding: each split's maximum and sum read
once, by one thread, its weight kept in shared memory), rotates the codes' part back
(Π⁻¹, the same butterfly), attends to the float16 window itself (a few dozen FP16 keys
and values per row) and merges that in, and writes the model's dtype. The window is not
a split of the first kernel: its branches in the token loop made every code split
slower (H200, Qwen2.5-7B shapes, a 65-token window, µs per call as a split / in the
merge: 1K 26.1 / 22.8, 4K 30.7 / 28.3, 32K 59.8 / 42.2, 128K 119.1 / 89.4, 8 x 32K
195.8 / 145.9; `benchmarks/results/attention_window_in_merge_h200.md`). Nothing
is dequantized into memory: per token the kernel reads the packed words and two float16
norms (at d = 128 and 3 bits, 100 bytes instead of FP16's 512). A decode step is two
launches for the attention and one (`fused_quantize`) for the keys and values to code:
on a GPU at batch 1 the step is bound by launches, not by bytes, so every op saved counts.

Prefill (longer query blocks) takes the reference path, whose dequantization of the
coded context runs here as one more kernel on a GPU (`fused_dequantize`: the keys and
values of a layer's context in the attention's dtype and the model's domain, one
launch), before one SDPA.

The kernel body is written once; `CUDA_PRELUDE` / `METAL_PRELUDE` map its few backend
words (thread ids, shared memory, barriers, warp shuffles, pointers) to CUDA
(`mx.fast.cuda_kernel`) and Metal (`mx.fast.metal_kernel`). The pure-MLX attention in
`turboquant_attention.py` is the reference; set MLX_LM_TURBO_REFERENCE=1 to force it.
Tests run the CUDA source on the CPU too (`tests/kernel_emulator.py`).
"""

import functools
import hashlib
import os
from functools import lru_cache
from typing import NamedTuple, Optional, Tuple

import mlx.core as mx

from .turboquant_packing import packed_words
from .turboquant_rotation import inverse_rotate, rotate

# Most query tokens of a decode-kernel call (longer query blocks, prefill, take the
# reference path), and the most accumulator registers per lane (query rows of a thread
# group x head_dim / 32): more rows go to further thread groups.
MAX_QUERY_TOKENS = 8
MAX_ACCUMULATORS = 64
# The shared memory a thread group may use (Metal's limit; CUDA allows 48 KB static).
SHARED_BYTES = 32 * 1024
# Threads per group: NT / 32 warps, each an independent flash-decoding worker.
THREADS = 128
# Score and sum on tensor cores where the backend has them (`tensor_cores`); tests turn
# this off to check the per-lane path, which Metal runs.
TENSOR_CORES = True
# The context is split so that about TARGET_GROUPS thread groups run (a decode step at
# batch 1 has only a few KV heads: without splits the GPU would idle), each with at
# least MIN_TOKENS_PER_SPLIT tokens, and at every key-mean segment start
# (`split_bounds`). Long contexts get up to LONG_TARGET_GROUPS, one per
# SLOTS_PER_LONG_GROUP coded slots (of all the sequences' KV heads): a group's token
# loop waits on its loads, and two groups an SM (256 on the H200's 132 SMs) leave half
# of its warp slots idle. Measured on the H200 (Qwen2.5-7B shapes, device time per decode
# step against FP16, 256 / 512 groups): 128K 0.96 / 0.98x, 8 x 32K 1.03 / 1.05x, but 32K
# 0.97 / 0.94x (its splits' 256 tokens too few for a group's fixed cost).
MIN_TOKENS_PER_SPLIT = 128
TARGET_GROUPS = 256
LONG_TARGET_GROUPS = 512
SLOTS_PER_LONG_GROUP = 1024
# Calls of more than LONG_KERNEL_GROUPS thread groups run the tensor-core partial kernel
# compiled for LONG_KERNEL_MIN_GROUPS groups an SM (`__launch_bounds__`: 128 registers
# at head_dim 128). Unbounded, NVRTC gives it 164 registers, three groups an SM: the
# 512-group calls of long contexts ran in 1.3 waves, two warps a scheduler. Measured on
# the H200 (Qwen2.5-7B shapes, µs a call, unbounded / bounded): 128K 69.0 / 54.8, 8 x 32K
# 112.5 / 103.5, but 1K 14.5 / 15.4 and 16K 19.0 / 20.0 (up to 256 groups, which fit
# three an SM, lose the registers and gain nothing). 396: three groups on each of the
# H200's (and H100's) 132 SMs.
LONG_KERNEL_GROUPS = 3 * 132
LONG_KERNEL_MIN_GROUPS = 4

CUDA_PRELUDE = """
#define TQ_SHARED __shared__
#define TQ_SYNC() __syncthreads()
#define TQ_WARP_SYNC() __syncwarp()
#define TQ_SHFL_XOR(x, m) __shfl_xor_sync(0xffffffffu, x, m)
#define TQ_CLZ(x) __clz(x)
#define TQ_PTR(T) const T*
#define TQ_OUT(T) T*
#define TQ_FN __device__ inline
#define TQ_EXP(x) __expf(x)
#define TQ_SHFL(x, l) __shfl_sync(0xffffffffu, x, l)
#define TQ_POW(x, y) powf(x, y)
#define TQ_SHARED_FLOATS float*
#define TQ_AS_SHARED_FLOATS(p) reinterpret_cast<float*>(p)
#define TQ_LOAD16(p) (*reinterpret_cast<const tq_frag*>(p))  // 16 bytes (8 halves)
#define TQ_LOAD_FLOAT4(p) (*reinterpret_cast<const float4*>(p))
#define TQ_WORD_AT(table, off) \\
  (*reinterpret_cast<const uint32_t*>(reinterpret_cast<const char*>(table) + (off)))
typedef __half half_t;
typedef unsigned long long tq_u64;
struct alignas(16) tq_frag {  // four fragment registers: one 16-byte shared load
  uint32_t x, y, z, w;
};
#if defined(__CUDACC__)  // NVRTC; the CPU emulator and the syntax check bring their own
// c += a b: one warp's m16n8k16 tensor-core product (PTX mma.sync), float16 a [16 x 16]
// and b [16 x 8] in the PTX fragment layouts, float32 sums.
template <typename C, typename A, typename B>
TQ_FN void tq_mma(C c, A a, B b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
// Two floats rounded to float16, as the bits of a half2 (lo in the low 16 bits).
TQ_FN uint32_t tq_half2_bits(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
TQ_FN float tq_round_half(float x) { return __half2float(__float2half_rn(x)); }
// The float16 in the low 16 bits of a word.
TQ_FN float tq_half_value(uint32_t bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits & 0xFFFFu)));
}
#endif
"""

METAL_PRELUDE = """
#define TQ_SHARED threadgroup
#define TQ_SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define TQ_WARP_SYNC() simdgroup_barrier(mem_flags::mem_threadgroup)
#define TQ_SHFL_XOR(x, m) simd_shuffle_xor(x, (ushort)(m))
#define TQ_CLZ(x) clz(x)
#define TQ_PTR(T) const device T*
#define TQ_OUT(T) device T*
#define TQ_FN inline
#define TQ_EXP(x) metal::fast::exp(x)
#define TQ_SHFL(x, l) simd_shuffle(x, (ushort)(l))
#define TQ_POW(x, y) metal::precise::pow(x, y)
#define TQ_SHARED_FLOATS threadgroup float*
#define TQ_AS_SHARED_FLOATS(p) ((threadgroup float*)(p))
#define TQ_LOAD16(p) (*(const device tq_frag*)(p))
#define TQ_LOAD_FLOAT4(p) (*(const device float4*)(p))
#define TQ_WORD_AT(table, off) \\
  (*(threadgroup const uint32_t*)((threadgroup const char*)(table) + (off)))
typedef half half_t;
typedef ulong tq_u64;
struct tq_frag {
  uint32_t x, y, z, w;
};
TQ_FN uint32_t tq_half2_bits(float lo, float hi) { return as_type<uint32_t>(half2(lo, hi)); }
TQ_FN float tq_round_half(float x) { return static_cast<float>(static_cast<half>(x)); }
TQ_FN float tq_half_value(uint32_t bits) {
  return static_cast<float>(as_type<half>(static_cast<ushort>(bits & 0xFFFFu)));
}
// No tensor-core product here: the host sets MMA = 0 on Metal (the per-lane path runs).
template <typename C, typename A, typename B>
TQ_FN void tq_mma(C c, A a, B b) {}
"""

# Thread and group ids: the only lines of the body that differ per backend (MLX detects
# the Metal attributes by name in the body, so they cannot hide in the header).
CUDA_IDS = "const int tq_tid = threadIdx.x; const int tq_group = blockIdx.x;\n"
METAL_IDS = (
    "const int tq_tid = thread_position_in_threadgroup.x;\n"
    "const int tq_group = threadgroup_position_in_grid.x;\n"
)

HEADER = """
// Code i of a little-endian bit stream of `bits`-bit codes (turboquant_packing), from
// device, shared or thread memory.
template <typename Words>
TQ_FN uint32_t tq_code(Words words, int i, int bits) {
  const int bit = i * bits;
  const int w = bit >> 5;
  const int shift = bit & 31;
  uint32_t code = words[w] >> shift;
  if (shift + bits > 32) {
    code |= words[w + 1] << (32 - shift);
  }
  return code & ((1u << bits) - 1u);
}

// Codes first..first+N-1 (N * bits <= 32): at most two word loads for all N.
template <int N, typename Words, typename Codes>
TQ_FN void tq_codes(Words words, int first, int bits, Codes codes) {
  const int bit = first * bits;
  const int w = bit >> 5;
  const int shift = bit & 31;
  tq_u64 x = words[w];
  if (shift + N * bits > 32) {
    x |= static_cast<tq_u64>(words[w + 1]) << 32;
  }
  x >>= shift;
  for (int i = 0; i < N; i++) {
    codes[i] = static_cast<uint32_t>(x >> (i * bits)) & ((1u << bits) - 1u);
  }
}

// Bits [bit0, bit0 + NBITS) of a little-endian word stream as words out[0..NW) (bit 0 of
// out[0] = bit bit0 of the stream), reading only the words that hold them; out[NW] = 0,
// so that tq_code may read one word past a field.
template <int NBITS, typename Words, typename Out>
TQ_FN void tq_stream(Words words, int bit0, Out out) {
  constexpr int NW = (NBITS + 31) / 32;
  const int w = bit0 >> 5;
  const int shift = bit0 & 31;
  const int last = (bit0 + NBITS - 1) >> 5;
#pragma unroll
  for (int i = 0; i < NW; i++) {
    const uint32_t lo = words[w + i];
    const uint32_t hi = w + i + 1 <= last ? words[w + i + 1] : 0u;
    out[i] = shift ? (lo >> shift) | (hi << (32 - shift)) : lo;
  }
  out[NW] = 0u;
}

// (stream >> bit) << lsh as one word, unmasked: the stream's bits from bit - lsh on
// (or, for bit < lsh, its first word shifted left). With `bit` known once unrolled, one
// funnel shift, and a code taken with lsh = 2 is already a byte offset into a table of
// words (`TQ_WORD_AT`): the tensor-core loop's table lookups need no index scaling.
// Reads words[w + 1] only past a word boundary: callers keep one word past their field.
template <typename Words>
TQ_FN uint32_t tq_bits_shl(Words words, int bit, int lsh) {
  if (bit < lsh) {
    return words[0] << (lsh - bit);
  }
  const int from = bit - lsh;
  const int w = from >> 5;
  const int s = from & 31;
  return s ? (words[w] >> s) | (words[w + 1] << (32 - s)) : words[w];
}

// Sum and max over the 32 lanes of a warp (a Metal SIMD group); every lane gets them.
TQ_FN float tq_warp_sum(float x) {
  for (int m = 16; m > 0; m >>= 1) {
    x += TQ_SHFL_XOR(x, m);
  }
  return x;
}

TQ_FN float tq_warp_max(float x) {
  for (int m = 16; m > 0; m >>= 1) {
    x = max(x, TQ_SHFL_XOR(x, m));
  }
  return x;
}

// Max and sum over a thread group of NW warps, every thread's x (every thread gets the
// result): each warp's by shuffles, then the warps' through red[0..NW), after a barrier
// (a second reduction before the next barrier takes other slots of red).
template <int NW, typename Shared>
TQ_FN float tq_group_max(float x, Shared red, int lane, int warp) {
  const float m = tq_warp_max(x);
  if (lane == 0) {
    red[warp] = m;
  }
  TQ_SYNC();
  float out = -INFINITY;
  for (int u = 0; u < NW; u++) {
    out = max(out, red[u]);
  }
  return out;
}

template <int NW, typename Shared>
TQ_FN float tq_group_sum(float x, Shared red, int lane, int warp) {
  const float s = tq_warp_sum(x);
  if (lane == 0) {
    red[warp] = s;
  }
  TQ_SYNC();
  float out = 0.0f;
  for (int u = 0; u < NW; u++) {
    out += red[u];
  }
  return out;
}

// Elements p[0..8) as floats: float16 in one 16-byte load (p 16-byte aligned), others
// one at a time.
template <typename P, typename Out>
TQ_FN void tq_load8(P p, Out out) {
  for (int j = 0; j < 8; j++) {
    out[j] = static_cast<float>(p[j]);
  }
}

// The eight float16 of 16 loaded bytes as floats.
template <typename Out>
TQ_FN void tq_halves8(tq_frag u, Out out) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  for (int j = 0; j < 8; j++) {
    out[j] = tq_half_value(w[j / 2] >> (16 * (j & 1)));
  }
}

template <typename Out>
TQ_FN void tq_load8(TQ_PTR(half_t) p, Out out) {
  tq_halves8(TQ_LOAD16(p), out);
}

// Key-mean segment of position p (turboquant_cache.key_mean_segment): 0 below 32, else
// floor(log4(p / 32)) + 1, at most max_segment; and b_s, the segment's first position.
TQ_FN int tq_segment(int p, int max_segment) {
  if (p < 32) {
    return 0;
  }
  const int log2 = 31 - TQ_CLZ(p >> 5);
  return min(max_segment, log2 / 2 + 1);
}

TQ_FN int tq_segment_start(int s) {
  return s == 0 ? 0 : 32 << (2 * (s - 1));
}

// The Walsh-Hadamard butterfly's strides 1, 2, .. below min(n, 32) across a warp, lane l
// holding coordinate l of each 32 (shuffles: no barrier); unnormalised.
TQ_FN float tq_warp_butterfly(float x, int lane, int n) {
  for (int m = 1; m < n && m < 32; m <<= 1) {
    const float other = TQ_SHFL_XOR(x, m);
    x = (lane & m) == 0 ? x + other : other - x;
  }
  return x;
}

// h <- H h / sqrt(D) (Sylvester Hadamard, as mx.hadamard_transform for powers of two): a
// Walsh-Hadamard butterfly, thread d of D owning coordinate d, its strides below 32
// within a warp (shuffles: no barrier), the others through shared memory. Callers
// write h[d] before (only thread d reads it first); every thread may read all of h
// after.
template <int D, typename Shared>
TQ_FN void tq_hadamard(Shared h, int d) {
  float x = tq_warp_butterfly(h[d], d & 31, D);
  for (int len = 32; len < D; len <<= 1) {
    TQ_SYNC();  // the previous stage's readers are done
    h[d] = x;
    TQ_SYNC();
    const float other = h[d ^ len];
    x = (d & len) == 0 ? x + other : other - x;
  }
  TQ_SYNC();
  h[d] = x * (1.0f / sqrt((float)D));
  TQ_SYNC();
}

// x <- H x / sqrt(D) held by one warp (a Metal SIMD group), lane l holding coordinates
// [l DPL, (l + 1) DPL) in x[0..DPL), DPL = D / 32: tq_hadamard's butterfly, the same
// sums in the same order, its strides below DPL within the lane and the others across
// lanes (shuffles): no shared memory, no barrier.
template <int D, typename X>
TQ_FN void tq_hadamard_lanes(X x, int lane) {
  constexpr int DPL = D / 32;
  for (int len = 1; len < DPL; len <<= 1) {
    for (int k = 0; k < DPL; k++) {
      if ((k & len) == 0) {
        const float a = x[k];
        const float b = x[k + len];
        x[k] = a + b;
        x[k + len] = a - b;
      }
    }
  }
  for (int m = 1; m < 32; m <<= 1) {  // stride m DPL: the partner is lane ^ m
    const bool low = (lane & m) == 0;
    for (int k = 0; k < DPL; k++) {
      const float other = TQ_SHFL_XOR(x[k], m);
      x[k] = low ? x[k] + other : other - x[k];
    }
  }
  for (int k = 0; k < DPL; k++) {
    x[k] *= 1.0f / sqrt((float)D);
  }
}
"""

# The decode kernel. A thread group takes one KV head of one sequence (bh), up to RC of
# its R query rows (row r = g L + l: GQA head g, query token l) and one split of the
# coded slots. Each of its NT / 32 warps runs flash decoding on its own tokens (a token
# per lane for the scores, DPL = D / 32 coordinates per lane for the values); the warps
# merge at the end. Row r's query sits at slot t = slots - L + l and reads the codes of
# slots [pad, min(coded, bound)), bound = start (the row's first float16 slot read) with
# a float16 buffer (WIN; the merge kernel reads that part), t + 1 if CAUSAL, else
# everything coded.
# Keys of segment s are scored as Π(q∘σ_s)·(n_j c_j + M̃_s) with M̃_s = Π(μ_s/σ_s)
# (`TurboQuantCodec`; σ = 1 without key scaling): the group rotates its queries once per
# segment its tokens fall in (segment ids from positions, or from `segments` in a ring).
# Template (constants written into the source, `_specialised`): D, R, RC, L, NT, KB/VB
# bits, KW/VW words, MAXSEG, SCALED, RING, WIN, CAUSAL, ROT (1: the group rotates the
# queries; 0: they arrive rotated, D not a power of two), HKV (KV heads), STAGE (words
# staged in shared memory). What grows with the context is a runtime parameter, so a
# long generation compiles nothing new. Inputs: q [BH, R, D]; key_signs [D];
# seg_scale / seg_mean [BH, NSEG, D] f32; packed keys / values [BH, CAP, KW|VW] u32 and
# norms [BH, CAP] f16; segments [CAP] (ring); codebooks; params f32 = {coded, BOUNDS,
# scale, slots, first, cap, SPLITS, NSEG (segments held, 0: no centering), the float16
# buffer's slots per head, then pad and start per sequence, then at params[BOUNDS] the
# SPLITS + 1 slots where the splits begin and end (`split_bounds`)}. Outputs per (bh,
# split, row): the unnormalised output, the running max and the sum of the softmax.
PARTIAL_BODY = """
  constexpr int NW = NT / 32;
  constexpr int DPL = D / 32;
  constexpr int CH = DPL % 4 == 0 ? 4 : (DPL % 2 == 0 ? 2 : 1);
  constexpr int CHUNKS = (R + RC - 1) / RC;
  // MMA layout: k-tiles of 16 dims; a quad's lane t holds key dims [t QD, (t + 1) QD)
  // (B fragments), lane group g value dims [g VD, (g + 1) VD) (A fragments); ROWT
  // tiles of 8 query rows.
  constexpr int KT = D / 16;
  constexpr int QD = D / 4;
  constexpr int VD = D / 8;
  constexpr int ROWT = RC > 8 ? 2 : 1;
  constexpr int KSW = (QD * KB + 31) / 32;
  constexpr int VSW = (VD * VB + 31) / 32;
  const int lane = tq_tid & 31;
  const int warp = tq_tid >> 5;
  const int coded = static_cast<int>(params[0]);
  const int bounds = static_cast<int>(params[1]);
  const float sc = params[2];
  const int slots = static_cast<int>(params[3]);
  const int cap = static_cast<int>(params[5]);
  const int splits = static_cast<int>(params[6]);
  const int nseg = static_cast<int>(params[7]);
  const int split = tq_group % splits;
  const int chunk = (tq_group / splits) % CHUNKS;
  const int bh = tq_group / (splits * CHUNKS);
  const int pad = static_cast<int>(params[9 + 2 * (bh / HKV)]);
  const int start = static_cast<int>(params[10 + 2 * (bh / HKV)]);
  const int r0 = chunk * RC;

  TQ_SHARED float qs[RC * D];
  TQ_SHARED float qm[RC];
  TQ_SHARED float key_cb[1 << KB];
  TQ_SHARED float value_cb[1 << VB];
  TQ_SHARED float probs[MMA ? 1 : NT * RC];
  TQ_SHARED float warp_m[NW * RC];
  TQ_SHARED float warp_l[NW * RC];
  // STAGE: each warp copies its 32 tokens' words here with coalesced loads first (a
  // lane's own loads would be strided, and values are read token after token).
  TQ_SHARED uint32_t key_stage[STAGE ? NT * (KW | 1) : 1];
  TQ_SHARED uint32_t value_stage[STAGE ? NT * VW : 1];
  // MMA (tensor cores, CUDA): the rows' queries as float16 A fragments, hi and lo parts
  // (q = hi + lo to ~2^-22), and float16 centroid pairs indexed by two codes.
  // (After the token loop the warps' output fragments go here: `warp_o`.)
  TQ_SHARED tq_frag qfrag[MMA ? (2 > NW * ROWT ? 2 : NW * ROWT) * KT * 32 : 1];
  TQ_SHARED uint32_t key_pairs[MMA ? 1 << (2 * KB) : 1];
  TQ_SHARED uint32_t value_pairs[MMA ? 1 << (2 * VB) : 1];
  for (int i = tq_tid; i < (1 << KB); i += NT) {
    key_cb[i] = key_codebook[i];
  }
  for (int i = tq_tid; i < (1 << VB); i += NT) {
    value_cb[i] = value_codebook[i];
  }
  if (MMA) {
    for (int i = tq_tid; i < (1 << (2 * KB)); i += NT) {
      key_pairs[i] = tq_half2_bits(key_codebook[i & ((1 << KB) - 1)], key_codebook[i >> KB]);
    }
    for (int i = tq_tid; i < (1 << (2 * VB)); i += NT) {
      value_pairs[i] =
          tq_half2_bits(value_codebook[i & ((1 << VB) - 1)], value_codebook[i >> VB]);
    }
  }

  // The coded slots each row reads, [pad, hi_r), and their union within this group's
  // split.
  int hi_r[RC];
  int hi = 0;
  for (int i = 0; i < RC; i++) {
    const int t = slots - L + (min(r0 + i, R - 1) % L);
    const int bound = WIN ? start : (CAUSAL ? t + 1 : coded);
    hi_r[i] = min(bound, coded);
    hi = max(hi, hi_r[i]);
  }
  const int lo = max(pad, static_cast<int>(params[bounds + split]));
  hi = min(hi, static_cast<int>(params[bounds + split + 1]));

  float mr[2] = {-INFINITY, -INFINITY};  // MMA: rows g and g + 8 of the lane's quad
  float lr[2] = {0.0f, 0.0f};
  float oacc[MMA ? ROWT : 1][MMA ? KT : 1][4];
#pragma unroll
  for (int rt = 0; rt < (MMA ? ROWT : 1); rt++) {
#pragma unroll
    for (int mt = 0; mt < (MMA ? KT : 1); mt++) {
#pragma unroll
      for (int e = 0; e < 4; e++) {
        oacc[rt][mt][e] = 0.0f;
      }
    }
  }
  float m[RC];
  float l[RC];
  float acc[RC][DPL];
  for (int i = 0; i < RC; i++) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
    for (int k = 0; k < DPL; k++) {
      acc[i][k] = 0.0f;
    }
  }

  // One pass per key-mean segment the group's slots hold.
  const bool by_segment = nseg > 1;
  int s_first = 0;
  int s_last = 0;
  if (by_segment && RING) {
    s_last = nseg - 1;
  } else if (by_segment && lo < hi) {
    s_first = tq_segment(lo - pad, MAXSEG);
    s_last = tq_segment(hi - 1 - pad, MAXSEG);
  }
  for (int s = s_first; s <= s_last; s++) {
    const int sid = min(s, nseg > 0 ? nseg - 1 : 0);
    int pass_lo = lo;
    int pass_hi = hi;
    if (by_segment && !RING) {
      pass_lo = max(lo, pad + tq_segment_start(s));
      if (s < MAXSEG) {
        pass_hi = min(hi, pad + tq_segment_start(s + 1));
      }
    }
    // (a) The rows' queries as scored: Π(q∘σ_s) (signs, then a butterfly over all
    // rows).
    TQ_SYNC();
    for (int i = tq_tid; i < RC * D; i += NT) {
      const int e = i % D;
      float x = static_cast<float>(q[((size_t)bh * R + min(r0 + i / D, R - 1)) * D + e]);
      if (SCALED) {
        x *= seg_scale[((size_t)bh * nseg + sid) * D + e];
      }
      if (ROT) {
        x *= key_signs[e];
      }
      qs[i] = x;
    }
    TQ_SYNC();
    if (ROT) {
      // Strides 1..16 (index bits 0-4) by shuffles within a warp, a warp per row and
      // 32 dims at a time; the strides from 32 on through shared memory (a barrier
      // each): 4 barriers a pass at D 128 instead of 8, 128 registers kept. On the H200
      // the partial kernel took 0.3-1 µs less a call at 1K-16K, 6 at 128K, 10 at 8 x 32K.
      for (int i = warp; i < RC; i += NW) {
        for (int k = 0; k < DPL; k++) {
          const int at = i * D + k * 32 + lane;
          qs[at] = tq_warp_butterfly(qs[at], lane, 32);
        }
      }
      TQ_SYNC();
      for (int len = 32; len < D; len <<= 1) {
        for (int i = tq_tid; i < RC * D / 2; i += NT) {
          const int p = i % (D / 2);
          const int at = (i / (D / 2)) * D + (p / len) * 2 * len + p % len;
          const float a = qs[at];
          const float b = qs[at + len];
          qs[at] = a + b;
          qs[at + len] = a - b;
        }
        TQ_SYNC();
      }
      for (int i = tq_tid; i < RC * D; i += NT) {
        qs[i] *= 1.0f / sqrt((float)D);
      }
      TQ_SYNC();
    }
    // (Π(q∘σ_s))·M̃_s, a warp per row.
    for (int i = warp; i < RC; i += NW) {
      float dot = 0.0f;
      if (nseg > 0) {
        for (int e = lane; e < D; e += 32) {
          dot += qs[i * D + e] * seg_mean[((size_t)bh * nseg + sid) * D + e];
        }
      }
      dot = tq_warp_sum(dot);
      if (lane == 0) {
        qm[i] = dot;
      }
    }
    // MMA: A fragment registers of rows g, g + 8 (dims of k-tile kt as the B side
    // holds them: quad lane t takes t QD + 4 kt + {0, 1} and {2, 3}).
    if (MMA) {
      for (int i = tq_tid; i < KT * 32; i += NT) {
        const int kt = i / 32;
        const int g = (i % 32) >> 2;
        const int t = i & 3;
        uint32_t hi[4];
        uint32_t lo[4];
        for (int r = 0; r < 4; r++) {
          const int row = g + 8 * (r & 1);
          const int dim = t * QD + 4 * kt + 2 * (r >> 1);
          const float x0 = row < RC ? qs[row * D + dim] : 0.0f;
          const float x1 = row < RC ? qs[row * D + dim + 1] : 0.0f;
          hi[r] = tq_half2_bits(x0, x1);
          lo[r] = tq_half2_bits(x0 - tq_round_half(x0), x1 - tq_round_half(x1));
        }
        qfrag[i].x = hi[0];
        qfrag[i].y = hi[1];
        qfrag[i].z = hi[2];
        qfrag[i].w = hi[3];
        qfrag[KT * 32 + i].x = lo[0];
        qfrag[KT * 32 + i].y = lo[1];
        qfrag[KT * 32 + i].z = lo[2];
        qfrag[KT * 32 + i].w = lo[3];
      }
    }
    TQ_SYNC();

    // (b, MMA) 32 tokens per warp at a time on tensor cores: S = Q Kᵀ in 4 tiles of 8
    // tokens (lane g, t: S rows g, g + 8, tokens 2t, 2t + 1 of each tile), the online
    // softmax per row (quad shuffles), then Oᵀ += Vᵀ Pᵀ in 2 tiles of 16 tokens, whose
    // B fragments are the P tiles as they lie (value dims g VD + 2 mt, + 1 as A rows g,
    // g + 8 of m-tile mt).
    for (int base = pass_lo + warp * 32; MMA && base < pass_hi; base += NT) {
      const int g = lane >> 2;
      const int t = lane & 3;
      // Every load of the iteration first (one wait on memory, not three): the key
      // words of the lane's B-side tokens, the value words of its A-side tokens (u =
      // 0..3 of k-tile kt2: 2t, 2t + 1, 2t + 8, 2t + 9) and the norms of its C-side ones.
      // Slots past the pass (the last iteration's) read its last slot instead, whose
      // codes and norms are finite: their scores are masked (`live`), so their
      // probabilities are 0 and so are their products, and no load needs a branch.
      const int last = pass_hi - 1;
      uint32_t ks[4][KSW + 1];
      uint32_t vs[2][4][VSW + 1];
      float kn[4][2];
      float vn[4][2];
      bool live[4][2];
#pragma unroll
      for (int nt = 0; nt < 4; nt++) {
        const int j = min(base + nt * 8 + g, last);
        tq_stream<QD * KB>(packed_keys + ((size_t)bh * cap + j) * KW, t * QD * KB, ks[nt]);
      }
#pragma unroll
      for (int kt2 = 0; kt2 < 2; kt2++) {
#pragma unroll
        for (int u = 0; u < 4; u++) {
          const int j = min(base + 16 * kt2 + 2 * t + (u & 1) + 8 * (u >> 1), last);
          tq_stream<VD * VB>(packed_values + ((size_t)bh * cap + j) * VW, g * VD * VB,
                             vs[kt2][u]);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; nt++) {
#pragma unroll
        for (int e = 0; e < 2; e++) {
          const int slot = base + nt * 8 + 2 * t + e;
          const int j = min(slot, last);
          bool ok = slot <= last;
          if (RING && by_segment && ok) {
            ok = static_cast<int>(segments[j]) == s;
          }
          live[nt][e] = ok;
          kn[nt][e] = static_cast<float>(key_norms[(size_t)bh * cap + j]);
          vn[nt][e] = static_cast<float>(value_norms[(size_t)bh * cap + j]);
        }
      }
      // S, with the hi and lo query parts in separate sums (two short chains of
      // dependent products instead of one long one).
      float sv[4][4];
      float sl[4][4];
#pragma unroll
      for (int nt = 0; nt < 4; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          sv[nt][e] = 0.0f;
          sl[nt][e] = 0.0f;
        }
      }
#pragma unroll
      for (int kt = 0; kt < KT; kt++) {
        const tq_frag qh = qfrag[kt * 32 + lane];
        const tq_frag ql = qfrag[(KT + kt) * 32 + lane];
        const uint32_t a_hi[4] = {qh.x, qh.y, qh.z, qh.w};
        const uint32_t a_lo[4] = {ql.x, ql.y, ql.z, ql.w};
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
          // Two codes' pair-table entry, from byte offsets 4 x (the codes' 2 KB bits).
          constexpr uint32_t PAIR = ((1u << (2 * KB)) - 1u) << 2;
          const uint32_t b[2] = {
              TQ_WORD_AT(key_pairs, tq_bits_shl(ks[nt], 2 * kt * 2 * KB, 2) & PAIR),
              TQ_WORD_AT(key_pairs, tq_bits_shl(ks[nt], (2 * kt + 1) * 2 * KB, 2) & PAIR)};
          tq_mma(sv[nt], a_hi, b);
          tq_mma(sl[nt], a_lo, b);
        }
      }
#pragma unroll
      for (int nt = 0; nt < 4; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
          sv[nt][e] += sl[nt][e];
        }
      }
      float alpha[2] = {1.0f, 1.0f};
      uint32_t pb[4][2];
#pragma unroll
      for (int h = 0; h < ROWT; h++) {
        const int i = g + 8 * h;
        const int t_row = slots - L + (min(r0 + i, R - 1) % L);
        const int bound = WIN ? start : (CAUSAL ? t_row + 1 : coded);
        const int row_hi = min(bound, coded);
        const float mean_dot = i < RC ? qm[i] : 0.0f;
        float x[4][2];
        float top = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
#pragma unroll
          for (int e = 0; e < 2; e++) {
            const int j = base + nt * 8 + 2 * t + e;
            const bool ok = i < RC && live[nt][e] && j >= pad && j < row_hi;
            x[nt][e] = ok ? sc * (kn[nt][e] * sv[nt][2 * h + e] + mean_dot) : -INFINITY;
            top = max(top, x[nt][e]);
          }
        }
        top = max(top, TQ_SHFL_XOR(top, 1));
        top = max(top, TQ_SHFL_XOR(top, 2));
        const float m_new = max(mr[h], top);
        float sum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 4; nt++) {
          float p[2];
#pragma unroll
          for (int e = 0; e < 2; e++) {
            p[e] = m_new == -INFINITY ? 0.0f : TQ_EXP(x[nt][e] - m_new);
            sum += p[e];
          }
          pb[nt][h] = tq_half2_bits(p[0] * vn[nt][0], p[1] * vn[nt][1]);
        }
        sum += TQ_SHFL_XOR(sum, 1);
        sum += TQ_SHFL_XOR(sum, 2);
        if (m_new != -INFINITY) {
          alpha[h] = TQ_EXP(mr[h] - m_new);
          lr[h] = lr[h] * alpha[h] + sum;
          mr[h] = m_new;
        }
      }
      // Rescale Oᵀ: its columns 2t, 2t + 1 of row tile rt are rows 8 rt + 2t (+ 1),
      // whose factor lane 4 (2t (+ 1)) holds.
#pragma unroll
      for (int rt = 0; rt < ROWT; rt++) {
        const float a0 = TQ_SHFL(alpha[rt], 8 * t);
        const float a1 = TQ_SHFL(alpha[rt], 8 * t + 4);
#pragma unroll
        for (int mt = 0; mt < KT; mt++) {
          oacc[rt][mt][0] *= a0;
          oacc[rt][mt][1] *= a1;
          oacc[rt][mt][2] *= a0;
          oacc[rt][mt][3] *= a1;
        }
      }
#pragma unroll
      for (int kt2 = 0; kt2 < 2; kt2++) {
        uint32_t b[2][2];
#pragma unroll
        for (int rt = 0; rt < ROWT; rt++) {
          b[rt][0] = pb[2 * kt2][rt];
          b[rt][1] = pb[2 * kt2 + 1][rt];
        }
#pragma unroll
        for (int mt = 0; mt < KT; mt++) {
          // The lane's tokens u = 0..3 of this k-tile (2t, 2t + 1, 2t + 8, 2t + 9): A
          // registers pair two tokens' codes of one value dim, c(u, d) | c(u + 1, d) <<
          // VB, as byte offsets: token u's codes of dims 2 mt, 2 mt + 1 taken shifted
          // left by 2, token u + 1's by 2 + VB, and the two combined under masks.
          constexpr uint32_t M = (1u << VB) - 1u;
          uint32_t a[4];
#pragma unroll
          for (int h = 0; h < 2; h++) {
            const uint32_t x = tq_bits_shl(vs[kt2][2 * h], mt * 2 * VB, 2);
            const uint32_t y = tq_bits_shl(vs[kt2][2 * h + 1], mt * 2 * VB, 2 + VB);
            const uint32_t dim0 = (x & (M << 2)) | (y & (M << (2 + VB)));
            const uint32_t dim1 = ((x & (M << (2 + VB))) | (y & (M << (2 + 2 * VB)))) >> VB;
            a[2 * h] = TQ_WORD_AT(value_pairs, dim0);
            a[2 * h + 1] = TQ_WORD_AT(value_pairs, dim1);
          }
#pragma unroll
          for (int rt = 0; rt < ROWT; rt++) {
            tq_mma(oacc[rt][mt], a, b[rt]);
          }
        }
      }
    }
    // (b) Without MMA: 32 tokens per warp at a time, a token per lane for the scores.
    for (int base = pass_lo + warp * 32; !MMA && base < pass_hi; base += NT) {
      const int j = base + lane;
      const int n = min(32, pass_hi - base);
      if (STAGE) {
        const size_t slot0 = (size_t)bh * cap + base;
        for (int i = lane; i < n * KW; i += 32) {
          const int t = i / KW;
          key_stage[(warp * 32 + t) * (KW | 1) + i - t * KW] = packed_keys[slot0 * KW + i];
        }
        for (int i = lane; i < n * VW; i += 32) {
          value_stage[warp * 32 * VW + i] = packed_values[slot0 * VW + i];
        }
        TQ_WARP_SYNC();
      }
      bool live = j < pass_hi;
      if (RING && by_segment && live) {
        live = static_cast<int>(segments[j]) == s;
      }
      float dots[RC];
      for (int i = 0; i < RC; i++) {
        dots[i] = 0.0f;
      }
      float norm = 0.0f;
      float value_scale = 0.0f;
      if (live) {
        // The token's words into registers (independent loads, issued together), then
        // scores straight from the codes: n_j Σ_d (Πq)_d c[idx_jd].
        uint32_t kw[KW + 1];
        for (int w = 0; w < KW; w++) {
          kw[w] = STAGE ? key_stage[tq_tid * (KW | 1) + w]
                        : packed_keys[((size_t)bh * cap + j) * KW + w];
        }
        kw[KW] = 0;
        norm = static_cast<float>(key_norms[(size_t)bh * cap + j]);
        value_scale = static_cast<float>(value_norms[(size_t)bh * cap + j]);
#pragma unroll
        for (int e = 0; e < D; e++) {
          const float c = key_cb[tq_code(kw, e, KB)];
          for (int i = 0; i < RC; i++) {
            dots[i] += qs[i * D + e] * c;
          }
        }
      }
      // Online softmax of each row over the warp's 32 tokens (warp-uniform branches).
      for (int i = 0; i < RC; i++) {
        const bool ok = live && j >= pad && j < hi_r[i];
        const float x = ok ? sc * (norm * dots[i] + qm[i]) : -INFINITY;
        const float m_new = max(m[i], tq_warp_max(x));
        float p = 0.0f;
        if (m_new != -INFINITY) {
          const float alpha = TQ_EXP(m[i] - m_new);
          p = TQ_EXP(x - m_new);
          l[i] = l[i] * alpha + tq_warp_sum(p);
          for (int k = 0; k < DPL; k++) {
            acc[i][k] *= alpha;
          }
          m[i] = m_new;
        }
        probs[tq_tid * RC + i] = p * value_scale;
      }
      TQ_WARP_SYNC();
      // Values: lane owns coordinates lane * DPL ...; o += p_j m_j c'[idx_jd].
      for (int t = 0; t < n; t++) {
        float v[DPL];
        for (int k0 = 0; k0 < DPL; k0 += CH) {
          uint32_t codes[CH];
          if (STAGE) {
            tq_codes<CH>(value_stage + (warp * 32 + t) * VW, lane * DPL + k0, VB, codes);
          } else {
            tq_codes<CH>(packed_values + ((size_t)bh * cap + base + t) * VW, lane * DPL + k0,
                         VB, codes);
          }
          for (int k = 0; k < CH; k++) {
            v[k0 + k] = value_cb[codes[k]];
          }
        }
        for (int i = 0; i < RC; i++) {
          const float p = probs[(warp * 32 + t) * RC + i];
          for (int k = 0; k < DPL; k++) {
            acc[i][k] += p * v[k];
          }
        }
      }
      TQ_WARP_SYNC();
    }
  }

  // Merge the warps. MMA: each warp stores its raw Oᵀ fragments (lane-major, no bank
  // conflicts) over the query fragments, which no warp reads any more; after one
  // barrier, thread (w, lane) sums the fragments mt = w, w + NW, ... of that lane over
  // the warps, each rescaled to the row's group max. (Warps taking turns to add into
  // shared memory, a barrier each, took 5-8 µs of a 12-18 µs thread group at 1K-16K on
  // the H200.) Without MMA the warps take turns.
  TQ_SYNC();
  if (MMA && (lane & 3) == 0) {
#pragma unroll
    for (int h = 0; h < ROWT; h++) {
      const int i = (lane >> 2) + 8 * h;
      if (i < RC) {
        warp_m[warp * RC + i] = mr[h];
        warp_l[warp * RC + i] = lr[h];
      }
    }
  }
  if (!MMA && lane == 0) {
    for (int i = 0; i < RC; i++) {
      warp_m[warp * RC + i] = m[i];
      warp_l[warp * RC + i] = l[i];
    }
  }
  TQ_SHARED_FLOATS warp_o = TQ_AS_SHARED_FLOATS(qfrag);
  if (MMA) {
#pragma unroll
    for (int rt = 0; rt < ROWT; rt++) {
#pragma unroll
      for (int mt = 0; mt < KT; mt++) {
#pragma unroll
        for (int k = 0; k < 4; k++) {
          warp_o[(((warp * ROWT + rt) * KT + mt) * 4 + k) * 32 + lane] = oacc[rt][mt][k];
        }
      }
    }
  } else {
    for (int i = tq_tid; i < RC * D; i += NT) {
      qs[i] = 0.0f;
    }
  }
  TQ_SYNC();
  for (int w = 0; !MMA && w < NW; w++) {
    if (warp == w) {
      for (int i = 0; i < RC; i++) {
        float top = -INFINITY;
        for (int u = 0; u < NW; u++) {
          top = max(top, warp_m[u * RC + i]);
        }
        const float f = m[i] == -INFINITY ? 0.0f : TQ_EXP(m[i] - top);
        for (int k = 0; k < DPL; k++) {
          qs[i * D + lane * DPL + k] += f * acc[i][k];
        }
      }
    }
    TQ_SYNC();
  }
  const size_t out_base = ((size_t)bh * splits + split) * R;
  if (MMA) {
    // Fragment element k of lane (g, t) in row tile rt, m-tile mt: row 8 rt + 2t + (k & 1),
    // dim g VD + 2 mt + (k >> 1).
    const int g = lane >> 2;
    const int t = lane & 3;
#pragma unroll
    for (int rt = 0; rt < ROWT; rt++) {
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int i = 8 * rt + 2 * t + e;
        if (i < RC && r0 + i < R) {
          float f[NW];
          float top = -INFINITY;
#pragma unroll
          for (int u = 0; u < NW; u++) {
            top = max(top, warp_m[u * RC + i]);
          }
#pragma unroll
          for (int u = 0; u < NW; u++) {
            const float mu = warp_m[u * RC + i];
            f[u] = mu == -INFINITY ? 0.0f : TQ_EXP(mu - top);
          }
          for (int mt = warp; mt < KT; mt += NW) {
            float x0 = 0.0f;
            float x1 = 0.0f;
#pragma unroll
            for (int u = 0; u < NW; u++) {
              const int at = ((u * ROWT + rt) * KT + mt) * 4 * 32 + lane;
              x0 += f[u] * warp_o[at + e * 32];
              x1 += f[u] * warp_o[at + (2 + e) * 32];
            }
            const size_t o = (out_base + r0 + i) * D + g * VD + 2 * mt;
            partial_out[o] = x0;
            partial_out[o + 1] = x1;
          }
        }
      }
    }
  } else {
    for (int i = tq_tid; i < RC * D; i += NT) {
      if (r0 + i / D < R) {
        partial_out[(out_base + r0 + i / D) * D + i % D] = qs[i];
      }
    }
  }
  if (tq_tid < RC && r0 + tq_tid < R) {
    float top = -INFINITY;
    for (int u = 0; u < NW; u++) {
      top = max(top, warp_m[u * RC + tq_tid]);
    }
    float sum = 0.0f;
    for (int u = 0; u < NW; u++) {
      const float mu = warp_m[u * RC + tq_tid];
      sum += mu == -INFINITY ? 0.0f : TQ_EXP(mu - top) * warp_l[u * RC + tq_tid];
    }
    partial_max[out_base + r0 + tq_tid] = top;
    partial_sum[out_base + r0 + tq_tid] = sum;
  }
"""

# One thread group of D threads per (batch x KV head x row): merge the code splits
# (flash-decoding) and rotate them back (ROT: Π⁻¹y = D H y / sqrt(D)); with a float16
# buffer (WIN), attend to the row's part of it, slots [max(start, first), t + 1) (the
# partial kernel reads codes only), and merge the two; normalise, write the model's
# dtype. The buffer's float16 keys are scored against the model-domain queries q (a
# rotation keeps dot products); its values are summed as given: the model's domain, or
# (ROT = 0) rotated by the host, whose output is then rotated back. Its tokens go CW at
# a time (online softmax): TS threads score a token, its key row in 16-byte loads
# issued together (the first chunk's before the splits' merge, the next chunk's while a
# chunk's values are summed); then each thread sums one 16-byte piece of the values of
# every TPASS-th token, its loads issued together, and shared memory adds the TPASS
# partial sums of each dim. (Warps scoring 8 tokens at a time, a warp sum per token,
# took 8.6 µs of a 1K decode step's layer on the H200, its three chunks each waiting
# on memory.) Template: D, R, L, WIN, ROT, HKV. Inputs: the partial kernel's outputs,
# value_signs [D], q [BH, R, D] (model domain), window_keys / values [BH, n, D] (slot
# first + i at i; n >= slots - first; keys float16), params (the partial kernel's).
MERGE_BODY = """
  // The window in chunks of CW tokens: TS threads per token score it (DT dims each, 16
  // bytes a load), then TPASS tokens at a time per value pass, a 16-byte piece a thread.
  constexpr int NW = D / 32;
  constexpr int TS = D <= 128 ? 1 : (D <= 256 ? 2 : 4);
  constexpr int DT = D / TS;
  constexpr int CW = D / TS;
  constexpr int PIECES = D / 8;
  constexpr int TPASS = D / PIECES;
  const int row = tq_group;
  const int bh = row / R;
  const int d = tq_tid;
  const int lane = d & 31;
  const int warp = d >> 5;
  const int splits = static_cast<int>(params[6]);
  TQ_SHARED float h[D];
  TQ_SHARED float qrow[WIN ? D : 1];
  TQ_SHARED float probs[WIN ? CW : 1];
  TQ_SHARED float red[2 * NW];
  TQ_SHARED float pass_out[WIN ? TPASS * D : 1];
  // The row's part of the float16 buffer: slots [w_lo, w_hi), slot i at i - first.
  const float sc = params[2];
  const int first = static_cast<int>(params[4]);
  const int n_window = static_cast<int>(params[8]);  // the buffer's slots per head
  const int w_lo = WIN ? max(static_cast<int>(params[10 + 2 * (bh / HKV)]), first) : 0;
  const int w_hi = WIN ? static_cast<int>(params[3]) - L + row % R % L + 1 : 0;
  const int token = d / TS;  // the key this thread scores, and its dims
  const int dims = (d % TS) * DT;
  // The first chunk's keys are loaded before anything waits on memory: their latency
  // hides behind the splits' merge and the rotation.
  tq_frag key8[WIN ? DT / 8 : 1];
  if (WIN && w_lo + token < w_hi) {
    const size_t at = ((size_t)bh * n_window + w_lo + token - first) * D + dims;
#pragma unroll
    for (int e = 0; e < DT / 8; e++) {
      key8[e] = TQ_LOAD16(window_keys + at + 8 * e);
    }
  }
  if (WIN) {
    qrow[d] = static_cast<float>(q[(size_t)row * D + d]);
  }
  // The splits' merge (flash-decoding's combine): w_s = exp(m_s - top), den = Σ w_s l_s,
  // num = Σ w_s o_s. Each split's max and sum are read once, by one thread (SC splits a
  // chunk, a running top across chunks), its weight kept in shared memory; then every
  // thread sums 4 dims (16-byte loads) of every 4th split, the 4 copies added in shared
  // memory at the end. (Every thread reading every split's max, sum and output one at a
  // time, 8 in flight, took 10.6 µs a call at 16K on the H200: its 64 splits were 16
  // round trips to memory.)
  constexpr int SC = D;
  constexpr int QD = D / 4;  // threads per copy of the D dims
  TQ_SHARED float weights[D];  // (SC <= D: tests take shorter chunks)
  TQ_SHARED float copies[4 * D];
  const int entry = bh * splits * R + row % R;
  const int copy = d / QD;
  const int dims4 = 4 * (d % QD);
  float top = -INFINITY;
  float den = 0.0f;
  float num4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int c = 0; c < splits; c += SC) {
    const int n = min(SC, splits - c);
    const float ms = d < n ? partial_max[entry + (c + d) * R] : -INFINITY;
    const float ls = d < n ? partial_sum[entry + (c + d) * R] : 0.0f;
    const float m_new = max(top, tq_group_max<NW>(ms, red, lane, warp));
    const float w = ms == -INFINITY ? 0.0f : TQ_EXP(ms - m_new);
    weights[d] = w;
    const float sum = tq_group_sum<NW>(w * ls, red + NW, lane, warp);
    const float alpha = top == -INFINITY ? 0.0f : TQ_EXP(top - m_new);
    den = den * alpha + sum;
    top = m_new;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      num4[j] *= alpha;
    }
#pragma unroll 8
    for (int s = copy; s < n; s += 4) {
      const float ws = weights[s];
      const float4 o4 = TQ_LOAD_FLOAT4(partial_out + (size_t)(entry + (c + s) * R) * D + dims4);
      num4[0] += ws * o4.x;
      num4[1] += ws * o4.y;
      num4[2] += ws * o4.z;
      num4[3] += ws * o4.w;
    }
    TQ_SYNC();  // weights and red read before the next chunk writes them
  }
#pragma unroll
  for (int j = 0; j < 4; j++) {
    copies[copy * D + dims4 + j] = num4[j];
  }
  TQ_SYNC();
  const float num = (copies[d] + copies[D + d]) + (copies[2 * D + d] + copies[3 * D + d]);
  float o = num;
  if (ROT) {
    h[d] = o;
    tq_hadamard<D>(h, d);
    o = h[d] * value_signs[d];
  }
  if (WIN) {
    float wm = -INFINITY;  // the window part's max, sum and output (dim d)
    float wl = 0.0f;
    float window_o = 0.0f;
    const int vt = d / PIECES;  // value passes: token vt of each TPASS, dims 8 vp ..
    const int vp = d % PIECES;
    for (int c = w_lo; c < w_hi; c += CW) {
      const int n = min(CW, w_hi - c);
      TQ_SYNC();  // qrow written; the previous chunk's probabilities and sums read
      // Scores, one key per TS threads (their partial dots summed by shuffles).
      float dot[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int e = 0; e < DT / 8; e++) {
        float k[8];
        tq_halves8(key8[e], k);
#pragma unroll
        for (int j = 0; j < 8; j++) {
          dot[j & 3] += qrow[dims + 8 * e + j] * k[j];
        }
      }
      float x = (dot[0] + dot[1]) + (dot[2] + dot[3]);
      for (int m = 1; m < TS; m <<= 1) {
        x += TQ_SHFL_XOR(x, m);
      }
      x = token < n ? sc * x : -INFINITY;
      if (c + CW + token < w_hi) {  // the next chunk's keys, while this one's values run
        const size_t at = ((size_t)bh * n_window + c + CW + token - first) * D + dims;
#pragma unroll
        for (int e = 0; e < DT / 8; e++) {
          key8[e] = TQ_LOAD16(window_keys + at + 8 * e);
        }
      }
      // The chunk's max and sum over the group (a warp's, then the warps').
      const float m_new = max(wm, tq_group_max<NW>(x, red, lane, warp));
      const float pr = x == -INFINITY ? 0.0f : TQ_EXP(x - m_new);
      if (d % TS == 0 && token < CW) {
        probs[token] = pr;
      }
      const float sum = tq_group_sum<NW>(d % TS == 0 ? pr : 0.0f, red + NW, lane, warp);
      const float alpha = wm == -INFINITY ? 0.0f : TQ_EXP(wm - m_new);
      wl = wl * alpha + sum;
      wm = m_new;
      // Values: this thread's 16-byte piece of tokens vt, vt + TPASS, ... (all loaded
      // at once), then the TPASS partial sums of each dim through shared memory.
      float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int i0 = 0; i0 < CW; i0 += TPASS) {
        const int i = i0 + vt;
        if (i < n) {
          float v[8];
          tq_load8(window_values + ((size_t)bh * n_window + c + i - first) * D + 8 * vp, v);
          const float pi = probs[i];
#pragma unroll
          for (int j = 0; j < 8; j++) {
            acc[j] += pi * v[j];
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 8; j++) {
        pass_out[vt * D + 8 * vp + j] = acc[j];
      }
      TQ_SYNC();
      float chunk_o = 0.0f;
      for (int t = 0; t < TPASS; t++) {
        chunk_o += pass_out[t * D + d];
      }
      window_o = window_o * alpha + chunk_o;
    }
    const float both = max(top, wm);
    const float fc = top == -INFINITY ? 0.0f : TQ_EXP(top - both);
    const float fw = wm == -INFINITY ? 0.0f : TQ_EXP(wm - both);
    o = o * fc + window_o * fw;
    den = den * fc + wl * fw;
  }
  out[(size_t)row * D + d] = static_cast<out_t>(o / den);
"""

# Quantize: one warp per vector (norm, rotation, nearest centroid, norm correction,
# pack), NT / 32 vectors per thread group; vectors [0, NK) are keys, the NV after them
# values, so one launch quantizes a decode step's keys and values. Lane l holds
# coordinates [l D / 32, (l + 1) D / 32): the sums are warp shuffles, the rotation
# `tq_hadamard_lanes`, and a warp's codes meet in shared memory only to be packed (a
# group of D threads per vector, with a barrier at every step of its reductions and
# butterfly, took 55-80 µs for a 2048-token chunk on the H200). Template: D (a power of
# two, >= 32), NT, KBITS/VBITS, KW/VW packed words, HAS_MEAN, HAS_SCALE. Keys are coded
# as k * scale - mean (key scaling: scale = 1/σ, mean = μ/σ). Inputs: keys [NK, D],
# values [NV, D], mean and scale [NK / PER_MEAN, D] f32, signs [D] f32 and codebooks
# [2^bits] f32 per kind, params f32 = {NK, PER_MEAN (keys sharing one mean: a head's
# rows), NK + NV, then per kind (keys, values) the input's rows per head and the first
# row coded, then the values' rows per head}: the coded rows of a head may be part of
# the input's (a segment piece of a prefill chunk, read where it lies, no copy); all
# runtime, so that blocks of any length reuse one compiled kernel. Outputs: packed
# [N, W] u32 and norms [N] f16 per kind.
QUANTIZE_BODY = """
  constexpr int DPL = D / 32;
  const int nk = static_cast<int>(params[0]);
  const int per_mean = static_cast<int>(params[1]);
  const int lane = tq_tid & 31;
  const int warp = tq_tid >> 5;
  const int vec = tq_group * (NT / 32) + warp;
  const bool live = vec < static_cast<int>(params[2]);  // dead warps still shuffle
  const bool is_key = vec < nk;
  const int n = live ? (is_key ? vec : vec - nk) : 0;
  // Vector n is row t of head bh in its block, read from row first + t of the input's;
  // a key's mean and scale are its head's.
  const int rows = is_key ? per_mean : static_cast<int>(params[7]);
  const int bh = n / rows;
  const size_t src = (size_t)bh * static_cast<int>(params[is_key ? 3 : 5]) +
                     static_cast<int>(params[is_key ? 4 : 6]) + (n - bh * rows);
  const int bits = is_key ? KBITS : VBITS;
  const int words = is_key ? KW : VW;
  TQ_PTR(float) signs = is_key ? key_signs : value_signs;
  TQ_PTR(float) codebook = is_key ? key_codebook : value_codebook;
  TQ_SHARED uint32_t codes[NT / 32 * D];
  float x[DPL];
  float sq = 0.0f;
  for (int k = 0; k < DPL; k++) {
    const int e = lane * DPL + k;
    float v = 0.0f;
    if (live) {
      v = is_key ? static_cast<float>(keys[src * D + e]) : static_cast<float>(values[src * D + e]);
    }
    if (HAS_SCALE && is_key && live) {
      v *= scale[(size_t)bh * D + e];
    }
    if (HAS_MEAN && is_key && live) {
      v -= mean[(size_t)bh * D + e];
    }
    x[k] = v;
    sq += v * v;
  }
  const float norm = sqrt(tq_warp_sum(sq));
  // y = H D x / ||x|| / sqrt(D): random signs, then the Walsh-Hadamard butterfly.
  for (int k = 0; k < DPL; k++) {
    x[k] = x[k] / max(norm, 1e-30f) * signs[lane * DPL + k];
  }
  tq_hadamard_lanes<D>(x, lane);
  // Nearest centroid: the number of midpoints below y (ties to the lower one).
  float csq = 0.0f;
  for (int k = 0; k < DPL; k++) {
    uint32_t code = 0;
    for (int i = 0; i + 1 < (1 << bits); i++) {
      code += (0.5f * (codebook[i] + codebook[i + 1]) < x[k]) ? 1u : 0u;
    }
    codes[warp * D + lane * DPL + k] = code;
    const float c = codebook[code];
    csq += c * c;
  }
  const float cnorm = sqrt(tq_warp_sum(csq));
  TQ_WARP_SYNC();  // the warp's codes are written
  // Pack: lane w assembles word w from the codes whose bits fall in it.
  for (int w = lane; live && w < words; w += 32) {
    uint32_t word = 0;
    const int first = (32 * w) / bits;
    const int last = min(D - 1, (32 * w + 31) / bits);
    for (int j = first; j <= last; j++) {
      const int shift = j * bits - 32 * w;
      const uint32_t code = codes[warp * D + j];
      word |= shift >= 0 ? code << shift : code >> (-shift);
    }
    if (is_key) {
      packed_keys[(size_t)n * KW + w] = word;
    } else {
      packed_values[(size_t)n * VW + w] = word;
    }
  }
  if (live && lane == 0) {
    const half_t corrected = static_cast<half_t>(norm / max(cnorm, 1e-30f));
    if (is_key) {
      key_norms[n] = corrected;
    } else {
      value_norms[n] = corrected;
    }
  }
"""

# Dequantize: one warp per slot of a row, NT / 32 slots per thread group (the prefill
# path, which then runs one SDPA over the whole context); lane l writes coordinates
# [l D / 32, (l + 1) D / 32) of
#   Πk̂ = Π(σ_s ∘ Πᵀ n c) + M_s  and  Πv̂ = m c'        (rotated domain), or
#   k̂ = σ_s ∘ Πᵀ n c + μ_s      and  v̂ = Πᵀ m c'      (INVERSE: the model's domain),
# with s the slot's key-mean segment (`TurboQuantCodec`), rotating with
# `tq_hadamard_lanes` (no barrier). Template: D (a power of two, >= 32), NT, KB/VB bits,
# KW/VW words, CENTERED, SCALED, INVERSE, SEG_ROWS (segment ids per batch row: [B, CAP],
# else [CAP]), HKV (KV heads), out_t. Inputs: packed keys / values [BH, CAP, KW|VW] u32
# and norms [BH, CAP] f16 (whole buffers); segments int32; seg_scale (σ_s, model
# domain) and seg_mean (M_s rotated, or μ_s with INVERSE) [BH, NSEG, D] f32; signs and
# codebooks; window keys / values [BH, W, D] f16; params f32 = {T (slots dequantized
# per row), CAP, NSEG, BH (T + W), W}. Rows [T, T + W) of each head's output are the
# window's float16 rows, copied (the model's domain: INVERSE), so that a prefill chunk
# reads [codes | float16 window] from one launch, not a join of two arrays.
# Outputs: keys and values [BH, T + W, D] out_t.
DEQUANT_BODY = """
  constexpr int DPL = D / 32;
  const int T = static_cast<int>(params[0]);
  const int cap = static_cast<int>(params[1]);
  const int nseg = static_cast<int>(params[2]);
  const int W = static_cast<int>(params[4]);
  const int lane = tq_tid & 31;
  const int row = tq_group * (NT / 32) + (tq_tid >> 5);  // (bh, t), flat
  const bool live = row < static_cast<int>(params[3]);  // dead warps still shuffle
  const int bh = live ? row / (T + W) : 0;
  const int t = live ? row - bh * (T + W) : 0;
  if (t >= T) {  // a window row (a warp per row: the branch is the warp's)
    const size_t at = ((size_t)bh * W + t - T) * D + lane * DPL;
    for (int i = 0; live && i < DPL; i++) {
      keys[(size_t)row * D + lane * DPL + i] = static_cast<out_t>(window_keys[at + i]);
      values[(size_t)row * D + lane * DPL + i] = static_cast<out_t>(window_values[at + i]);
    }
    return;
  }
  const size_t slot = (size_t)bh * cap + t;
  const float kn = static_cast<float>(key_norms[slot]);
  const float vn = static_cast<float>(value_norms[slot]);
  float k[DPL];
  float v[DPL];
  for (int i = 0; i < DPL; i++) {
    k[i] = key_codebook[tq_code(packed_keys + slot * KW, lane * DPL + i, KB)] * kn;
    v[i] = value_codebook[tq_code(packed_values + slot * VW, lane * DPL + i, VB)] * vn;
  }
  size_t stat = 0;
  if (CENTERED) {
    // Slots past the coded ones may carry segments not opened yet.
    const int s = min(static_cast<int>(segments[SEG_ROWS ? (bh / HKV) * cap + t : t]), nseg - 1);
    stat = ((size_t)bh * nseg + s) * D + lane * DPL;
  }
  if (SCALED || INVERSE) {  // Πᵀ n c = D H (n c) / sqrt(D)
    tq_hadamard_lanes<D>(k, lane);
    for (int i = 0; i < DPL; i++) {
      k[i] *= key_signs[lane * DPL + i];
    }
  }
  if (SCALED) {
    for (int i = 0; i < DPL; i++) {
      k[i] *= seg_scale[stat + i];
    }
    if (!INVERSE) {  // back to the rotated domain: Π x = H D x / sqrt(D)
      for (int i = 0; i < DPL; i++) {
        k[i] *= key_signs[lane * DPL + i];
      }
      tq_hadamard_lanes<D>(k, lane);
    }
  }
  if (CENTERED) {
    for (int i = 0; i < DPL; i++) {
      k[i] += seg_mean[stat + i];
    }
  }
  if (INVERSE) {
    tq_hadamard_lanes<D>(v, lane);
    for (int i = 0; i < DPL; i++) {
      v[i] *= value_signs[lane * DPL + i];
    }
  }
  for (int i = 0; live && i < DPL; i++) {
    keys[(size_t)row * D + lane * DPL + i] = static_cast<out_t>(k[i]);
    values[(size_t)row * D + lane * DPL + i] = static_cast<out_t>(v[i]);
  }
"""

# Opening key-mean segment s (`TurboQuantCodec`, `segment_stats`) from the stored codes
# of segment s - 1, in two launches where the MLX ops were a few dozen kernels per
# opening (the quantizer's statistics dominated a short prefill's launches).
# Sums: thread groups (head h, part g of G) of NT / 32 warps; a warp per token t (of up
# to two sources: `packed_keys` / `key_norms` rows a_first.. of heads a_head0 + h, then
# `piece_keys` / `piece_norms` likewise), lane l holding coordinates [l D / 32, (l + 1)
# D / 32) of x_t = Πᵀ ŷ_t = Πᵀ n c (`tq_hadamard_lanes`, then the signs); each group
# writes Σ x_t and Σ x_t² over its tokens. Template: D, NT, KB, KW. params f32 = {G, n_a,
# n_b, a_head0, a_cap, a_first, b_head0, b_cap, b_first}. Output: sums [H, G, 2, D] f32.
SEGMENT_SUMS_BODY = """
  constexpr int DPL = D / 32;
  constexpr int NW = NT / 32;
  const int G = static_cast<int>(params[0]);
  const int na = static_cast<int>(params[1]);
  const int n = na + static_cast<int>(params[2]);
  const int lane = tq_tid & 31;
  const int warp = tq_tid >> 5;
  const int h = tq_group / G;
  const int g = tq_group - h * G;
  TQ_SHARED float red[NW * 2 * D];
  float sx[DPL];
  float sxx[DPL];
  for (int k = 0; k < DPL; k++) {
    sx[k] = 0.0f;
    sxx[k] = 0.0f;
  }
  for (int t = g * NW + warp; t < n; t += G * NW) {  // warp-uniform
    const bool in_a = t < na;
    const int o = in_a ? 3 : 6;
    const size_t slot = (size_t)(static_cast<int>(params[o]) + h) * static_cast<int>(params[o + 1]) +
                        static_cast<int>(params[o + 2]) + (in_a ? t : t - na);
    TQ_PTR(uint32_t) words = (in_a ? packed_keys : piece_keys) + slot * KW;
    const float norm = static_cast<float>(in_a ? key_norms[slot] : piece_norms[slot]);
    float x[DPL];
    for (int k = 0; k < DPL; k++) {
      x[k] = key_codebook[tq_code(words, lane * DPL + k, KB)] * norm;
    }
    tq_hadamard_lanes<D>(x, lane);
    for (int k = 0; k < DPL; k++) {
      x[k] *= key_signs[lane * DPL + k];
      sx[k] += x[k];
      sxx[k] += x[k] * x[k];
    }
  }
  for (int k = 0; k < DPL; k++) {
    red[(warp * 2) * D + lane * DPL + k] = sx[k];
    red[(warp * 2 + 1) * D + lane * DPL + k] = sxx[k];
  }
  TQ_SYNC();
  for (int i = tq_tid; i < 2 * D; i += NT) {
    float acc = 0.0f;
    for (int w = 0; w < NW; w++) {
      acc += red[w * 2 * D + i];
    }
    sums[(size_t)tq_group * 2 * D + i] = acc;
  }
"""

# Stats: a thread group of D threads per head h, thread d owning coordinate d. With
# S = Σ x_t, Q = Σ x_t² over the n tokens of segment s - 1 (the sums' G parts), σ' =
# σ_{s-1} (1 for s = 1 or without scaling) and M' = M_{s-1} (0 for s = 1):
#   M_s = fp16(M' + Π(σ' ∘ S) / b_s),   μ_s = Πᵀ M_s,
# and with key scaling, the reconstructed keys σ' x_t + μ_{s-1} - μ_s having per-channel
# mean square var = σ'² Q / n + 2 σ' a S / n + a², a = μ_{s-1} - μ_s:
#   σ_s = fp16(max(v / sqrt(mean_d v²), floor)),  v = (pair-averaged var)^(exponent / 2),
# then σ_s, 1 / σ_s and μ_s / σ_s in float32 for the quantizer. Template: D, HAS_MEAN,
# HAS_SCALE (M_{s-1}, σ_{s-1} read from `key_means` / `key_scales` [heads, COLS, D] f16,
# column `col` of head head0 + h), SCALING. params f32 = {G, n, 1 / b_s, exponent / 2,
# floor, head0, COLS, col}. Outputs [H, D]: M_s and σ_s f16; μ_s, σ_s, 1/σ_s, μ_s/σ_s f32.
SEGMENT_STATS_BODY = """
  const int d = tq_tid;
  const int h = tq_group;
  const int G = static_cast<int>(params[0]);
  const float n = params[1];
  const size_t prev = ((size_t)(static_cast<int>(params[5]) + h) * static_cast<int>(params[6]) +
                       static_cast<int>(params[7])) * D + d;
  TQ_SHARED float buf[D];
  TQ_SHARED float red[D / 32];
  float S = 0.0f;
  float Q = 0.0f;
  for (int g = 0; g < G; g++) {
    S += sums[(((size_t)h * G + g) * 2) * D + d];
    Q += sums[(((size_t)h * G + g) * 2 + 1) * D + d];
  }
  const float sp = HAS_SCALE ? static_cast<float>(key_scales[prev]) : 1.0f;
  const float mp = HAS_MEAN ? static_cast<float>(key_means[prev]) : 0.0f;
  buf[d] = sp * S * key_signs[d];  // Π(σ' ∘ S) = H (signs ∘ σ' ∘ S) / sqrt(D)
  tq_hadamard<D>(buf, d);
  const float m = buf[d] * params[2];
  const half_t mean_s = static_cast<half_t>(HAS_MEAN ? mp + m : m);
  const size_t out = (size_t)h * D + d;
  new_mean[out] = mean_s;
  buf[d] = static_cast<float>(mean_s);  // μ_s = Πᵀ M_s = signs ∘ H M_s / sqrt(D)
  tq_hadamard<D>(buf, d);
  const float mu = buf[d] * key_signs[d];
  new_mu[out] = mu;
  if (SCALING) {
    float mu_prev = 0.0f;
    if (HAS_MEAN) {
      buf[d] = mp;
      tq_hadamard<D>(buf, d);
      mu_prev = buf[d] * key_signs[d];
    }
    const float a = mu_prev - mu;
    const float var = sp * sp * Q / n + 2.0f * sp * a * S / n + a * a;
    TQ_SYNC();  // every thread has read its buf[d]
    buf[d] = var;
    TQ_SYNC();
    const int p = d % (D / 2);  // RoPE pairs (d, d + D / 2) share a scale
    float v = TQ_POW((buf[p] + buf[p + D / 2]) / 2.0f, params[3]);
    const float sq = tq_warp_sum(v * v);
    if ((d & 31) == 0) {
      red[d >> 5] = sq;
    }
    TQ_SYNC();
    float total = 0.0f;
    for (int w = 0; w < D / 32; w++) {
      total += red[w];
    }
    v = v / sqrt(total / D + 1e-30f);
    const half_t scale_s = static_cast<half_t>(max(v, params[4]));
    const float sigma = static_cast<float>(scale_s);
    new_scale[out] = scale_s;
    new_sigma[out] = sigma;
    new_inv_sigma[out] = 1.0f / sigma;
    new_mu_over_sigma[out] = mu / sigma;
  }
"""

PARTIAL_INPUTS = [
    "q",
    "key_signs",
    "seg_scale",
    "seg_mean",
    "packed_keys",
    "key_norms",
    "packed_values",
    "value_norms",
    "segments",
    "key_codebook",
    "value_codebook",
    "params",
]
PARTIAL_OUTPUTS = ["partial_out", "partial_max", "partial_sum"]
MERGE_INPUTS = [
    "partial_out",
    "partial_max",
    "partial_sum",
    "value_signs",
    "q",
    "window_keys",
    "window_values",
    "params",
]

QUANTIZE_INPUTS = [
    "keys",
    "values",
    "mean",
    "scale",
    "key_signs",
    "value_signs",
    "key_codebook",
    "value_codebook",
    "params",
]
QUANTIZE_OUTPUTS = ["packed_keys", "key_norms", "packed_values", "value_norms"]
DEQUANT_INPUTS = [
    "packed_keys",
    "key_norms",
    "packed_values",
    "value_norms",
    "segments",
    "seg_scale",
    "seg_mean",
    "key_signs",
    "value_signs",
    "key_codebook",
    "value_codebook",
    "window_keys",
    "window_values",
    "params",
]
DEQUANT_OUTPUTS = ["keys", "values"]
SEGMENT_SUMS_INPUTS = [
    "packed_keys",
    "key_norms",
    "piece_keys",
    "piece_norms",
    "key_signs",
    "key_codebook",
    "params",
]
SEGMENT_STATS_INPUTS = ["sums", "key_means", "key_scales", "key_signs", "params"]
SEGMENT_STATS_OUTPUTS = [
    "new_mean",
    "new_mu",
    "new_scale",
    "new_sigma",
    "new_inv_sigma",
    "new_mu_over_sigma",
]


def kernel_sources(backend: str):
    """(header, partial, merge, quantize, dequantize, segment sums and segment stats
    bodies) for "cuda" or "metal": the shared logic with that backend's prelude and
    thread ids."""
    prelude, ids = {"cuda": (CUDA_PRELUDE, CUDA_IDS), "metal": (METAL_PRELUDE, METAL_IDS)}[backend]
    bodies = (
        PARTIAL_BODY,
        MERGE_BODY,
        QUANTIZE_BODY,
        DEQUANT_BODY,
        SEGMENT_SUMS_BODY,
        SEGMENT_STATS_BODY,
    )
    return (prelude + HEADER, *(ids + body for body in bodies))


def cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def metal_available() -> bool:
    return bool(mx.metal.is_available())


def fused_backend() -> Optional[str]:
    """The backend the fused kernels run on now, or None (CPU, or forced reference)."""
    # (`is`: DeviceType is an Enum, and its `!=` costs a decode step ~3 µs a layer.)
    if _forced_reference() or mx.default_device().type is not mx.gpu:
        return None
    return _gpu_backend()


# The environment's own dict of encoded names, which os.environ reads and writes:
# os.environ.get takes ~2 µs for an unset name (a KeyError raised and caught inside), and
# every layer of every decode step asks.
_ENVIRON = getattr(os.environ, "_data", None)
_REFERENCE_KEY = os.environ.encodekey("MLX_LM_TURBO_REFERENCE") if _ENVIRON is not None else None


def _forced_reference() -> bool:
    """Whether MLX_LM_TURBO_REFERENCE is set to anything but "" or "0"."""
    if _ENVIRON is None:
        return os.environ.get("MLX_LM_TURBO_REFERENCE", "0") not in ("", "0")
    return _ENVIRON.get(_REFERENCE_KEY, "0") not in ("", "0", b"", b"0")


@lru_cache(maxsize=None)
def _gpu_backend() -> Optional[str]:
    """The GPU's kernel backend, asked once (every layer of every step asks)."""
    if cuda_available():
        return "cuda"
    if metal_available():
        return "metal"
    return None


# How each backend builds a kernel from its sources: "emulate" (tests only) runs the
# CUDA source on the CPU (tests/kernel_emulator.py registers it here).
KERNEL_MAKERS = {
    "cuda": ("cuda", lambda: mx.fast.cuda_kernel),
    "metal": ("metal", lambda: mx.fast.metal_kernel),
}


# The kernels: name, inputs, outputs (bodies in `kernel_sources` order).
KERNELS = (
    ("turboquant_decode_partial", PARTIAL_INPUTS, PARTIAL_OUTPUTS),
    ("turboquant_decode_merge", MERGE_INPUTS, ["out"]),
    ("turboquant_quantize", QUANTIZE_INPUTS, QUANTIZE_OUTPUTS),
    ("turboquant_dequantize", DEQUANT_INPUTS, DEQUANT_OUTPUTS),
    ("turboquant_segment_sums", SEGMENT_SUMS_INPUTS, ["sums"]),
    ("turboquant_segment_stats", SEGMENT_STATS_INPUTS, SEGMENT_STATS_OUTPUTS),
)
# How each flavour spells the dtypes a kernel may be specialised to.
TYPE_NAMES = {
    "cuda": {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"},
    "metal": {mx.float16: "half", mx.bfloat16: "bfloat", mx.float32: "float"},
}


@lru_cache(maxsize=None)
def _specialised(backend: str, index: int, template: tuple):
    """Kernel `index` of KERNELS with its template constants written into its source,
    made once per set of constants, so that a call passes no template. Measured on the
    H200: building the graph of one layer's decode attention (the Python and both
    kernel calls) took 19-20 µs this way against 24-27 µs with MLX templates, and a
    decode step is bound by such host work at batch 1."""
    flavour, maker = KERNEL_MAKERS[backend]
    header, *bodies = kernel_sources(flavour)
    consts, tag = template_source(flavour, template)
    name, inputs, outputs = KERNELS[index]
    if flavour == "cuda":
        header += launch_bounds(template)
    source, header = compact_source(consts + bodies[index]), compact_source(header)
    if flavour == "cuda" and INCLUDE_SOURCES:
        source, header = _included(source), _included(header)
    return maker()(
        name=name + tag,
        input_names=inputs,
        output_names=outputs,
        source=source,
        header=header,
    )


def template_source(flavour: str, template) -> tuple:
    """(the source lines that define a template's types and constants, the tag that
    names the kernel made with them) for "cuda" or "metal"."""
    names = TYPE_NAMES[flavour]
    consts, tag = "", ""
    for key, value in template:
        if isinstance(value, mx.Dtype):
            consts += f"typedef {names[value]} {key};\n"
            tag += f"_{key}{names[value].strip('_')}"
        elif key == "MINB":  # launch bounds (`launch_bounds`), not read by the body
            tag += f"_{key}{int(value)}"
        else:
            consts += f"constexpr int {key} = {int(value)};\n"
            tag += f"_{key}{int(value)}"
    return consts, tag


# A template's MINB (thread groups an SM) as launch bounds. MLX's cuda_kernel writes the
# kernel's declaration itself, right after the header, and takes no launch bounds or
# compiler options: so the header's last lines redefine __global__ as CUDA's
# host_defines.h spells it, plus __launch_bounds__ (the only kernel declared after them).
CUDA_LAUNCH_BOUNDS = """
#if defined(__CUDACC__)
#undef __global__
#define __global__ __location__(global) __launch_bounds__({threads}, {groups})
#endif
"""


def launch_bounds(template) -> str:
    """The CUDA header's last lines for a template with MINB (CUDA_LAUNCH_BOUNDS), else
    nothing."""
    constants = dict(template)
    if not constants.get("MINB"):
        return ""
    return CUDA_LAUNCH_BOUNDS.format(threads=constants["NT"], groups=constants["MINB"])


# CUDA kernels reach MLX as `#include` lines of files holding their text (`_included`):
# MLX's CUDA backend handles a kernel's whole source text at every call, building the
# graph and again launching it, and NVRTC reads the files only when it compiles.
# Measured on the H200 (a kernel of 14 inputs, µs per call to build / to evaluate):
# 7.0 / 9.0 with a 100-byte source, 10.1 / 17.0 with 22 KB; a decode step makes 56 such
# calls with 23 KB between each layer's two.
INCLUDE_SOURCES = True


def kernel_dir() -> str:
    """Where `_included` writes kernel sources: $MLX_LM_TURBO_KERNEL_DIR, else
    ~/.cache/mlx_lm_turbo/kernels (the user's own, as compiler caches are)."""
    default = os.path.join(os.path.expanduser("~"), ".cache", "mlx_lm_turbo", "kernels")
    return os.environ.get("MLX_LM_TURBO_KERNEL_DIR", default)


def _included(text: str) -> str:
    """`#include` of a file holding `text`, named by its hash (written once, atomically;
    an existing file is used only if it holds exactly `text`), or `text` itself where no
    file can be written."""
    path = os.path.join(kernel_dir(), hashlib.sha256(text.encode()).hexdigest()[:32] + ".cuh")
    try:
        with open(path) as f:
            if f.read() == text:
                return f'#include "{path}"\n'
    except OSError:
        pass
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = f"{path}.{os.getpid()}.tmp"
        with open(partial, "w") as f:
            f.write(text)
        os.replace(partial, path)
    except OSError:
        return text
    return f'#include "{path}"\n'


def compact_source(source: str) -> str:
    """The source without comments, indentation and blank lines: MLX's CUDA backend
    handles the whole source string at every kernel call (on the H200, a call with 14
    inputs took 16.1 µs to build and run with a 32 KB source, 12.3 µs with 16 KB; the
    partial kernel's source is 29 KB as written, 20 KB compacted). Lines holding a
    string literal (inline PTX) keep their comments."""
    lines = []
    for line in source.splitlines():
        if '"' not in line:
            line = line.split("//", 1)[0]
        line = line.strip()
        if line:
            lines.append(line)
    return "\n".join(lines) + "\n"


def _launch(backend: str, index: int, template, **kwargs):
    return _specialised(backend, index, tuple(template))(**kwargs)


def quantize_supported(head_dim: int) -> bool:
    return head_dim in (32, 64, 128, 256)


# Threads of a quantize or dequantize thread group: a warp per vector.
CODEC_THREADS = 128


def _codec_groups(vectors: int) -> int:
    """Thread groups of the quantize / dequantize kernels for this many vectors."""
    return max(1, -(-vectors // (CODEC_THREADS // 32)))


@lru_cache(maxsize=None)
def _zeros(n: int, dtype) -> mx.array:
    return mx.zeros((n,), dtype)


def fused_quantize(
    keys: mx.array,
    mean: Optional[mx.array],
    values: Optional[mx.array],
    key_signs,
    key_codebook,
    key_bits: int,
    value_signs=None,
    value_codebook=None,
    value_bits: int = 0,
    backend: str = "cuda",
    scale: Optional[mx.array] = None,
    key_rows: Optional[tuple] = None,
    value_rows: Optional[tuple] = None,
):
    """turboquant_quantize of keys [B, H, S, D] (times `scale`, minus `mean`, each
    [B, H, 1, D], if given) and, if given, of values [B, H, S', D], in one launch; only
    rows [a, b) of axis 2 where `key_rows` / `value_rows` = (a, b) (read in place).
    Returns (packed keys, key norms) or (packed keys, key norms, packed values, value
    norms); norms float16 [B, H, b - a]."""
    B, H, key_stride, D = keys.shape
    key_first, key_stop = key_rows or (0, key_stride)
    S = key_stop - key_first
    kw = (D * key_bits + 31) // 32
    nk = B * H * S
    value_stride, value_first, value_len, nv = 1, 0, 1, 0
    if values is not None:
        value_stride = values.shape[2]
        value_first, value_stop = value_rows or (0, value_stride)
        value_len = value_stop - value_first
        nv = values.shape[0] * values.shape[1] * value_len
    vw = (D * value_bits + 31) // 32 if values is not None else 1
    f32 = mx.float32
    # Inputs keep their [B, H, rows, D] shapes, outputs [B, H, S, ...]: the kernel
    # indexes them flat.
    value_shape = (1,) if values is None else (*values.shape[:2], value_len)
    outputs = _launch(
        backend,
        2,
        inputs=[
            keys,
            _zeros(D, keys.dtype) if values is None else values,
            _zeros(1, f32) if mean is None else mean.astype(f32),
            _zeros(1, f32) if scale is None else scale.astype(f32),
            key_signs,
            _zeros(D, f32) if value_signs is None else value_signs,
            key_codebook,
            _zeros(2, f32) if value_codebook is None else value_codebook,
            _params((nk, S, nk + nv, key_stride, key_first, value_stride, value_first, value_len)),
        ],
        template=[
            ("D", D),
            ("NT", CODEC_THREADS),
            ("KBITS", key_bits),
            ("VBITS", value_bits or 1),
            ("KW", kw),
            ("VW", vw),
            ("HAS_MEAN", int(mean is not None)),
            ("HAS_SCALE", int(scale is not None)),
        ],
        grid=(_codec_groups(nk + nv) * CODEC_THREADS, 1, 1),
        threadgroup=(CODEC_THREADS, 1, 1),
        output_shapes=[(B, H, S, kw), (B, H, S), (*value_shape, vw), value_shape],
        output_dtypes=[mx.uint32, mx.float16, mx.uint32, mx.float16],
    )
    return outputs[:2] if values is None else outputs


def fused_dequantize(
    packed_keys,
    key_norms,
    packed_values,
    value_norms,
    segments: mx.array,
    seg_scale: Optional[mx.array],
    seg_mean: Optional[mx.array],
    key_signs,
    value_signs,
    key_codebook,
    value_codebook,
    key_bits: int,
    value_bits: int,
    inverse: bool,
    dtype,
    backend: str,
    count: Optional[int] = None,
    window: Optional[tuple] = None,
):
    """Keys and values of the first `count` slots (default: all) of buffers (packed
    [B, H, CAP, words], norms [B, H, CAP]) in one launch, [B, H, count, D] in `dtype`:
    rotated (Πk̂ = Π(σ_s ∘ Πᵀŷ) + M_s, Πv̂) or, with `inverse`, in the model's domain
    (k̂ = σ_s ∘ Πᵀŷ + μ_s, v̂). `segments`: int [CAP] or [B, CAP], each slot's key-mean
    segment; `seg_mean` [B, H, NSEG, D] float32 (M_s, or μ_s with `inverse`; None without
    centering), `seg_scale` likewise (σ_s, or None). With `window` = float16 (keys,
    values) [B, H, W, D] (`inverse` only), W more rows follow the count: theirs."""
    B, H, cap, kw = packed_keys.shape
    T = cap if count is None else count
    D = key_signs.shape[0]
    nseg = 0 if seg_mean is None else seg_mean.shape[2]
    f32 = mx.float32
    if window is not None and not inverse:
        raise ValueError("A float16 window is in the model's domain: it needs inverse=True.")
    W = 0 if window is None else window[0].shape[2]
    window_keys, window_values = window or (_zeros(D, mx.float16), _zeros(D, mx.float16))
    return _launch(
        backend,
        3,
        inputs=[
            packed_keys,
            key_norms,
            packed_values,
            value_norms,
            segments.astype(mx.int32),
            _zeros(1, f32) if seg_scale is None else seg_scale,
            _zeros(1, f32) if seg_mean is None else seg_mean,
            key_signs,
            value_signs,
            key_codebook,
            value_codebook,
            window_keys.astype(mx.float16),
            window_values.astype(mx.float16),
            _params((T, cap, nseg, B * H * (T + W), W)),
        ],
        template=[
            ("D", D),
            ("NT", CODEC_THREADS),
            ("KB", key_bits),
            ("VB", value_bits),
            ("KW", kw),
            ("VW", packed_values.shape[-1]),
            ("CENTERED", int(seg_mean is not None)),
            ("SCALED", int(seg_scale is not None)),
            ("INVERSE", int(inverse)),
            ("SEG_ROWS", int(segments.ndim == 2)),
            ("HKV", H),
            ("out_t", dtype),
        ],
        grid=(_codec_groups(B * H * (T + W)) * CODEC_THREADS, 1, 1),
        threadgroup=(CODEC_THREADS, 1, 1),
        output_shapes=[(B, H, T + W, D), (B, H, T + W, D)],
        output_dtypes=[dtype, dtype],
    )


# Tokens of segment s - 1 per thread group of the segment-sums kernel.
STATS_TOKENS_PER_GROUP = 64


def fused_segment_stats(
    sources, shape, prev, key_signs, key_codebook, key_bits, hi, scaling, scale_rule, backend
):
    """The statistics that open key-mean segment s (`turboquant_cache.segment_stats`
    and what the quantizer derives from them): (M_s f16, μ_s, σ_s f16, σ_s, 1/σ_s,
    μ_s/σ_s f32), each [B, H, 1, D], (B, H) = `shape`, in two launches (segment sums,
    then stats). The σ outputs are left unwritten without key `scaling`.

    `sources`: the codes of segment s - 1, positions [b_{s-1}, b_s) in order, as up to
    two (packed keys [.., cap, KW], key norms [.., cap], first head, first row, rows),
    head h of the result reading head first + h (flat over the buffer's batch x heads),
    read in place. `prev`: None for s = 1, else (key means [.., cols, D] f16, key scales
    or None, first head, column of segment s - 1). `hi` = b_s; `scale_rule` = (exponent,
    floor) of `KEY_SCALE_EXPONENT` / `KEY_SCALE_FLOOR`."""
    B, H = shape
    heads, D = B * H, key_signs.shape[0]
    f16, f32 = mx.float16, mx.float32
    if not 1 <= len(sources) <= 2:
        raise ValueError(f"fused_segment_stats reads one or two sources, got {len(sources)}")
    kw = sources[0][0].shape[-1]
    (pa, na_, a_head, a_first, n_a), *rest = sources
    empty = (_zeros(kw, mx.uint32), _zeros(1, f16), 0, 0, 0)
    pb, nb_, b_head, b_first, n_b = rest[0] if rest else empty
    b_cap = pb.shape[-2] if rest else 0
    n = n_a + n_b
    G = max(1, -(-n // STATS_TOKENS_PER_GROUP))
    (sums,) = _launch(
        backend,
        4,
        inputs=[
            pa,
            na_,
            pb,
            nb_,
            key_signs,
            key_codebook,
            _params((G, n_a, n_b, a_head, pa.shape[-2], a_first, b_head, b_cap, b_first)),
        ],
        template=[("D", D), ("NT", CODEC_THREADS), ("KB", key_bits), ("KW", kw)],
        grid=(heads * G * CODEC_THREADS, 1, 1),
        threadgroup=(CODEC_THREADS, 1, 1),
        output_shapes=[(heads, G, 2, D)],
        output_dtypes=[f32],
    )
    means, scales, head, col = prev or (None, None, 0, 0)
    cols = 0 if means is None else means.shape[-2]
    exponent, floor = scale_rule
    return _launch(
        backend,
        5,
        inputs=[
            sums,
            _zeros(1, f16) if means is None else means,
            _zeros(1, f16) if scales is None else scales,
            key_signs,
            _params((G, n, 1.0 / hi, exponent / 2, floor, head, cols, col)),
        ],
        template=[
            ("D", D),
            ("HAS_MEAN", int(means is not None)),
            ("HAS_SCALE", int(scales is not None)),
            ("SCALING", int(scaling)),
        ],
        grid=(heads * D, 1, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[(B, H, 1, D)] * 6,
        output_dtypes=[f16, f32, f16, f32, f32, f32],
    )


class KernelView(NamedTuple):
    """What the decode kernel reads of a cache (`kernel_view()` of each TurboQuant
    cache): whole buffers, no copies. Codes sit in slots [0, coded) of packed keys /
    values [B, n_kv_heads, cap, words] and norms [B, n_kv_heads, cap(, 1)] float16;
    `segments` holds a ring's segment id per slot (None: from positions); the float16
    window (None without one) holds slots [first, slots); `rows` gives each sequence's
    padding slots and first window slot it reads, flat: (pad_0, start_0, pad_1, ...)."""

    packed_keys: mx.array
    key_norms: mx.array
    packed_values: mx.array
    value_norms: mx.array
    segments: Optional[mx.array]
    coded: int
    slots: int
    first: int
    window_keys: Optional[mx.array]
    window_values: Optional[mx.array]
    rows: Tuple[int, ...]


def tensor_cores(backend: str, head_dim: int, key_bits: int, value_bits: int) -> bool:
    """Whether the partial kernel scores and sums on tensor cores (MMA: CUDA's mma.sync,
    float16 fragments, float32 sums): power-of-two head_dims (the kernel rotates, and the
    float16 window arrives as stored; `supports` asks for multiples of 32), codes of at
    most 4 bits (pair
    tables of 2^(2 bits) entries). Metal, and TENSOR_CORES = False, take the per-lane
    path of the same source."""
    flavour = KERNEL_MAKERS[backend][0]
    short_codes = max(key_bits, value_bits) <= 4
    return TENSOR_CORES and flavour == "cuda" and _rotates_inside(head_dim) and short_codes


@lru_cache(maxsize=None)
def _rows_per_group(rows: int, head_dim: int, mma: bool = False) -> int:
    """Query rows one thread group takes: each lane keeps rows x head_dim / 32
    accumulators in registers, at most MAX_ACCUMULATORS (with MMA, at most two row
    tiles of 8)."""
    return max(1, min(rows, MAX_ACCUMULATORS // (head_dim // 32), 16 if mma else rows))


@lru_cache(maxsize=None)
def _shared_bytes(
    rows: int, head_dim: int, key_bits: int, value_bits: int, stage: bool, mma: bool = False
) -> int:
    """Shared memory of a thread group: queries, probabilities, codebooks, per-warp
    maxima and sums, (`stage`) the warps' staged key and value words, (`mma`) the
    query fragments and centroid-pair tables."""
    kw, vw = packed_words(head_dim, key_bits), packed_words(head_dim, value_bits)
    probs = 0 if mma else THREADS
    floats = rows * (head_dim + 1 + probs + 2 * (THREADS // 32)) + 2**key_bits + 2**value_bits
    words = THREADS * ((kw | 1) + vw) if stage else 0
    if mma:
        words += 2 * head_dim // 16 * 32 * 4 + 4**key_bits + 4**value_bits
    return 4 * (floats + words)


@lru_cache(maxsize=None)
def _stages(rows: int, head_dim: int, key_bits: int, value_bits: int) -> bool:
    """Whether warps stage their tokens' words in shared memory: short codes, and room."""
    short = max(packed_words(head_dim, key_bits), packed_words(head_dim, value_bits)) <= 16
    fits = _shared_bytes(rows, head_dim, key_bits, value_bits, True) <= SHARED_BYTES
    return short and fits


def supports(queries: mx.array, cache, mask, backend: Optional[str] = None) -> bool:
    """Whether the fused decode kernel handles this call (else: the reference path).
    Asked in every layer of every step: decided once per kind of call and kept with the
    cache's derived values (only whether anything is coded yet changes)."""
    if not _holds_codes(cache):
        return False
    backend = fused_backend() if backend is None else backend
    mask_kind = mask if mask is None or isinstance(mask, str) else type(mask)
    key = ("supports", backend, queries.shape, mask_kind)
    return cache._derived(key, lambda: _supports(queries, cache, mask, backend))


def _holds_codes(cache) -> bool:
    """Whether anything is coded yet (else every token is in the float16 window)."""
    return (cache.keys if cache.is_ring() else cache.packed_keys) is not None


def _supports(queries: mx.array, cache, mask, backend: Optional[str]) -> bool:
    B, n_q_heads, L, D = queries.shape
    if L > MAX_QUERY_TOKENS or cache.head_dim != D or D % 32:
        return False
    if cache.key_scales is not None and not _rotates_inside(D):
        return False  # σ_s applies before the rotation: only the kernel can rotate
    if getattr(cache, "is_batch", False):
        # The model's mask is the batch's own (padding and causal), which the kernel
        # applies from the rows' padding.
        ok_mask = mask is None or isinstance(mask, (str, mx.array))
    elif cache.is_ring():
        ok_mask = mask is None
    else:
        ok_mask = mask is None or (isinstance(mask, str) and mask == "causal")
    if not ok_mask:
        return False
    mma = backend is not None and tensor_cores(backend, D, cache.key_bits, cache.value_bits)
    return _fits(n_q_heads // cache.n_kv_heads * L, D, cache.key_bits, cache.value_bits, mma)


@lru_cache(maxsize=None)
def _fits(rows: int, D: int, key_bits: int, value_bits: int, mma: bool) -> bool:
    """Whether a thread group's shared memory fits, per kind of call (made once)."""
    per_group = _rows_per_group(rows, D, mma)
    return _shared_bytes(per_group, D, key_bits, value_bits, False, mma) <= SHARED_BYTES


def _rotates_inside(head_dim: int) -> bool:
    """The kernels rotate queries and outputs themselves for power-of-two head_dims
    (the Sylvester Hadamard matrix of mx.hadamard_transform); else the host does."""
    return head_dim & (head_dim - 1) == 0


def split_target(coded: int, groups: int) -> int:
    """Splits to aim for per (sequence, KV head, row chunk), `groups` of them, over
    `coded` slots: TARGET_GROUPS thread groups in all, up to LONG_TARGET_GROUPS at long
    contexts (one per SLOTS_PER_LONG_GROUP slots of all the groups)."""
    long_target = min(LONG_TARGET_GROUPS, coded * groups // SLOTS_PER_LONG_GROUP)
    return max(TARGET_GROUPS, long_target) // groups


@lru_cache(maxsize=256)
def split_bounds(coded: int, target: int, pad: int, max_segment: int) -> tuple:
    """Where the decode kernel's splits of slots [0, coded) begin and end: about `target`
    splits of at least MIN_TOKENS_PER_SPLIT slots (a multiple of 32, a warp's tokens),
    cut also at each key-mean segment start pad + b_s, s = 1..max_segment (0: none), so
    that a thread group rotates its queries for one segment, not once per segment its
    slots meet (at 1K, three passes for the first split). Made once per step: `coded`
    changes only as tokens are coded."""
    splits = max(1, min(-(-coded // MIN_TOKENS_PER_SPLIT), target))
    per_split = max(32, (-(-coded // splits) + 31) // 32 * 32)
    cuts = set(range(0, coded, per_split))
    for s in range(1, max_segment + 1):
        start = pad + (32 << (2 * (s - 1)))  # b_s, as tq_segment_start
        if start >= coded:
            break
        cuts.add(start)
    return tuple(sorted(cuts | {0})) + (coded,)


_PARAMS = {}


def _params(values: tuple) -> mx.array:
    """The kernels' small integers (exact in float32) as one array, made once per step
    and shared by every layer that asks for the same values."""
    if values not in _PARAMS:
        if len(_PARAMS) > 64:
            _PARAMS.clear()
        _PARAMS[values] = mx.array(values, dtype=mx.float32)
    return _PARAMS[values]


_DECODE_PARAMS = {}


def _decode_params(key: tuple):
    """The params array of a decode-kernel call, from `key` = (coded, scale, slots, first,
    cap, NSEG, the window's slots, the rows..., target splits, max segment): the head,
    the window's slots, the rows and the splits' bounds (`split_bounds`; see
    PARTIAL_BODY for the layout), so that its length is 10 + len(rows) + splits. Made
    once per step and shared by every layer (each builds and hashes the key)."""
    made = _DECODE_PARAMS.get(key)
    if made is None:
        if len(_DECODE_PARAMS) > 64:
            _DECODE_PARAMS.clear()
        coded, scale, slots, first, cap, nseg, window_slots = key[:7]
        rows, (target, max_segment) = key[7:-2], key[-2:]
        bounds = split_bounds(coded, target, rows[0], max_segment)
        splits = len(bounds) - 1
        values = (coded, 9 + len(rows), scale, slots, first, cap, splits, nseg, window_slots)
        made = mx.array(values + rows + bounds, dtype=mx.float32)
        _DECODE_PARAMS[key] = made
    return made


@lru_cache(maxsize=None)
def _decode_plan(D, n_q_heads, n_kv, L, key_bits, value_bits, kw, vw, max_segment, flags, mma):
    """The partial and merge kernels' template constants for one kind of call (built once:
    a decode step makes this call in every layer). `flags`: (scaled, ring, win, causal)."""
    rows = n_q_heads // n_kv * L
    per_group = _rows_per_group(rows, D, mma)
    rot = int(_rotates_inside(D))
    scaled, ring, win, causal = flags
    partial = [
        ("D", D),
        ("R", rows),
        ("RC", per_group),
        ("L", L),
        ("NT", THREADS),
        ("KB", key_bits),
        ("VB", value_bits),
        ("KW", kw),
        ("VW", vw),
        ("MAXSEG", max_segment),
        ("SCALED", scaled),
        ("RING", ring),
        ("WIN", win),
        ("CAUSAL", causal),
        ("ROT", rot),
        ("HKV", n_kv),
        ("STAGE", int(not mma and _stages(per_group, D, key_bits, value_bits))),
        ("MMA", int(mma)),
    ]
    merge = [("D", D), ("R", rows), ("L", L), ("WIN", win), ("ROT", rot), ("HKV", n_kv)]
    return partial, merge, -(-rows // per_group)


@lru_cache(maxsize=None)
def _decode_kernels(backend: str, out_dtype, *plan):
    """(partial kernel, its long-call form, merge kernel, row chunks) for
    `_decode_plan(*plan)`, made once: a decode step asks in every layer, and at batch 1
    its host time is the step's. The long form has launch bounds (LONG_KERNEL_GROUPS)
    where the tensor-core kernel's registers allow them (head_dim <= 128, one row tile),
    else it is the partial kernel itself."""
    partial, merge, chunks = _decode_plan(*plan)
    merge = merge + [("out_t", out_dtype)]
    short = long = _specialised(backend, 0, tuple(partial))
    template = dict(partial)
    if template["MMA"] and template["D"] <= 128 and template["RC"] <= 8:
        long = _specialised(backend, 0, tuple(partial + [("MINB", LONG_KERNEL_MIN_GROUPS)]))
    return short, long, _specialised(backend, 1, tuple(merge)), chunks


class DecodeCall(NamedTuple):
    """What a decode-kernel call reads that stays fixed from step to step (built once
    per kind of call and cache state, see `fused_decode_attention`): the two kernels,
    their layout, and the constant inputs around the cache's buffers."""

    partial: object
    partial_long: object  # for calls of more than LONG_KERNEL_GROUPS thread groups
    merge: object
    chunks: int
    rows: int
    groups: int
    rot: bool
    out_dtype: object
    nseg: int
    # The constant inputs before the queries: key signs, segment scales and means, key
    # and value codebooks, value signs.
    constants: tuple
    no_segments: mx.array  # stands in for the segment ids where a call has none
    no_window: mx.array  # stands in for the float16 window where a cache has none
    window: bool
    params_head: int  # the params' values before the splits' bounds: 10 + 2 B
    attend: object  # the kernels' calls (`_attend`), compiled on a GPU


def _decode_call(queries: mx.array, cache, view, mask, backend: str) -> Optional[DecodeCall]:
    """The DecodeCall of this kind of call, or None where the kernels do not take it."""
    if not _supports(queries, cache, mask, backend):
        return None
    B, n_q_heads, L, D = queries.shape
    causal = int(mask is not None and L > 1)
    _, n_kv, _, kw = view.packed_keys.shape
    vw = view.packed_values.shape[-1]
    win = int(view.window_keys is not None)
    rot = _rotates_inside(D)
    seg_scale, seg_mean = cache.kernel_segment_stats()
    flags = (int(seg_scale is not None), int(view.segments is not None), win, causal)
    mma = tensor_cores(backend, D, cache.key_bits, cache.value_bits)
    out_dtype = queries.dtype if rot else mx.float32
    plan = (D, n_q_heads, n_kv, L, cache.key_bits, cache.value_bits, kw, vw)
    partial, partial_long, merge, chunks = _decode_kernels(
        backend, out_dtype, *plan, cache.max_segment, flags, mma
    )
    f32 = mx.float32
    call = DecodeCall(
        partial,
        partial_long,
        merge,
        chunks,
        n_q_heads // n_kv * L,
        B * n_kv,
        rot,
        out_dtype,
        0 if seg_mean is None else seg_mean.shape[2],
        (
            cache.key_signs,
            _zeros(1, f32) if seg_scale is None else seg_scale,
            _zeros(1, f32) if seg_mean is None else seg_mean,
            cache.key_centroids,
            cache.value_centroids,
            cache.value_signs,
        ),
        _zeros(1, mx.uint8),
        _zeros(1, mx.float16),
        bool(win),
        10 + len(view.rows),
        None,
    )
    if COMPILE_DECODE and backend in ("cuda", "metal"):  # (not the tests' emulator)
        return call._replace(attend=_compiled_attend(call))
    return call._replace(attend=functools.partial(_attend, call))


def fused_decode_attention(queries: mx.array, cache, scale: float, mask, backend: str):
    """softmax(scale q Kᵀ + mask) V over the packed cache (and its float16 window), for
    up to 8 query tokens: the partial kernel over splits of the slots, then the merge.
    Queries and output keep their [B, n_q_heads, L, D] shape: with GQA heads grouped per
    KV head, that is the kernels' [B x n_kv, rows, D] layout, row r = g L + l. For calls
    that `supports` accepts."""
    out = try_fused_decode_attention(queries, cache, scale, mask, backend)
    if out is None:
        raise ValueError(
            f"The fused decode kernels do not take queries of shape {queries.shape} with "
            f"mask {mask!r} on this cache (see supports()); use turboquant_attention's "
            "turboquant_scaled_dot_product_attention, which falls back to the reference."
        )
    return out


def try_fused_decode_attention(queries: mx.array, cache, scale: float, mask, backend: str):
    """`fused_decode_attention`'s output, or None where the kernels do not take the call.

    At batch 1 on a GPU the host's work of building a decode step bounds it, and inside a
    model every Python operation here costs several times what it does in a loop of its
    own: so what stays fixed between steps (`DecodeCall`, or None: not supported) is made
    once and kept with the cache's other values derived from its key means (made anew
    when the means change), one dictionary lookup a call, and the kernels' graph is
    built by a compiled function (`_attend`)."""
    if not _holds_codes(cache):
        return None
    view = cache.kernel_view()
    no_window = view.window_keys is None
    mask_kind = mask if mask is None or isinstance(mask, str) else type(mask)
    # (The module constants that shape a call are part of the key: benchmarks vary them.)
    key = ("decode", backend, queries.shape, queries.dtype, mask_kind, no_window)
    key += (TENSOR_CORES, THREADS, COMPILE_DECODE)
    call = cache._derived(key, lambda: _decode_call(queries, cache, view, mask, backend))
    if call is None:
        return None
    if no_window:
        window_slots, window_keys, window_values = 0, call.no_window, call.no_window
    else:
        window_keys, window_values = view.window_keys, view.window_values
        window_slots = window_keys.shape[2]
    segments = view.segments
    max_segment = cache.max_segment if call.nseg > 1 and segments is None else 0
    params = _decode_params(
        (view.coded, scale, view.slots, view.first, view.packed_keys.shape[2], call.nseg)
        + (window_slots, *view.rows, split_target(view.coded, call.groups * call.chunks))
        + (max_segment,)
    )
    return call.attend(
        *call.constants,
        queries,
        view.packed_keys,
        view.key_norms,
        view.packed_values,
        view.value_norms,
        call.no_segments if segments is None else segments,
        window_keys,
        window_values,
        params,
    )


# Build a decode call's graph with a compiled function (mx.compile, one per kernel layout,
# shared by the layers; it traces again when an input's shape changes: the number of
# splits, a buffer grown).
# Replaying the trace takes the host less time than the Python and the two kernel calls.
COMPILE_DECODE = True


_COMPILED_ATTENDS = {}


def _compiled_attend(call: DecodeCall):
    """`_attend` for `call`'s kernels and layout, compiled once for every cache (layer)
    whose calls share them, the constants taken as inputs: a model traces each new shape
    of the call (more splits, a grown buffer) once, not once a layer, and its layers
    replay one trace (on the H200's host, inside a 28-layer model, the call's share of a
    step's build went from 0.18 to 0.16, three runs each)."""
    # The call without its arrays (`_attend` reads the rest), which is also the key.
    layout = call._replace(constants=(), no_segments=None, no_window=None, attend=None)
    attend = _COMPILED_ATTENDS.get(layout)
    if attend is None:
        if len(_COMPILED_ATTENDS) > 64:
            _COMPILED_ATTENDS.clear()
        attend = _COMPILED_ATTENDS[layout] = mx.compile(functools.partial(_attend, layout))
    return attend


def _attend(call: DecodeCall, *arrays):
    """The partial and merge kernels' calls of `fused_decode_attention` (the number of
    splits is the params' length less the head and the rows). Every array is an input
    (a compiled function may not read arrays that are not yet evaluated otherwise)."""
    key_signs, seg_scale, seg_mean, key_cb, value_cb, value_signs, queries = arrays[:7]
    pk, kn, pv, vn, segments, window_keys, window_values, params = arrays[7:]
    D = queries.shape[-1]
    rows, groups = call.rows, call.groups
    splits = params.shape[0] - call.params_head
    q = queries if call.rot else rotate(queries, key_signs)
    if call.window and not call.rot:
        # The merge scores the window's float16 keys against the model-domain queries
        # (rotations keep dot products) and sums its values in the codes' domain.
        window_values = rotate(window_values, value_signs)
    partial = (
        call.partial_long if groups * call.chunks * splits > LONG_KERNEL_GROUPS else call.partial
    )
    out, m, s = partial(
        inputs=[
            q,
            key_signs,
            seg_scale,
            seg_mean,
            pk,
            kn,
            pv,
            vn,
            segments,
            key_cb,
            value_cb,
            params,
        ],
        grid=(groups * call.chunks * splits * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(groups, splits, rows, D), (groups, splits, rows), (groups, splits, rows)],
        output_dtypes=[mx.float32] * 3,
    )
    (o,) = call.merge(
        inputs=[out, m, s, value_signs, queries, window_keys, window_values, params],
        grid=(groups * rows * D, 1, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[queries.shape],
        output_dtypes=[call.out_dtype],
    )
    if call.rot:
        return o
    return inverse_rotate(o, value_signs).astype(queries.dtype)
