"""Fused TurboQuant decode attention: one kernel reads the packed cache directly.

For each (batch, KV head, split of the context) a thread group

1. rotates the queries of the head's GQA group (Πq: signs, then a Walsh-Hadamard
   butterfly in shared memory) and takes q·M_s for every key-mean segment;
2. scores a tile of tokens straight from the packed key codes:
   s_j = scale (n_j Σ_d (Πq)_d c[idx_jd] + q·M_s(j)), one token per thread;
3. updates the online softmax of every query row (running max and sum);
4. accumulates the values in the rotated domain, one coordinate per thread, from the
   packed value codes: o += p_j m_j c'[idx_jd].

A second small kernel merges the splits (flash-decoding) and rotates each output row
back (Π⁻¹, the same butterfly), writing the model's dtype. Nothing is dequantized into
memory: per token the kernel reads the packed words and two float16 norms (at d = 128
and 3 bits, 100 bytes instead of FP16's 512). A decode step is two launches for the
attention and one (`fused_quantize`) for the new token's keys and values: on a GPU at
batch 1 the step is bound by launches, not by bytes, so every op saved counts.

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
# Value tokens staged in shared memory at a time, and the shared memory a thread group
# may use (Metal's limit; CUDA allows 48 KB of static shared memory).
VALUE_SUBTILE = 32
SHARED_BYTES = 32 * 1024
# The context is split so that about TARGET_GROUPS thread groups run (a decode step at
# batch 1 has only a few KV heads: without splits the GPU would idle), each with at
# least MIN_TOKENS_PER_SPLIT tokens.
MIN_TOKENS_PER_SPLIT = 128
TARGET_GROUPS = 1024

CUDA_PRELUDE = """
#define TQ_SHARED __shared__
#define TQ_SYNC() __syncthreads()
#define TQ_PTR(T) const T*
#define TQ_OUT(T) T*
#define TQ_FN __device__ inline
#define TQ_EXP(x) __expf(x)
typedef __half half_t;
"""

METAL_PRELUDE = """
#define TQ_SHARED threadgroup
#define TQ_SYNC() threadgroup_barrier(mem_flags::mem_threadgroup)
#define TQ_PTR(T) const device T*
#define TQ_OUT(T) device T*
#define TQ_FN inline
#define TQ_EXP(x) metal::fast::exp(x)
typedef half half_t;
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

// h <- H h / sqrt(D) in shared memory (Sylvester Hadamard, as mx.hadamard_transform for
// powers of two): a Walsh-Hadamard butterfly, thread d of D owning coordinate d. Callers
// write h[d] before; every thread may read all of h after.
template <int D, typename Shared>
TQ_FN void tq_hadamard(Shared h, int d) {
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
  h[d] *= 1.0f / sqrt((float)D);
  TQ_SYNC();
}
"""

# Template constants: D head_dim, R query rows (GQA group x query tokens), L query
# tokens, NT threads per group (>= D, a multiple of D), KB/VB key/value bits, KW/VW
# packed words per key/value, NSEG key-mean segments counting M_0 = 0 (0: no means),
# CAUSAL, SPLITS, VSUB (value tokens staged per round), ROT (1: D is a power of two and the group rotates the queries itself
# with a Walsh-Hadamard butterfly; 0: q arrives rotated). Inputs: q [B*Hkv, R, D] (any
# float type), key_signs [D] f32, means [B*Hkv, NSEG - 1, D] f16 (M_1, M_2, ...), packed
# keys / values [B*Hkv, CAP, KW|VW] u32, norms [B*Hkv, CAP] f16, segment ids [CAP],
# codebooks, params = {tokens held, tokens per split, capacity, scale} f32.
PARTIAL_BODY = """
  const int split = tq_group % SPLITS;
  const int bh = tq_group / SPLITS;
  const int T = static_cast<int>(params[0]);
  const int per_split = static_cast<int>(params[1]);
  const int cap = static_cast<int>(params[2]);
  const float sc = params[3];
  constexpr int RG = NT / D;
  constexpr int RPT = (R + RG - 1) / RG;
  constexpr int NQM = NSEG > 0 ? NSEG : 1;
  const int d = tq_tid % D;
  const int rg = tq_tid / D;

  TQ_SHARED float qs[R * D];
  TQ_SHARED float qm[R * NQM];
  TQ_SHARED float ps[R * NT];
  TQ_SHARED float row_m[R];
  TQ_SHARED float row_l[R];
  TQ_SHARED float row_alpha[R];
  TQ_SHARED float key_cb[1 << KB];
  TQ_SHARED float value_cb[1 << VB];
  TQ_SHARED uint32_t value_tile[VSUB * VW];
  TQ_SHARED float value_scale[VSUB];
  for (int i = tq_tid; i < (1 << KB); i += NT) {
    key_cb[i] = key_codebook[i];
  }
  for (int i = tq_tid; i < (1 << VB); i += NT) {
    value_cb[i] = value_codebook[i];
  }
  // Πq = H D q / sqrt(D) (turboquant_rotation.rotate), for all R rows at once.
  for (int i = tq_tid; i < R * D; i += NT) {
    qs[i] = static_cast<float>(q[(size_t)bh * R * D + i]) * (ROT ? key_signs[i % D] : 1.0f);
  }
  TQ_SYNC();
  if (ROT) {
    for (int len = 1; len < D; len <<= 1) {
      for (int i = tq_tid; i < R * D / 2; i += NT) {
        const int p = i % (D / 2);
        const int lo = (i / (D / 2)) * D + (p / len) * 2 * len + p % len;
        const float a = qs[lo];
        const float b = qs[lo + len];
        qs[lo] = a + b;
        qs[lo + len] = a - b;
      }
      TQ_SYNC();
    }
    for (int i = tq_tid; i < R * D; i += NT) {
      qs[i] *= 1.0f / sqrt((float)D);
    }
    TQ_SYNC();
  }
  // q . M_s for every row and segment (M_0 = 0).
  for (int i = tq_tid; i < R * NSEG; i += NT) {
    const int r = i / NQM;
    const int s = i % NQM;
    float dot = 0.0f;
    if (s > 0) {
      TQ_PTR(half_t) mean = means + ((size_t)bh * (NQM - 1) + s - 1) * D;
      for (int e = 0; e < D; e++) {
        dot += qs[r * D + e] * static_cast<float>(mean[e]);
      }
    }
    qm[i] = dot;
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
      // The token's words into registers first: independent loads, issued together.
      uint32_t kw[KW + 1];
      for (int w = 0; w < KW; w++) {
        kw[w] = packed_keys[((size_t)bh * cap + j) * KW + w];
      }
      kw[KW] = 0;
      const float norm = static_cast<float>(key_norms[(size_t)bh * cap + j]);
      float dots[R];
      for (int r = 0; r < R; r++) {
        dots[r] = 0.0f;
      }
      for (int e = 0; e < D; e++) {
        const float c = key_cb[tq_code(kw, e, KB)];
        for (int r = 0; r < R; r++) {
          dots[r] += qs[r * D + e] * c;
        }
      }
      const int s = NSEG > 0 ? static_cast<int>(segments[j]) : 0;
      for (int r = 0; r < R; r++) {
        float score = norm * dots[r];
        if (NSEG > 0) {
          score += qm[r * NQM + s];
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
    // Values VSUB tokens at a time, staged in shared memory by coalesced loads (every
    // thread needs every token's words: reading them from device memory one token
    // after another would serialize on load latency).
    const int n = min(NT, t_end - tile);
    for (int sub = 0; sub < n; sub += VSUB) {
      const int m = min(VSUB, n - sub);
      const size_t slot0 = (size_t)bh * cap + tile + sub;
      for (int i = tq_tid; i < m * VW; i += NT) {
        value_tile[i] = packed_values[slot0 * VW + i];
      }
      for (int i = tq_tid; i < m; i += NT) {
        value_scale[i] = static_cast<float>(value_norms[slot0 + i]);
      }
      TQ_SYNC();
      for (int jj = 0; jj < m; jj++) {
        const float v = value_scale[jj] * value_cb[tq_code(value_tile + jj * VW, d, VB)];
        for (int i = 0; i < RPT; i++) {
          const int r = rg + i * RG;
          if (r < R) {
            acc[i] += ps[r * NT + sub + jj] * v;
          }
        }
      }
      TQ_SYNC();
    }
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

# One thread group of D threads per (batch x KV head x row): merge the splits, then
# (ROT) rotate the row back, Π⁻¹y = D H y / sqrt(D), and write it in the model's dtype.
MERGE_BODY = """
  const int row = tq_group;
  const int d = tq_tid;
  TQ_SHARED float h[D];
  const int first = (row / R) * SPLITS * R + row % R;
  float m = -INFINITY;
  for (int s = 0; s < SPLITS; s++) {
    m = max(m, partial_max[first + s * R]);
  }
  float num = 0.0f;
  float den = 0.0f;
  for (int s = 0; s < SPLITS; s++) {
    const int k = first + s * R;
    const float w = partial_max[k] == -INFINITY ? 0.0f : TQ_EXP(partial_max[k] - m);
    num += w * partial_out[(size_t)k * D + d];
    den += w * partial_sum[k];
  }
  float o = num / den;
  if (ROT) {
    h[d] = o;
    tq_hadamard<D>(h, d);
    o = h[d] * value_signs[d];
  }
  out[(size_t)row * D + d] = static_cast<out_t>(o);
"""

# Quantize: one thread group of D threads per vector (norm, rotation, nearest centroid,
# norm correction, pack); groups [0, NK) take keys, the NV after them values, so one
# launch quantizes a decode step's keys and values. Template: D (a power of two),
# KBITS/VBITS, KW/VW packed words, NK, HAS_MEAN, PER_MEAN (keys sharing one mean).
# Inputs: keys [NK, D], values [NV, D], mean [NK / PER_MEAN, D] f32, signs [D] f32 and
# codebooks [2^bits] f32 per kind. Outputs: packed [N, W] u32 and norms [N] f16 per kind.
QUANTIZE_BODY = """
  const bool is_key = tq_group < NK;
  const int n = is_key ? tq_group : tq_group - NK;
  const int d = tq_tid;
  const int bits = is_key ? KBITS : VBITS;
  const int words = is_key ? KW : VW;
  TQ_PTR(float) signs = is_key ? key_signs : value_signs;
  TQ_PTR(float) codebook = is_key ? key_codebook : value_codebook;
  TQ_SHARED float h[D];
  TQ_SHARED float red[D];
  TQ_SHARED uint32_t codes[D];
  float v = static_cast<float>(is_key ? keys[(size_t)n * D + d] : values[(size_t)n * D + d]);
  if (HAS_MEAN && is_key) {
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
  tq_hadamard<D>(h, d);
  const float y = h[d];
  // Nearest centroid: the number of midpoints below y (ties to the lower one).
  uint32_t code = 0;
  for (int i = 0; i + 1 < (1 << bits); i++) {
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
  if (d < words) {
    uint32_t word = 0;
    const int first = (32 * d) / bits;
    const int last = min(D - 1, (32 * d + 31) / bits);
    for (int j = first; j <= last; j++) {
      const int shift = j * bits - 32 * d;
      word |= shift >= 0 ? codes[j] << shift : codes[j] >> (-shift);
    }
    if (is_key) {
      packed_keys[(size_t)n * KW + d] = word;
    } else {
      packed_values[(size_t)n * VW + d] = word;
    }
  }
  if (d == 0) {
    const half_t corrected = static_cast<half_t>(norm / max(sqrt(red[0]), 1e-30f));
    if (is_key) {
      key_norms[n] = corrected;
    } else {
      value_norms[n] = corrected;
    }
  }
"""

PARTIAL_INPUTS = [
    "q",
    "key_signs",
    "means",
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
MERGE_INPUTS = ["partial_out", "partial_max", "partial_sum", "value_signs"]

QUANTIZE_INPUTS = [
    "keys",
    "values",
    "mean",
    "key_signs",
    "value_signs",
    "key_codebook",
    "value_codebook",
]
QUANTIZE_OUTPUTS = ["packed_keys", "key_norms", "packed_values", "value_norms"]


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
):
    """turboquant_quantize of keys [B, H, S, D] (minus `mean` [B, H, 1, D] if given) and,
    if given, of values [B, H, S', D], in one launch. Returns (packed keys, key norms)
    or (packed keys, key norms, packed values, value norms); norms float16 [B, H, S]."""
    B, H, S, D = keys.shape
    kw = (D * key_bits + 31) // 32
    nk = B * H * S
    nv = 0 if values is None else values.size // D
    vw = (D * value_bits + 31) // 32 if values is not None else 1
    f32 = mx.float32
    outputs = _kernels(backend)[2](
        inputs=[
            keys.reshape(nk, D),
            _zeros(D, keys.dtype) if values is None else values.reshape(nv, D),
            _zeros(1, f32) if mean is None else mean.astype(f32),
            key_signs,
            _zeros(D, f32) if value_signs is None else value_signs,
            key_codebook,
            _zeros(2, f32) if value_codebook is None else value_codebook,
        ],
        template=[
            ("D", D),
            ("KBITS", key_bits),
            ("VBITS", value_bits or 1),
            ("KW", kw),
            ("VW", vw),
            ("NK", nk),
            ("HAS_MEAN", int(mean is not None)),
            ("PER_MEAN", S),
        ],
        grid=((nk + nv) * D, 1, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[(nk, kw), (nk,), (max(nv, 1), vw), (max(nv, 1),)],
        output_dtypes=[mx.uint32, mx.float16, mx.uint32, mx.float16],
    )
    pk, kn = outputs[0].reshape(B, H, S, kw), outputs[1].reshape(B, H, S)
    if values is None:
        return pk, kn
    shape = values.shape[:3]
    return pk, kn, outputs[2].reshape(*shape, vw), outputs[3].reshape(shape)


def threads_per_group(head_dim: int) -> int:
    return max(128, head_dim)


def supports(queries: mx.array, cache, mask) -> bool:
    """Whether the fused decode kernel handles this call (else: the reference path)."""
    if getattr(cache, "is_batch", False):
        return False  # left-padded batch caches (per-row segments) use the reference
    B, n_q_heads, L, D = queries.shape
    if L > MAX_QUERY_TOKENS or cache.head_dim != D or D % 32:
        return False
    # Key scaling and a float16 window change the attention math: reference path.
    if getattr(cache, "key_scales", None) is not None or getattr(cache, "fp16_window", 0):
        return False
    rows = n_q_heads // cache.n_kv_heads * L
    nt = threads_per_group(D)
    value_words = (D * cache.value_bits + 31) // 32
    shared = rows * (D + nt + 12) + VALUE_SUBTILE * (value_words + 1)
    shared += 2**cache.key_bits + 2**cache.value_bits
    if rows > MAX_ROWS or 4 * shared > SHARED_BYTES:
        return False
    if mask is None:
        return True
    return isinstance(mask, str) and mask == "causal" and not cache.is_ring()


def _rotates_inside(head_dim: int) -> bool:
    """The kernels rotate queries and outputs themselves for power-of-two head_dims
    (the Sylvester Hadamard matrix of mx.hadamard_transform); else the host does."""
    return head_dim & (head_dim - 1) == 0


def fused_decode_attention(queries: mx.array, cache, scale: float, mask, backend: str):
    """softmax(scale q Kᵀ + mask) V over the packed cache, for up to 8 query tokens."""
    B, n_q_heads, L, D = queries.shape
    buffers = cache.kernel_buffers()
    packed_keys, key_norms, packed_values, value_norms, segments, tokens = buffers
    n_kv = packed_keys.shape[1]
    cap = packed_keys.shape[2]
    group = n_q_heads // n_kv
    rows = group * L
    rot = _rotates_inside(D)
    q = queries if rot else rotate(queries, cache.key_signs)
    q = q.reshape(B * n_kv, rows, D)
    means = cache.key_means
    nseg = 0 if means is None else means.shape[2] + 1
    groups = B * n_kv
    splits = max(1, min(math.ceil(tokens / MIN_TOKENS_PER_SPLIT), TARGET_GROUPS // groups))
    per_split = math.ceil(tokens / splits)
    nt = threads_per_group(D)
    # Small integers and the scale are exact in float32: one parameter array per step.
    params = mx.array([tokens, per_split, cap, scale], dtype=mx.float32)
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
        ("VSUB", VALUE_SUBTILE),
        ("ROT", int(rot)),
    ]
    out, m, s = partial(
        inputs=[
            q,
            cache.key_signs,
            _zeros(1, mx.float16) if means is None else means,
            packed_keys,
            key_norms,
            packed_values,
            value_norms,
            segments,
            cache.key_centroids,
            cache.value_centroids,
            params,
        ],
        template=template,
        grid=(groups * splits * nt, 1, 1),
        threadgroup=(nt, 1, 1),
        output_shapes=[(groups, splits, rows, D), (groups, splits, rows), (groups, splits, rows)],
        output_dtypes=[mx.float32, mx.float32, mx.float32],
    )
    out_dtype = queries.dtype if rot else mx.float32
    (o,) = merge(
        inputs=[out, m, s, cache.value_signs],
        template=[
            ("D", D),
            ("R", rows),
            ("SPLITS", splits),
            ("ROT", int(rot)),
            ("out_t", out_dtype),
        ],
        grid=(groups * rows * D, 1, 1),
        threadgroup=(D, 1, 1),
        output_shapes=[(groups * rows, D)],
        output_dtypes=[out_dtype],
    )
    o = o.reshape(B, n_q_heads, L, D)
    if rot:
        return o
    return inverse_rotate(o, cache.value_signs).astype(queries.dtype)
