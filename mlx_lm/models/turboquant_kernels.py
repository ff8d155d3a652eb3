"""Fused TurboQuant decode attention: one kernel reads the packed cache directly.

For each (batch, KV head, split of the context) a thread group

1. scores a tile of tokens against the pre-rotated queries of the head's GQA group,
   straight from the packed key codes: s_j = scale (n_j Σ_d q_d c[idx_jd] + q·M_s(j)),
   one token per thread (M: the causal key means, q·M precomputed per segment);
2. updates the online softmax of every query row (running max and sum);
3. accumulates the values in the rotated domain, one coordinate per thread, from the
   packed value codes: o += p_j m_j c'[idx_jd].

A second small kernel merges the splits (flash-decoding), and the output is rotated back
once. Nothing is dequantized into memory: per token the kernel reads the packed words
and two float16 norms (at d = 128 and 3 bits, 100 bytes instead of FP16's 512).

The kernel body is written once; `CUDA_PRELUDE` / `METAL_PRELUDE` map its few backend
words (thread ids, shared memory, barriers, pointers) to CUDA (`mx.fast.cuda_kernel`)
and Metal (`mx.fast.metal_kernel`). The pure-MLX attention in `turboquant_attention.py`
is the reference; set MLX_LM_TURBO_REFERENCE=1 to force it.
"""

import math
import os
from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .turboquant_rotation import inverse_rotate, rotate

# Most query rows (GQA group x query tokens) one thread group scores at once, and most
# query tokens: longer query blocks (prefill) take the reference path.
MAX_ROWS = 32
MAX_QUERY_TOKENS = 8
# Context tokens per split; the number of splits also aims at filling the GPU.
TOKENS_PER_SPLIT = 512
TARGET_GROUPS = 512

CUDA_PRELUDE = """
#define TQ_SHARED __shared__
#define TQ_SYNC() __syncthreads()
#define TQ_PTR(T) const T*
#define TQ_OUT(T) T*
#define TQ_FN __device__ inline
#define TQ_EXP(x) __expf(x)
"""

METAL_PRELUDE = """
#define TQ_SHARED threadgroup
#define TQ_SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define TQ_PTR(T) const device T*
#define TQ_OUT(T) device T*
#define TQ_FN inline
#define TQ_EXP(x) metal::fast::exp(x)
"""

# Thread and group ids: the only lines of the body that differ per backend (MLX detects
# the Metal attributes by name in the body, so they cannot hide in the header).
CUDA_IDS = "const int tq_tid = threadIdx.x; const int tq_group = blockIdx.x;\n"
METAL_IDS = (
    "const int tq_tid = thread_position_in_threadgroup.x;\n"
    "const int tq_group = threadgroup_position_in_grid.x;\n"
)

HEADER = """
// Code i of a little-endian bit stream of `bits`-bit codes (turboquant_packing).
TQ_FN uint32_t tq_code(TQ_PTR(uint32_t) words, int i, int bits) {
  const int bit = i * bits;
  const int w = bit >> 5;
  const int shift = bit & 31;
  uint32_t code = words[w] >> shift;
  if (shift + bits > 32) {
    code |= words[w + 1] << (32 - shift);
  }
  return code & ((1u << bits) - 1u);
}
"""

# Template constants: D head_dim, R query rows (GQA group x query tokens), L query
# tokens, NT threads per group (>= D, a multiple of D), KB/VB key/value bits, KW/VW
# packed words per key/value, NSEG key-mean segments (0: none), CAUSAL, SPLITS.
# Inputs: q [B*Hkv, R, D] f32 rotated, qm [B*Hkv, R, NSEG] f32 (q . M_s), packed keys /
# values [B*Hkv, CAP, KW|VW] u32, norms [B*Hkv, CAP] f16, segment ids [CAP], codebooks,
# params = {tokens held, tokens per split, capacity}, scale [1] f32.
PARTIAL_BODY = """
  const int split = tq_group % SPLITS;
  const int bh = tq_group / SPLITS;
  const int T = params[0];
  const int per_split = params[1];
  const int cap = params[2];
  const float sc = scale[0];
  constexpr int RG = NT / D;
  constexpr int RPT = (R + RG - 1) / RG;
  const int d = tq_tid % D;
  const int rg = tq_tid / D;

  TQ_SHARED float qs[R * D];
  TQ_SHARED float ps[R * NT];
  TQ_SHARED float row_m[R];
  TQ_SHARED float row_l[R];
  TQ_SHARED float row_alpha[R];
  for (int i = tq_tid; i < R * D; i += NT) {
    qs[i] = q[bh * R * D + i];
  }
  if (tq_tid < R) {
    row_m[tq_tid] = -INFINITY;
    row_l[tq_tid] = 0.0f;
  }
  float acc[RPT];
  for (int i = 0; i < RPT; i++) {
    acc[i] = 0.0f;
  }
  TQ_SYNC();

  const int t_begin = split * per_split;
  const int t_end = min(T, t_begin + per_split);
  for (int tile = t_begin; tile < t_end; tile += NT) {
    // 1. Scores, one token per thread.
    const int j = tile + tq_tid;
    if (j < t_end) {
      TQ_PTR(uint32_t) kw = packed_keys + ((size_t)bh * cap + j) * KW;
      const float norm = static_cast<float>(key_norms[(size_t)bh * cap + j]);
      float dots[R];
      for (int r = 0; r < R; r++) {
        dots[r] = 0.0f;
      }
      for (int e = 0; e < D; e++) {
        const float c = key_codebook[tq_code(kw, e, KB)];
        for (int r = 0; r < R; r++) {
          dots[r] += qs[r * D + e] * c;
        }
      }
      const int s = NSEG > 0 ? static_cast<int>(segments[j]) : 0;
      for (int r = 0; r < R; r++) {
        float score = norm * dots[r];
        if (NSEG > 0) {
          score += qm[((size_t)bh * R + r) * NSEG + s];
        }
        score *= sc;
        if (CAUSAL && j > T - L + (r % L)) {
          score = -INFINITY;
        }
        ps[r * NT + tq_tid] = score;
      }
    } else {
      for (int r = 0; r < R; r++) {
        ps[r * NT + tq_tid] = -INFINITY;
      }
    }
    TQ_SYNC();
    // 2. Online softmax, one query row per thread.
    if (tq_tid < R) {
      const float m_old = row_m[tq_tid];
      float m_new = m_old;
      for (int i = 0; i < NT; i++) {
        m_new = max(m_new, ps[tq_tid * NT + i]);
      }
      const float alpha = m_new == -INFINITY ? 1.0f : TQ_EXP(m_old - m_new);
      float sum = 0.0f;
      for (int i = 0; i < NT; i++) {
        const float x = ps[tq_tid * NT + i];
        const float p = x == -INFINITY ? 0.0f : TQ_EXP(x - m_new);
        ps[tq_tid * NT + i] = p;
        sum += p;
      }
      row_l[tq_tid] = row_l[tq_tid] * alpha + sum;
      row_m[tq_tid] = m_new;
      row_alpha[tq_tid] = alpha;
    }
    TQ_SYNC();
    // 3. Values, one coordinate (and row group) per thread.
    for (int i = 0; i < RPT; i++) {
      const int r = rg + i * RG;
      if (r < R) {
        acc[i] *= row_alpha[r];
      }
    }
    const int n = min(NT, t_end - tile);
    for (int jj = 0; jj < n; jj++) {
      const size_t slot = (size_t)bh * cap + tile + jj;
      const float v = static_cast<float>(value_norms[slot]) *
          value_codebook[tq_code(packed_values + slot * VW, d, VB)];
      for (int i = 0; i < RPT; i++) {
        const int r = rg + i * RG;
        if (r < R) {
          acc[i] += ps[r * NT + jj] * v;
        }
      }
    }
    TQ_SYNC();
  }
  const size_t base = ((size_t)bh * SPLITS + split) * R;
  for (int i = 0; i < RPT; i++) {
    const int r = rg + i * RG;
    if (r < R) {
      partial_out[(base + r) * D + d] = acc[i];
    }
  }
  if (tq_tid < R) {
    partial_max[base + tq_tid] = row_m[tq_tid];
    partial_sum[base + tq_tid] = row_l[tq_tid];
  }
"""

# One thread per (batch x KV head x row, coordinate): merge the splits.
MERGE_BODY = """
  const int idx = tq_group * NT + tq_tid;
  if (idx >= ROWS * D) {
    return;
  }
  const int d = idx % D;
  const int row = idx / D;
  float m = -INFINITY;
  for (int s = 0; s < SPLITS; s++) {
    m = max(m, partial_max[row / R * SPLITS * R + s * R + row % R]);
  }
  float num = 0.0f;
  float den = 0.0f;
  for (int s = 0; s < SPLITS; s++) {
    const int k = row / R * SPLITS * R + s * R + row % R;
    const float w = partial_max[k] == -INFINITY ? 0.0f : TQ_EXP(partial_max[k] - m);
    num += w * partial_out[k * D + d];
    den += w * partial_sum[k];
  }
  out[idx] = num / den;
"""

# Quantize: one thread group of D threads per vector (norm, rotation, nearest centroid,
# norm correction, pack). Template: D (a power of two), BITS, W packed words, HAS_MEAN,
# PER_MEAN (vectors sharing one mean). Inputs: x [N, D], mean [N / PER_MEAN, D] f32,
# signs [D] f32, codebook [2^BITS] f32. Outputs: packed [N, W] u32, norms [N] f32.
QUANTIZE_BODY = """
  const int n = tq_group;
  const int d = tq_tid;
  TQ_SHARED float h[D];
  TQ_SHARED float red[D];
  TQ_SHARED uint32_t codes[D];
  float v = static_cast<float>(x[(size_t)n * D + d]);
  if (HAS_MEAN) {
    v -= mean[(size_t)(n / PER_MEAN) * D + d];
  }
  // ||x||: tree reduction.
  red[d] = v * v;
  TQ_SYNC();
  for (int stride = D / 2; stride > 0; stride >>= 1) {
    if (d < stride) {
      red[d] += red[d + stride];
    }
    TQ_SYNC();
  }
  const float norm = sqrt(red[0]);
  TQ_SYNC();
  // y = H D x / ||x|| / sqrt(D): random signs, then a Walsh-Hadamard butterfly.
  h[d] = v / max(norm, 1e-30f) * signs[d];
  TQ_SYNC();
  for (int len = 1; len < D; len <<= 1) {
    if ((d & len) == 0) {
      const float a = h[d];
      const float b = h[d + len];
      h[d] = a + b;
      h[d + len] = a - b;
    }
    TQ_SYNC();
  }
  const float y = h[d] * (1.0f / sqrt((float)D));
  // Nearest centroid: the number of midpoints below y (ties to the lower one).
  uint32_t code = 0;
  for (int i = 0; i + 1 < (1 << BITS); i++) {
    code += (0.5f * (codebook[i] + codebook[i + 1]) < y) ? 1u : 0u;
  }
  codes[d] = code;
  const float c = codebook[code];
  red[d] = c * c;
  TQ_SYNC();
  for (int stride = D / 2; stride > 0; stride >>= 1) {
    if (d < stride) {
      red[d] += red[d + stride];
    }
    TQ_SYNC();
  }
  // Pack: thread w assembles word w from the codes whose bits fall in it.
  if (d < W) {
    uint32_t word = 0;
    const int first = (32 * d) / BITS;
    const int last = min(D - 1, (32 * d + 31) / BITS);
    for (int j = first; j <= last; j++) {
      const int shift = j * BITS - 32 * d;
      word |= shift >= 0 ? codes[j] << shift : codes[j] >> (-shift);
    }
    packed[(size_t)n * W + d] = word;
  }
  if (d == 0) {
    norms[n] = norm / max(sqrt(red[0]), 1e-30f);
  }
"""

PARTIAL_INPUTS = [
    "q",
    "qm",
    "packed_keys",
    "key_norms",
    "packed_values",
    "value_norms",
    "segments",
    "key_codebook",
    "value_codebook",
    "params",
    "scale",
]
PARTIAL_OUTPUTS = ["partial_out", "partial_max", "partial_sum"]
MERGE_INPUTS = ["partial_out", "partial_max", "partial_sum"]


QUANTIZE_INPUTS = ["x", "mean", "signs", "codebook"]
QUANTIZE_OUTPUTS = ["packed", "norms"]


def kernel_sources(backend: str):
    """(header, partial body, merge body, quantize body) for "cuda" or "metal": the
    shared logic with that backend's prelude and thread ids."""
    prelude, ids = {"cuda": (CUDA_PRELUDE, CUDA_IDS), "metal": (METAL_PRELUDE, METAL_IDS)}[backend]
    return prelude + HEADER, ids + PARTIAL_BODY, ids + MERGE_BODY, ids + QUANTIZE_BODY


def cuda_available() -> bool:
    cuda = getattr(mx, "cuda", None)
    return bool(cuda is not None and cuda.is_available())


def metal_available() -> bool:
    return bool(mx.metal.is_available())


def fused_backend() -> Optional[str]:
    """The backend the fused kernels run on now, or None (CPU, or forced reference)."""
    if os.environ.get("MLX_LM_TURBO_REFERENCE", "0") not in ("", "0"):
        return None
    if mx.default_device() != mx.gpu:
        return None
    if cuda_available():
        return "cuda"
    if metal_available():
        return "metal"
    return None


@lru_cache(maxsize=None)
def _kernels(backend: str):
    header, partial, merge, quantize = kernel_sources(backend)
    make = mx.fast.cuda_kernel if backend == "cuda" else mx.fast.metal_kernel
    return (
        make(
            name="turboquant_decode_partial",
            input_names=PARTIAL_INPUTS,
            output_names=PARTIAL_OUTPUTS,
            source=partial,
            header=header,
        ),
        make(
            name="turboquant_decode_merge",
            input_names=MERGE_INPUTS,
            output_names=["out"],
            source=merge,
            header=header,
        ),
        make(
            name="turboquant_quantize",
            input_names=QUANTIZE_INPUTS,
            output_names=QUANTIZE_OUTPUTS,
            source=quantize,
            header=header,
        ),
    )


def quantize_supported(head_dim: int) -> bool:
    return head_dim in (32, 64, 128, 256)


def fused_quantize(x: mx.array, mean: Optional[mx.array], signs, codebook, bits: int, backend):
    """turboquant_quantize of x [B, H, S, D] (minus `mean` [B, H, 1, D] if given) in one
    launch: (packed uint32 [B, H, S, W], norms float32 [B, H, S])."""
    B, H, S, D = x.shape
    words = (D * bits + 31) // 32
    n = B * H * S
    quantize = _kernels(backend)[2]
    packed, norms = quantize(
        inputs=[
            x.reshape(n, D),
            mx.zeros((1,), mx.float32) if mean is None else mean.astype(mx.float32),
            signs,
            codebook,
        ],
        template=[
            ("D", D),
            ("BITS", bits),
            ("W", words),
            ("HAS_MEAN", int(mean is not None)),
            ("PER_MEAN", S),
        ],
        grid=(n * D, 1, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[(n, words), (n,)],
        output_dtypes=[mx.uint32, mx.float32],
    )
    return packed.reshape(B, H, S, words), norms.reshape(B, H, S)


def threads_per_group(head_dim: int) -> int:
    return max(128, head_dim)


def supports(queries: mx.array, cache, mask) -> bool:
    """Whether the fused decode kernel handles this call (else: the reference path)."""
    B, n_q_heads, L, D = queries.shape
    if L > MAX_QUERY_TOKENS or cache.head_dim != D or D % 32:
        return False
    # Key scaling and a float16 window change the attention math: reference path.
    if getattr(cache, "key_scales", None) is not None or getattr(cache, "fp16_window", 0):
        return False
    rows = n_q_heads // cache.n_kv_heads * L
    nt = threads_per_group(D)
    if rows > MAX_ROWS or 4 * rows * (D + nt) > 40 * 1024:
        return False
    if mask is None:
        return True
    return isinstance(mask, str) and mask == "causal" and not cache.is_ring()


def fused_decode_attention(queries: mx.array, cache, scale: float, mask, backend: str):
    """softmax(scale q Kᵀ + mask) V over the packed cache, for up to 8 query tokens."""
    B, n_q_heads, L, D = queries.shape
    buffers = cache.kernel_buffers()
    packed_keys, key_norms, packed_values, value_norms, segments, tokens = buffers
    n_kv = packed_keys.shape[1]
    cap = packed_keys.shape[2]
    group = n_q_heads // n_kv
    rows = group * L
    q = rotate(queries, cache.key_signs)  # float32
    q = q.reshape(B, n_kv, rows, D)
    means = cache.key_means_with_zero()
    if means is None:
        nseg, qm = 0, mx.zeros((1,), mx.float32)
    else:
        nseg = means.shape[2]
        qm = q @ means.astype(mx.float32).swapaxes(-1, -2)  # [B, n_kv, rows, nseg]
    groups = B * n_kv
    splits = max(1, min(math.ceil(tokens / TOKENS_PER_SPLIT), math.ceil(TARGET_GROUPS / groups)))
    splits = min(splits, max(1, math.ceil(tokens / 64)))
    per_split = math.ceil(tokens / splits)
    nt = threads_per_group(D)
    params = mx.array([tokens, per_split, cap], dtype=mx.int32)
    partial, merge, _ = _kernels(backend)
    template = [
        ("D", D),
        ("R", rows),
        ("L", L),
        ("NT", nt),
        ("KB", cache.key_bits),
        ("VB", cache.value_bits),
        ("KW", packed_keys.shape[-1]),
        ("VW", packed_values.shape[-1]),
        ("NSEG", nseg),
        ("CAUSAL", int(mask is not None and L > 1)),
        ("SPLITS", splits),
    ]
    out, m, s = partial(
        inputs=[
            q,
            qm,
            packed_keys,
            key_norms,
            packed_values,
            value_norms,
            segments,
            cache.key_centroids,
            cache.value_centroids,
            params,
            mx.array([scale], dtype=mx.float32),
        ],
        template=template,
        grid=(groups * splits * nt, 1, 1),
        threadgroup=(nt, 1, 1),
        output_shapes=[(groups, splits, rows, D), (groups, splits, rows), (groups, splits, rows)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    total = groups * rows * D
    merge_threads = 256
    (o,) = merge(
        inputs=[out, m, s],
        template=[
            ("D", D),
            ("R", rows),
            ("ROWS", groups * rows),
            ("NT", merge_threads),
            ("SPLITS", splits),
        ],
        grid=(math.ceil(total / merge_threads) * merge_threads, 1, 1),
        threadgroup=(merge_threads, 1, 1),
        output_shapes=[(groups, rows, D)],
        output_dtypes=[mx.float32],
    )
    o = o.reshape(B, n_q_heads, L, D)
    return inverse_rotate(o, cache.value_signs).astype(queries.dtype)
