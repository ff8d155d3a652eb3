"""TurboQuantKVCache: keys and values kept only as packed Lloyd-Max codes plus one
norm per vector (arXiv 2504.19874, TurboQuant_mse).

Per token and KV head the cache holds `packed_words(head_dim, bits)` uint32 words of
codes and one float16 norm, for keys and values separately: at head_dim 128 and 3 bits
that is 48 + 2 bytes instead of 256 bytes of FP16. There is no FP16 shadow copy: the
packed codes and norms are the only copy of the context. With `fp16_window` = W the newest
W to 2W tokens are held in float16 instead (their only copy), coded W + 1 at a time.

Keys are quantized as residuals from a causal running key mean (see `key_mean_segment`):
keys carry a large per-channel offset that costs quantization levels without carrying
information, while values compress well as they are.

Attention (see `turboquant_attention.py`) works in the rotated domain, so nothing is
inverse-rotated per token. Like upstream's `QuantizedKVCache`, `update_and_fetch`
returns the cache's compressed form (the packed codes and norms), which models pass
straight to `base.scaled_dot_product_attention`: it dispatches on the cache. Building
float keys and values there would cost a decode step dozens of graph ops per layer for
arrays that the fused kernels never read; `dequantized()` gives them on request.
"""

from functools import lru_cache
from typing import List, NamedTuple, Optional

import mlx.core as mx
import numpy as np

from .cache import RotatingKVCache, _BaseCache, _causal_mask_for, _LeftPaddedBatch
from .turboquant import turboquant_dequantize_rotated, turboquant_quantize
from .turboquant_codebook import lloyd_max_codebook
from .turboquant_kernels import (
    MAX_QUERY_TOKENS,
    KernelView,
    fused_backend,
    fused_dequantize,
    fused_quantize,
    fused_segment_stats,
    quantize_supported,
)
from .turboquant_packing import packed_words
from .turboquant_rotation import inverse_rotate, rotate, rotation_signs

# Causal key mean: positions [32·4^(s-1), 32·4^s) form segment s and are quantized as
# residuals from the mean of every key before 32·4^(s-1); segment 0 (the first 32
# tokens) has mean 0. A mean per segment costs one float16 vector per head, so at most
# a few per cache (3 at 2K tokens); from 2^21 tokens on, the last segment's mean is kept.
KEY_MEAN_FIRST_SEGMENT = 32
KEY_MEAN_MAX_SEGMENT = 8

SUPPORTED_BITS = tuple(range(1, 9))
_NO_MEANS = mx.zeros((1, 1, 1, 1), dtype=mx.float16)

# Key scaling: σ_s = (per-channel variance)^(EXPONENT / 2), normalized to mean square 1
# and floored. For queries spread evenly over the channels, the score error
# Σ_c q_c² σ_c² · Σ_c var_c / σ_c² is smallest at σ_c ∝ var_c^(1/4) (Cauchy-Schwarz);
# measured on Gemma 3 270M (4-bit, 2K tokens): +10.3% perplexity without, +5.4% with
# exponent 1/2, +7.0% with exponent 1 (plain standardization).
KEY_SCALE_EXPONENT = 0.5
KEY_SCALE_FLOOR = 0.05

# What --turbo-kv-bits N means unless told otherwise (make_prompt_cache and every CLI),
# chosen by measurement (README, "Choosing the defaults"): the last 64 tokens in float16
# and key scaling wherever key centering is on.
DEFAULT_FP16_WINDOW = 64


# Compiled once per bit width and codebook (and head_dim): fusing the dozens of small ops
# of quantize/dequantize into a few kernels matters on the GPU, where launches dominate.
# The codebook is a tuple of floats the function closes over (`centroid_lookup`).
@lru_cache(maxsize=None)
def _quantizer(bits: int, codebook: tuple):
    return mx.compile(lambda x, signs: turboquant_quantize(x, signs, codebook, bits))


@lru_cache(maxsize=None)
def _kv_dequantizer(
    key_bits: int,
    value_bits: int,
    head_dim: int,
    centered: bool,
    scaled: bool,
    inverse: bool,
    key_codebook: tuple,
    value_codebook: tuple,
):
    """One compiled call for a context's keys and values: Πk̂ = Π(σ_s ∘ Πᵀŷ) + M_s and
    Πv̂ (rotated domain), or k̂ and v̂ (`inverse`). Segment ids come as [B or 1, 1, T, 1]
    (one per slot, per row in a batch cache). Compiled per shape: callers pass whole
    buffers, which change shape only when they grow."""

    def dequantize(pk, kn, segments, pv, vn, means, scales, key_signs, value_signs):
        k = turboquant_dequantize_rotated(pk, kn, key_codebook, key_bits, head_dim)
        if centered:
            # Preallocated slots past the offset may lie in segments not opened yet.
            segments = mx.minimum(segments, means.shape[2] - 1)
            if scaled:
                sigma = _per_slot(scales, segments).astype(mx.float32)
                k = rotate(sigma * inverse_rotate(k, key_signs), key_signs)
            k = k + _per_slot(means, segments).astype(mx.float32)
        v = turboquant_dequantize_rotated(pv, vn, value_codebook, value_bits, head_dim)
        if inverse:
            return inverse_rotate(k, key_signs), inverse_rotate(v, value_signs)
        return k, v

    return mx.compile(dequantize)


def _per_slot(table: mx.array, segments: mx.array) -> mx.array:
    """table[:, :, segments] along axis 2 ([B or 1, H, S, D] rows per key-mean segment,
    segment ids [B or 1, 1, T, 1] below S): a chain of `mx.where` over the few segments,
    which a compiled dequantizer fuses, where `mx.take_along_axis` is a gather of T x D
    values per head (slow on the CPU backend)."""
    out = table[:, :, :1]
    for s in range(1, table.shape[2]):
        out = mx.where(segments == s, table[:, :, s : s + 1], out)
    return out


_EMPTY = mx.zeros((0,), dtype=mx.float16)  # an absent array in a saved state
_ZERO = mx.zeros((1,), dtype=mx.int32)


def _half_exact(centroids) -> mx.array:
    """A codebook as float32 values that float16 holds exactly: the tensor-core kernel
    reads centroids from float16 pair tables, and so the reference reads the same values
    (rounding moves a centroid by at most 2^-12 of itself)."""
    return mx.array(centroids, dtype=mx.float16).astype(mx.float32)


@lru_cache(maxsize=None)
def _codec_constants(head_dim: int, seed: int, layer_idx: int, key_bits: int, value_bits: int):
    """One layer's rotation signs (keys, values), centroids (keys, values) and the same
    centroids as tuples (constants of the compiled quantizers and dequantizers). Made
    once per process: every new cache asks for them in each layer (each request a server
    takes), and making them took 0.25-0.28 ms a layer on the CPU machine, in the first
    prefill chunk's time."""
    key_centroids = _half_exact(lloyd_max_codebook(key_bits, head_dim))
    value_centroids = _half_exact(lloyd_max_codebook(value_bits, head_dim))
    return (
        rotation_signs(head_dim, seed, layer_idx, "k"),
        rotation_signs(head_dim, seed, layer_idx, "v"),
        key_centroids,
        value_centroids,
        tuple(np.array(key_centroids).tolist()),
        tuple(np.array(value_centroids).tolist()),
    )


def window_flush(uncoded: int, window: int) -> int:
    """How many of `uncoded` float16 tokens to code now with an FP16 window of `window`
    (W): none while at most 2W, else all but the newest W. Coding a block at a time keeps
    a decode step's work to the float16 append W times out of W + 1."""
    return uncoded - window if uncoded > 2 * window else 0


def check_fp16_window(window) -> int:
    """Validate an FP16 window length (an int >= 0); returns it."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise ValueError(
            f"fp16_window (--turbo-fp16-window) must be a non-negative integer, got {window!r}."
        )
    return window


def check_turbo_bits(name: str, bits) -> int:
    """Validate a bit width (an int in 1..8); returns it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{name} must be an integer from 1 to 8 (2, 3 or 4 for --turbo-kv-bits), got {bits!r}."
        )
    return bits


def segment_start(s: int) -> int:
    """b_s, the first position of key-mean segment s: 0, 32, 128, 512, 2048, ..."""
    return 0 if s == 0 else KEY_MEAN_FIRST_SEGMENT << (2 * (s - 1))


def key_mean_segment(position: int, max_segment: int = KEY_MEAN_MAX_SEGMENT) -> int:
    """s(p) = 0 for p < 32, else floor(log4(p / 32)) + 1, at most `max_segment`."""
    q = position // KEY_MEAN_FIRST_SEGMENT
    return 0 if q == 0 else min(max_segment, (q.bit_length() - 1) // 2 + 1)


def segment_pieces(start: int, stop: int, max_segment: int):
    """(s, a, b) for each key-mean segment s that positions [start, stop) meet, [a, b)
    its part of them, in order."""
    while start < stop:
        s = key_mean_segment(start, max_segment)
        end = stop if s == max_segment else min(stop, segment_start(s + 1))
        yield s, start, end
        start = end


@lru_cache(maxsize=64)
def key_mean_segments(start: int, stop: int, max_segment: int = KEY_MEAN_MAX_SEGMENT):
    """s(p) for positions start..stop-1, as an int32 array (made once per range: a prefill
    chunk asks in every layer, each time its buffers have grown)."""
    q = np.arange(start, stop) // KEY_MEAN_FIRST_SEGMENT
    log2 = np.floor(np.log2(np.maximum(q, 1))).astype(np.int64)
    s = np.where(q > 0, log2 // 2 + 1, 0)
    return mx.array(np.minimum(s, max_segment).astype(np.int32))


class SegmentStats(NamedTuple):
    """What opening key-mean segment s gives (see `TurboQuantCodec`): M_s float16
    (rotated) and μ_s = Πᵀ M_s float32, what new keys are centered by; with key scaling
    σ_s float16 and, float32, σ_s, 1/σ_s and μ_s/σ_s (the fused quantizer's), else None."""

    mean: mx.array
    mu: mx.array
    scale: Optional[mx.array] = None
    sigma: Optional[mx.array] = None
    inv_sigma: Optional[mx.array] = None
    mu_over_sigma: Optional[mx.array] = None


def next_segment_stats(codec, parts, hi, prev_mean, prev_scale) -> SegmentStats:
    """`SegmentStats` of segment s from the stored codes of segment s - 1, `parts` =
    [(packed keys, key norms)] in position order, and b_s = `hi`; `prev_mean` is M_{s-1}
    and `prev_scale` σ_{s-1}, float32 (None for s = 1, or without scaling). One call of
    a compiled function (`_segment_stats`), where no kernel runs; on a GPU
    `TurboQuantCodec._open_stats` runs `fused_segment_stats` instead, two launches
    (this compiled call's reductions and rotations were about 30 kernels each time a
    prefill chunk opened a segment)."""
    f = _segment_stats(
        codec.key_bits,
        codec.head_dim,
        codec.key_codebook,
        len(parts),
        prev_mean is not None,
        prev_scale is not None,
        codec.key_scaling,
    )
    prev = [x for x in (prev_mean, prev_scale) if x is not None]
    return SegmentStats(*f(codec.key_signs, _inverse(hi), *[x for p in parts for x in p], *prev))


def _head_rows(x: mx.array, head: int, shape) -> mx.array:
    """Heads head..head + B H - 1 of x [B', H, ...], counted flat over B' x H, as
    [B, H, ...] for (B, H) = `shape` (a batch row, or every head from 0)."""
    B, H = shape
    if head == 0 and x.shape[0] == B:
        return x
    return x.reshape(-1, *x.shape[2:])[head : head + B * H].reshape(B, H, *x.shape[2:])


@lru_cache(maxsize=None)
def _inverse(n: int) -> mx.array:
    return mx.array(1.0 / n, dtype=mx.float32)


@lru_cache(maxsize=None)
def _segment_stats(bits, head_dim, codebook, n_parts, has_mean, has_scale, scaling):
    """Dequantize ŷ of segment s - 1, `segment_stats`, and what the quantizer derives
    from them, compiled: as separate ops these were a few dozen graph nodes (host time)
    and GPU launches each time a prefill chunk opened a segment. 1 / b_s comes as an
    input, not a constant, so that every segment reuses the compiled kernels (on the
    GPU a constant would be written into their source)."""

    def stats(key_signs, inv_hi, *args):
        codes, prev = args[: 2 * n_parts], args[2 * n_parts :]
        residuals = [
            turboquant_dequantize_rotated(codes[i], codes[i + 1], codebook, bits, head_dim)
            for i in range(0, 2 * n_parts, 2)
        ]
        residuals = mx.concatenate(residuals, axis=2) if n_parts > 1 else residuals[0]
        prev_mean = prev[0] if has_mean else None
        prev_scale = prev[-1] if has_scale else None
        mean, scale = segment_stats(residuals, inv_hi, prev_mean, prev_scale, key_signs, scaling)
        mu = inverse_rotate(mean.astype(mx.float32), key_signs)
        if not scaling:
            return mean, mu
        sigma = scale.astype(mx.float32)
        return mean, mu, scale, sigma, 1.0 / sigma, mu / sigma

    return mx.compile(stats)


def segment_stats(residuals, inv_hi, prev_mean, prev_scale, key_signs, scaling):
    """(M_s, σ_s) float16 [B, n_kv_heads, 1, head_dim] from ŷ of segment s - 1
    (`residuals`, rotated) and `inv_hi` = 1 / b_s (see `TurboQuantCodec`); `prev_mean`
    is M_{s-1} and `prev_scale` σ_{s-1}, float32 (None for s = 1, or without scaling).
    σ_s is None unless `scaling`."""
    total = mx.sum(residuals, axis=2, keepdims=True)
    if prev_scale is not None:  # Π(σ_{s-1} ∘ Πᵀ Σ ŷ): linear in ŷ
        total = rotate(inverse_rotate(total, key_signs) * prev_scale, key_signs)
    mean = total * inv_hi if prev_mean is None else prev_mean + total * inv_hi
    mean = mean.astype(mx.float16)
    if not scaling:
        return mean, None
    # σ_s from the reconstructed keys of segment s - 1, centered by μ_s.
    keys = inverse_rotate(residuals, key_signs)
    if prev_scale is not None:
        keys = prev_scale * keys
    if prev_mean is not None:
        keys = keys + inverse_rotate(prev_mean, key_signs)
    keys = keys - inverse_rotate(mean.astype(mx.float32), key_signs)
    var = mx.mean(keys * keys, axis=2, keepdims=True)
    half = var.shape[-1] // 2
    pair = (var[..., :half] + var[..., half:]) / 2  # RoPE pairs share a scale
    var = mx.concatenate([pair, pair], axis=-1)
    sigma = var ** (KEY_SCALE_EXPONENT / 2)
    sigma = sigma / mx.sqrt(mx.mean(sigma * sigma, axis=-1, keepdims=True) + 1e-30)
    return mean, mx.maximum(sigma, KEY_SCALE_FLOOR).astype(mx.float16)


# What `_derived` finds for a name not derived yet (None is a value: no fused call).
_NOT_DERIVED = object()


class TurboQuantCodec:
    """What both TurboQuant caches share: the settings, the rotation and codebooks, and
    the quantization of new tokens.

    Causal key centering. The keys of position p in segment s = s(p) are stored as
    TurboQuant codes of k_p - μ_s, where μ_s is the mean of the reconstructed keys of all
    positions before b_s (μ_0 = 0). In the rotated domain (M_s = Π μ_s):

        M_s = M_{s-1} + (1 / b_s) Σ_{j ∈ [b_{s-1}, b_s)} ŷ_j

    with ŷ_j = n_j c_j the stored residual of token j. Attention adds M_{s(j)} back to
    ŷ_j, so scores are exact up to quantization error. The means are stored in float16
    and used as stored on both sides. Every M_s is a function of the
    stored codes of earlier positions only: chunked and one-shot prefill, trim and
    re-feed, save and reload all give the same means. Measured on SmolLM2, 2K tokens of
    the GPL-3 text, 4-bit: perplexity +2.5% instead of +6.9%, top-1 agreement 0.869
    instead of 0.841; a mean taken once from the first chunk broke short chat prompts,
    the causal one does not (the README has the measured tables).

    Key scaling (`key_scaling`, needs centering). Since q·k = (q∘σ)·(k/σ) for any
    per-channel σ, keys of segment s ≥ 1 are stored as codes of (k_p - μ_s) / σ_s and
    reconstructed as k̂_p = μ_s + σ_s ∘ Πᵀ ŷ_p, where σ_s (original channel domain, one
    float16 vector per head and segment) is computed from the reconstructed keys of
    segment s - 1 (all earlier keys for s = 1):

        v_c = mean_j (k̂_j,c - μ_s,c)²,  pooled over RoPE pairs (c, c + d/2),
        σ_s = max(v^(EXPONENT/2) / rms(v^(EXPONENT/2)), FLOOR)

    Like μ_s, σ_s depends only on stored codes of earlier positions. Channels with a
    large spread (keys after a per-head key norm, as in Gemma 3) then stop taking the
    quantization levels of the others. The fused kernel scores segment s with the
    query Π(q∘σ_s) (`kernel_segment_stats`).
    """

    def _init_codec(self, key_bits, value_bits, seed, layer_idx, key_centering, key_scaling=False):
        self.key_bits = check_turbo_bits("key_bits", key_bits)
        self.value_bits = check_turbo_bits("value_bits", value_bits)
        self.seed = seed
        self.layer_idx = layer_idx
        self.key_centering = bool(key_centering)
        self.key_scaling = bool(key_scaling)
        if self.key_scaling and not self.key_centering:
            raise ValueError(
                "Key scaling works per key-mean segment: it needs key centering (drop "
                "--turbo-no-key-centering, or add --turbo-no-key-scaling)."
            )
        self.head_dim = None
        # M_1, M_2, ... as [B, n_kv_heads, segments - 1, head_dim] float16 in the rotated
        # domain (M_0 = 0 is not stored); None before position 32.
        self.key_means = None
        # σ_1, σ_2, ... (key scaling) [B, n_kv_heads, segments - 1, head_dim] float16 in
        # the original domain (σ_0 = 1 is not stored).
        self.key_scales = None

    @property
    def key_scales(self) -> Optional[mx.array]:
        return self._key_scales

    @key_scales.setter
    def key_scales(self, scales: Optional[mx.array]):
        self._key_scales = scales
        self._derived_means = {}

    @property
    def key_means(self) -> Optional[mx.array]:
        return self._key_means

    @key_means.setter
    def key_means(self, means: Optional[mx.array]):
        self._key_means = means
        self._derived_means = {}  # per-step values derived from the means, reused

    def _derived(self, name, make):
        # One hash of the name, not two: a decode call's is a tuple of shapes and dtypes,
        # looked up in every layer of every step.
        derived = self._derived_means
        value = derived.get(name, _NOT_DERIVED)
        if value is _NOT_DERIVED:
            value = derived[name] = make()
        return value

    def _setup(self, k_head_dim: int, v_head_dim: int):
        if k_head_dim != v_head_dim:
            raise ValueError(
                f"TurboQuant needs keys and values of one head_dim (got {k_head_dim} and "
                f"{v_head_dim}); run this model without --turbo-kv-bits."
            )
        self.head_dim = k_head_dim
        self._derive()

    def _derive(self):
        (
            self.key_signs,
            self.value_signs,
            self.key_centroids,
            self.value_centroids,
            self.key_codebook,
            self.value_codebook,
        ) = _codec_constants(
            self.head_dim, self.seed, self.layer_idx, self.key_bits, self.value_bits
        )

    def _codec_meta(self):
        """The settings a saved cache records (read back by `_set_codec_meta`)."""
        settings = (self.key_bits, self.value_bits, self.seed, self.layer_idx)
        return (*settings, self.head_dim or 0, int(self.key_centering), int(self.key_scaling))

    def _set_codec_meta(
        self, key_bits, value_bits, seed, layer_idx, head_dim, centering, scaling=0
    ):
        key_means, key_scales = self.key_means, self.key_scales  # set by the state setter
        self._init_codec(key_bits, value_bits, seed, layer_idx, centering, scaling)
        self.key_means, self.key_scales = key_means, key_scales
        self.head_dim = head_dim or None
        if self.head_dim is not None:
            self._derive()

    @property
    def max_segment(self) -> int:
        return KEY_MEAN_MAX_SEGMENT if self.key_centering else 0

    def _stored_key_rows(self, start: int, stop: int):
        """The stored codes of positions start..stop-1 as a `fused_segment_stats` source,
        (packed keys, key norms, first head, first row, rows) (subclasses: where they
        are)."""
        raise NotImplementedError

    def _add_key_mean(self, s: int, first: int, pieces):
        """Append M_s (see the class docstring); `pieces` are this update's quantized
        keys so far as (start, packed, norms), the first at position `first`."""
        lo, hi = segment_start(s - 1), segment_start(s)
        sources = [self._stored_key_rows(lo, first)] if lo < first else []
        sources += [(pk, kn, 0, 0, pk.shape[2]) for start, pk, kn in pieces if start >= lo]
        prev = (self.key_means, self.key_scales, 0, s - 2) if s > 1 else None
        stats = self._open_stats(sources, sources[0][0].shape[:2], prev, hi)
        self.key_means = stats.mean if s == 1 else mx.concatenate([self.key_means, stats.mean], 2)
        if self.key_scaling:
            scales = self.key_scales
            self.key_scales = stats.scale if s == 1 else mx.concatenate([scales, stats.scale], 2)
        # What this segment's quantization asks for next, made with the means (the
        # setters above dropped everything derived before).
        self._derived_means[s] = stats.mu  # `_original_key_mean`
        if self.key_scaling:
            self._derived_means[("scale", s)] = stats.sigma  # `_key_scale`
            self._derived_means[("fused", s)] = (stats.inv_sigma, stats.mu_over_sigma)  # `_code`

    def _open_stats(self, sources, shape, prev, hi: int) -> SegmentStats:
        """`SegmentStats` of segment s (b_s = `hi`) for heads of `shape` (B, H), from the
        codes of segment s - 1 as `fused_segment_stats` reads them (`sources`, `prev`:
        buffers with a first head, row and column): on a GPU its two launches, elsewhere
        `next_segment_stats` on those rows sliced out. Shared by the single and the
        batch caches."""
        backend = self.kernel_backend()
        if backend is not None:
            stats = fused_segment_stats(
                sources,
                tuple(shape),
                prev,
                self.key_signs,
                self.key_centroids,
                self.key_bits,
                hi,
                self.key_scaling,
                (KEY_SCALE_EXPONENT, KEY_SCALE_FLOOR),
                backend,
            )
            return SegmentStats(*(stats if self.key_scaling else stats[:2]))
        parts = [
            tuple(_head_rows(x, head, shape)[:, :, first : first + n] for x in (pk, kn))
            for pk, kn, head, first, n in sources
        ]
        prev_mean = prev_scale = None
        if prev is not None:
            means, scales, head, col = prev
            column = lambda x: _head_rows(x, head, shape)[:, :, col : col + 1]  # noqa: E731
            prev_mean = column(means).astype(mx.float32)
            prev_scale = None if scales is None else column(scales).astype(mx.float32)
        return next_segment_stats(self, parts, hi, prev_mean, prev_scale)

    def _code(self, keys, values, mean, scale, backend, stats_key, rows=None, value_rows=None):
        """Codes of keys centered by μ = `mean` and scaled by σ = `scale` (each float32
        [B, n_kv_heads, 1, head_dim] or None), coded as k/σ - μ/σ, and, if given, of
        `values`: (packed keys, key norms[, packed values, value norms]), norms float16.
        On a GPU (`backend`) one fused launch, with (1/σ, μ/σ) made once and kept under
        `stats_key` until the means change; elsewhere the compiled reference quantizers.
        `rows` / `value_rows` = (a, b): code only rows [a, b) of axis 2 (the kernel
        reads them in place; a slice would be copied for it). Shared by the single and
        the batch caches."""
        if backend is not None:
            inv_scale = None
            if scale is not None:
                inv_scale, mean = self._derived(stats_key, lambda: (1.0 / scale, mean / scale))
            return fused_quantize(
                keys,
                mean,
                values,
                self.key_signs,
                self.key_centroids,
                self.key_bits,
                self.value_signs,
                self.value_centroids,
                self.value_bits,
                backend,
                scale=inv_scale,
                key_rows=rows,
                value_rows=value_rows,
            )
        x = keys if rows is None else keys[:, :, rows[0] : rows[1]]
        if values is not None and value_rows is not None:
            values = values[:, :, value_rows[0] : value_rows[1]]
        if scale is not None:  # (x - μ) / σ = x / σ - μ / σ
            x, mean = x.astype(mx.float32) / scale, mean / scale
        if mean is not None:
            x = x.astype(mx.float32) - mean
        pk, kn = _quantizer(self.key_bits, self.key_codebook)(x, self.key_signs)
        coded = (pk, kn.astype(mx.float16))
        if values is not None:
            pv, vn = _quantizer(self.value_bits, self.value_codebook)(values, self.value_signs)
            coded += (pv, vn.astype(mx.float16))
        return coded

    def _key_scale(self, s: int) -> mx.array:
        """σ_s [B, n_kv_heads, 1, head_dim] float32 (original domain; σ_0 = 1)."""
        if s == 0 or self.key_scales is None:
            return mx.array(1.0)
        return self._derived(
            ("scale", s), lambda: self.key_scales[:, :, s - 1 : s].astype(mx.float32)
        )

    def _key_mean(self, s: int) -> mx.array:
        """M_s [B, n_kv_heads, 1, head_dim] float32 (rotated domain)."""
        if s == 0:
            return mx.array(0.0)
        return self.key_means[:, :, s - 1 : s].astype(mx.float32)

    @property
    def n_coded(self) -> int:
        """Tokens held as codes (positions 0..n_coded-1 in a linear cache)."""
        return self.offset

    @property
    def segments_held(self) -> int:
        return 1 + (0 if self.key_means is None else self.key_means.shape[2])

    def _quantize(self, keys: mx.array, values: mx.array, first: Optional[int] = None):
        """Codes of S new tokens at positions first..first+S-1 (default: from the
        offset): (packed keys, key norms, packed values, value norms), norms float16."""
        pieces, (pv, vn) = self._quantize_pieces(keys, values, first)
        if len(pieces) > 1:
            pk = mx.concatenate([p[0] for p in pieces], axis=2)
            kn = mx.concatenate([p[1] for p in pieces], axis=2)
        else:
            pk, kn = pieces[0]
        return pk, kn, pv, vn

    def _quantize_pieces(self, keys, values, first: Optional[int] = None, count=None):
        """`_quantize`'s codes as ([(packed keys, key norms) per key-mean segment piece],
        (packed values, value norms)), of the first `count` rows (default: all) of keys
        and values: keys are quantized a piece at a time (one piece for a decode step);
        on a GPU the first piece's keys and all values go through one fused launch, and
        every piece is read where it lies."""
        d = keys.shape[-1]
        S = keys.shape[2] if count is None else count
        if self.head_dim is None:
            self._setup(d, values.shape[-1])
        first = self.offset if first is None else first
        stop = first + S
        backend = self.kernel_backend()

        pieces, coded_values = [], None
        for s, start, end in segment_pieces(first, stop, self.max_segment):
            if s == self.segments_held:
                self._add_key_mean(s, first, pieces)
            rows = (start - first, end - first)
            mean = self._original_key_mean(s) if s > 0 else None
            scale = self._key_scale(s) if s > 0 and self.key_scales is not None else None
            # On a GPU the first piece's launch codes all values too.
            with_values = values if backend is not None and coded_values is None else None
            out = self._code(keys, with_values, mean, scale, backend, ("fused", s), rows, (0, S))
            pk, kn = out[:2]
            if with_values is not None:
                coded_values = out[2:]
            pieces.append((start, pk, kn))
        if coded_values is None:
            values = values if count is None else values[:, :, :count]
            pv, vn = _quantizer(self.value_bits, self.value_codebook)(values, self.value_signs)
            coded_values = (pv, vn.astype(mx.float16))
        return [p[1:] for p in pieces], coded_values

    def _dequantized(
        self,
        packed_keys,
        key_norms,
        segments,
        packed_values,
        value_norms,
        inverse,
        dtype,
        count,
        window=None,
    ):
        """Πk̂ = Π(σ_s ∘ Πᵀŷ) + M_s and Πv̂ for the given buffers (segments: int [T], or
        [B, T] per row) in `dtype`; or, with `inverse`, k̂ and v̂ in the model's domain.
        On a GPU one fused launch (`fused_dequantize`) for the first `count` slots, and
        after them the float16 `window` (keys, values) if given; elsewhere the compiled
        reference, in float32 and then cast, for every slot (its shapes change only
        when the buffers grow; callers slice; no window)."""
        backend = self.kernel_backend()
        if backend is not None:
            seg_scale, seg_mean = self._dequant_stats(inverse)
            return fused_dequantize(
                packed_keys,
                key_norms,
                packed_values,
                value_norms,
                segments,
                seg_scale,
                seg_mean,
                self.key_signs,
                self.value_signs,
                self.key_centroids,
                self.value_centroids,
                self.key_bits,
                self.value_bits,
                inverse,
                dtype,
                backend,
                count,
                window,
            )
        means, scales = self.key_means_with_zero(), self.key_scales_with_one()
        segments = segments.reshape(-1, 1, segments.shape[-1], 1)
        f = _kv_dequantizer(
            self.key_bits,
            self.value_bits,
            self.head_dim,
            means is not None,
            scales is not None,
            inverse,
            self.key_codebook,
            self.value_codebook,
        )
        k, v = f(
            packed_keys,
            key_norms,
            segments,
            packed_values,
            value_norms,
            _NO_MEANS if means is None else means,
            _NO_MEANS if scales is None else scales,
            self.key_signs,
            self.value_signs,
        )
        return k.astype(dtype), v.astype(dtype)

    def kernel_backend(self) -> Optional[str]:
        """The backend the fused quantize and dequantize kernels run on for this cache's
        head_dim, or None (the compiled reference)."""
        return fused_backend() if quantize_supported(self.head_dim) else None

    def _dequant_stats(self, inverse: bool):
        """(σ_s, M_s) float32 [B, n_kv_heads, segments, head_dim] for `fused_dequantize`
        (μ_s = Πᵀ M_s in place of M_s with `inverse`); None where absent."""
        means = self.key_means_with_zero()
        if means is None:
            return None, None

        def make():
            scales = self.key_scales_with_one()
            mean = means.astype(mx.float32)
            if inverse:
                mean = inverse_rotate(mean, self.key_signs)
            return None if scales is None else scales.astype(mx.float32), mean

        return self._derived(("dequant", inverse), make)

    def _compressed(self):
        """What update_and_fetch returns: (packed keys, key norms), (packed values, value
        norms), the whole buffers (no ops)."""
        return (self.packed_keys, self.key_norms), (self.packed_values, self.value_norms)

    def dequantized(self, dtype=mx.float32):
        """Keys and values of the whole context as float arrays in the model's domain
        (codes dequantized, float16-window tokens as held), lazily."""
        return self._fetch(dtype)

    def _fetch(self, dtype):
        """Dequantized keys and values of the context, in the model's domain."""
        return self.coded_keys_values(dtype, rotated=False)

    def key_means_with_zero(self) -> Optional[mx.array]:
        """[M_0 = 0, M_1, ...] as [B, n_kv_heads, segments, head_dim], or None."""
        if self.key_means is None:
            return None
        means = self.key_means
        return self._derived(
            "with_zero", lambda: mx.concatenate([mx.zeros_like(means[:, :, :1]), means], 2)
        )

    def key_scales_with_one(self) -> Optional[mx.array]:
        """[σ_0 = 1, σ_1, ...] as [B, n_kv_heads, segments, head_dim], or None."""
        if self.key_scales is None:
            return None
        scales = self.key_scales
        return self._derived(
            "with_one", lambda: mx.concatenate([mx.ones_like(scales[:, :, :1]), scales], 2)
        )

    def kernel_segment_stats(self):
        """(σ_s, M̃_s = Π(μ_s / σ_s)) for every segment held, float32 [B, n_kv_heads,
        segments, head_dim]: the fused kernel scores segment s as Π(q∘σ_s)·(ŷ_j + M̃_s).
        σ is None without key scaling (M̃ = M), both None without key means."""
        means = self.key_means_with_zero()
        if means is None:
            return None, None

        def make():
            scales = self.key_scales_with_one()
            if scales is None:
                return None, means.astype(mx.float32)
            sigma = scales.astype(mx.float32)
            mu = inverse_rotate(means.astype(mx.float32), self.key_signs)
            return sigma, rotate(mu / sigma, self.key_signs)

        return self._derived("kernel_stats", make)

    def _original_key_mean(self, s: int) -> mx.array:
        """μ_s = Πᵀ M_s [B, n_kv_heads, 1, head_dim] float32, what new keys are centered by."""
        return self._derived(s, lambda: inverse_rotate(self._key_mean(s), self.key_signs))

    def _keep_key_means(self):
        """After a trim: drop the means of segments that start after the new offset (they
        are recomputed, identically, when those positions are filled again)."""
        n = key_mean_segment(self.n_coded, self.max_segment)
        if self.key_means is not None and n < self.segments_held - 1:
            self.key_means = self.key_means[:, :, :n] if n > 0 else None
            if self.key_scales is not None:
                self.key_scales = self.key_scales[:, :, :n] if n > 0 else None


class TurboQuantKVCache(TurboQuantCodec, _BaseCache):
    """A KV cache compressed with TurboQuant.

    Args:
        key_bits, value_bits: bits per coordinate for keys and values (1-8).
        seed: seed of the random rotations (with `layer_idx`, fixes the signs).
        layer_idx: the layer this cache serves; each layer gets its own rotation.
        key_centering: quantize keys as residuals from the causal running key mean
            (`TurboQuantCodec`); on by default.
        key_scaling: also scale keys per channel before quantizing (`TurboQuantCodec`).
        fp16_window: keep the keys and values of the newest `fp16_window` (W) to 2W
            tokens in float16, KIVI-style: once an update leaves more than 2W tokens
            uncoded, all but the newest W are coded in one launch (so a decode step
            codes nothing W times out of W + 1, and launches no quantize kernel nor
            code-buffer updates then). Every query of an update reads the tokens that
            were uncoded when the update began, and the update's own, in float16
            (causally) and older ones through their codes: prefill attention is then a
            plain causal attention over [codes | float16], no per-query mask. Held:
            codes of positions [0, coded) and float16 keys/values of [coded, offset);
            after an update the float16 copies of the tokens it coded (which its
            attention reads) stay until the next update.
    """

    step = 256

    def __init__(
        self,
        key_bits: int = 3,
        value_bits: int = 3,
        seed: int = 0,
        layer_idx: int = 0,
        key_centering: bool = True,
        key_scaling: bool = False,
        fp16_window: int = 0,
    ):
        self._init_codec(key_bits, value_bits, seed, layer_idx, key_centering, key_scaling)
        self.fp16_window = check_fp16_window(fp16_window)
        self.offset = 0
        self.coded = 0  # positions 0..coded-1 hold codes, coded..offset-1 only float16
        self.packed_keys = None
        self.key_norms = None
        self.packed_values = None
        self.value_norms = None
        self._segments = None
        # float16 keys/values of positions recent_start..offset-1 (recent_start <= coded):
        # `recent_keys` / `recent_values`, views of the window buffers after a decode step
        self._recent = (None, None)
        self._window_end = None  # set: `_recent` is yet to be sliced out of the buffers
        self.recent_start = 0
        self._window_buffers = None  # (keys, values) of slots window_base..; see _slide_window
        self.window_base = 0

    @property
    def n_coded(self) -> int:
        return self.coded

    # ---- storage ----

    def _store(self, key_pieces, coded_values):
        """Write codes of the next n positions at slots coded..coded+n-1: keys as
        `_quantize_pieces` gives them, [(packed keys, key norms) per segment piece], and
        (packed values, value norms). Buffers that must grow are remade in one
        concatenation per array, [old codes | the pieces | zeros], the zeros up to a
        multiple of `step` only for an update shorter than `step` (a decode step's
        block; a prefill chunk's buffers grow again with the next chunk): zeros, joins
        and slice updates each were graph nodes and GPU copies in every chunk."""
        n = sum(p[0].shape[2] for p in key_pieces)
        prev = self.coded
        self.coded += n
        columns = [[p[0] for p in key_pieces], [p[1] for p in key_pieces]]
        columns += [[x] for x in coded_values]
        if self.packed_keys is not None and self.coded <= self.packed_keys.shape[2]:
            for buffer, parts in zip(self._buffers(), columns):
                at = prev
                for x in parts:
                    buffer[:, :, at : at + x.shape[2]] = x
                    at += x.shape[2]
            return
        pad = -self.coded % self.step if n < self.step else 0
        old = self._buffers() if self.packed_keys is not None else [None] * 4
        new = []
        for buffer, parts in zip(old, columns):
            x = parts[0]
            if buffer is not None:
                parts = [buffer[:, :, :prev], *parts]
            if pad:
                parts.append(mx.zeros((*x.shape[:2], pad, *x.shape[3:]), x.dtype))
            new.append(mx.concatenate(parts, axis=2) if len(parts) > 1 else x)
        self.packed_keys, self.key_norms, self.packed_values, self.value_norms = new

    def _buffers(self):
        return [self.packed_keys, self.key_norms, self.packed_values, self.value_norms]

    def _stored_arrays(self):
        extra = [x for x in (self.key_means, self.key_scales) if x is not None]
        return self._buffers() + extra

    def _stored_key_rows(self, start, stop):
        return self.packed_keys, self.key_norms, 0, start, stop - start  # slot = position

    @property
    def recent_keys(self) -> Optional[mx.array]:
        """float16 keys of positions recent_start..offset-1 (None: no window)."""
        return self._recent_window()[0]

    @property
    def recent_values(self) -> Optional[mx.array]:
        return self._recent_window()[1]

    def _recent_window(self):
        # A decode step leaves the window's views of the buffers unmade: the decode
        # kernel reads the buffers themselves, and two slices a layer were host time
        # in every step. They are made when something asks for them.
        if self._window_end is not None:
            self._recent = self._buffered(self.recent_start, self._window_end)
            self._window_end = None
        return self._recent

    def _set_recent(self, keys: Optional[mx.array], values: Optional[mx.array]):
        self._recent, self._window_end = (keys, values), None

    def _holds_window(self) -> bool:
        """Whether float16 tokens are held, without making the views (`_recent_window`)."""
        return self._window_end is not None or self._recent[0] is not None

    def _slide_window(self, keys: mx.array, values: mx.array) -> int:
        """Append new tokens to the float16 window; return how many of its tokens to code
        now (positions coded.., none unless more than 2W are uncoded: `fp16_window`).

        A decode step writes its tokens into preallocated buffers of slots
        window_base.. (`_window_buffers`; the window is a view of them): one copy per
        array, where joining the window and the tokens made two, and the decode kernel
        reads the buffers as they lie. Longer blocks (prefill) join the arrays."""
        if keys.dtype != mx.float16:
            keys, values = keys.astype(mx.float16), values.astype(mx.float16)
        end = self.offset + keys.shape[2]
        if keys.shape[2] <= MAX_QUERY_TOKENS:
            buffers = self._window_buffers
            if buffers is None or end - self.window_base > buffers[0].shape[2]:
                buffers = self._new_window_buffers(keys)
            at, stop = self.offset - self.window_base, end - self.window_base
            buffers[0][:, :, at:stop] = keys
            buffers[1][:, :, at:stop] = values
            self.recent_start, self._window_end = self.coded, end
        else:
            old_keys, old_values = self._recent_window()
            self._window_buffers = None
            if old_keys is not None:
                held = self.coded - self.recent_start
                if held:
                    old_keys, old_values = old_keys[:, :, held:], old_values[:, :, held:]
                keys = mx.concatenate([old_keys, keys], axis=2)
                values = mx.concatenate([old_values, values], axis=2)
            self._set_recent(keys, values)
            self.recent_start = self.coded
        return window_flush(end - self.coded, self.fp16_window)

    def _new_window_buffers(self, keys: mx.array):
        """Buffers for the float16 window from slot `coded` on, holding its uncoded
        tokens: 2W + 64 slots, so that they are made anew at most once every 64 decode
        steps (they start with at most 2W tokens; coding moves `coded`, not them)."""
        B, n_kv_heads, _, D = keys.shape
        shape = (B, n_kv_heads, 2 * self.fp16_window + 64, D)
        buffers = (mx.zeros(shape, mx.float16), mx.zeros(shape, mx.float16))
        live = self.offset - self.coded
        if live > 0:
            held = self.coded - self.recent_start
            buffers[0][:, :, :live] = self.recent_keys[:, :, held:]
            buffers[1][:, :, :live] = self.recent_values[:, :, held:]
        self._window_buffers, self.window_base = buffers, self.coded
        return buffers

    def _buffered(self, start: int, stop: int):
        """Views of the window buffers' float16 keys and values of positions [start, stop)."""
        a, b = start - self.window_base, stop - self.window_base
        return self._window_buffers[0][:, :, a:b], self._window_buffers[1][:, :, a:b]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Store the new tokens: quantized, or with a window in float16 (coding a block
        once more than 2W are uncoded); return the packed codes (`_compressed`)."""
        S = keys.shape[2]
        new_keys, new_values, n = keys, values, S
        if self.fp16_window:
            n = self._slide_window(keys, values)
            if n:  # code the window's first n tokens
                new_keys, new_values = self.recent_keys, self.recent_values
        self.offset += S
        if n == 0:
            if self.head_dim is None:
                self._setup(keys.shape[-1], values.shape[-1])
            return self._compressed()
        self._store(*self._quantize_pieces(new_keys, new_values, self.coded, n))
        return self._compressed()

    def _fetch(self, dtype):
        # One compiled call over the whole buffers (shapes change only as they grow): a
        # decode step builds a few ops here, not dozens, for arrays that our attention
        # dispatch never evaluates.
        if self.coded:
            k, v = self.coded_keys_values(dtype, rotated=False)
        if self.coded == self.offset:
            return k, v
        held = self.coded - self.recent_start
        tail_k = self.recent_keys[:, :, held:].astype(dtype)
        tail_v = self.recent_values[:, :, held:].astype(dtype)
        if not self.coded:
            return tail_k, tail_v
        return mx.concatenate([k, tail_k], axis=2), mx.concatenate([v, tail_v], axis=2)

    def window_layout(self):
        """For `windowed_attention`: (codes held, first slot of the float16 buffer,
        slots, per-row padding [1], per-row first float16 slot read [1]); slot = position."""
        return self.coded, self.recent_start, self.offset, _ZERO, mx.array([self.recent_start])

    def coded_keys_values(self, dtype=mx.float32, rotated: bool = True):
        """Keys and values of the coded context (key means added back), in the rotated
        domain or (`rotated=False`) the model's.

        The whole allocated buffer is dequantized and then sliced, so the compiled
        dequantizer sees a new shape only when the buffer grows (every `step` tokens),
        not at every decoded token."""
        pk, kn, pv, vn = self._buffers()
        segments = self._segment_ids()
        k, v = self._dequantized(pk, kn, segments, pv, vn, not rotated, dtype, self.coded)
        return k[:, :, : self.coded], v[:, :, : self.coded]

    def read_context(self, dtype) -> tuple:
        """On a GPU, the keys and values every query of an update reads, in the model's
        domain: the codes of [0, recent_start) dequantized, then the float16 window of
        [recent_start, offset), from one launch (`fused_dequantize` writes both: no
        join of two arrays, and the tokens this update coded are read from their
        float16 copies, not dequantized too)."""
        pk, kn, pv, vn = self._buffers()
        window = (self.recent_keys, self.recent_values)
        segments = self._segment_ids()
        return self._dequantized(pk, kn, segments, pv, vn, True, dtype, self.recent_start, window)

    def _segment_ids(self) -> mx.array:
        """Key-mean segment of every slot of the allocated buffer (slot = position)."""
        size = self.packed_keys.shape[2]
        if self._segments is None or self._segments.size != size:
            self._segments = key_mean_segments(0, size, self.max_segment)
        return self._segments

    @property
    def n_kv_heads(self) -> int:
        return (self.packed_keys if self.packed_keys is not None else self.recent_keys).shape[1]

    def is_ring(self) -> bool:
        return False

    def kernel_view(self) -> KernelView:
        """What the fused decode kernel reads (slot = position): the whole allocated
        buffers, no copies, and the float16 window."""
        B = self.packed_keys.shape[0]
        first, window = self.offset, (None, None)
        if self._window_buffers is not None:  # read in place, from slot window_base
            first, window = self.window_base, self._window_buffers
        elif self.fp16_window and self.recent_keys is not None:
            first, window = self.recent_start, (self.recent_keys, self.recent_values)
        # (Positional: keywords make a NamedTuple ~2x slower, and every layer asks.)
        return KernelView(
            self.packed_keys,
            self.key_norms,
            self.packed_values,
            self.value_norms,
            None,  # segments
            self.coded,
            self.offset,  # slots
            first,
            *window,
            (0, self.recent_start) * B,  # rows
        )

    # ---- the cache interface ----

    def size(self):
        return self.offset

    def empty(self):
        return self.offset == 0

    def is_trimmable(self):
        return True

    def trim(self, n):
        """Drop the last n tokens. With a window, positions already coded stay coded
        (their float16 copy is gone), so until new tokens arrive fewer recent
        positions may be float16 than in a cache filled afresh."""
        n = min(self.offset, n)
        self.offset -= n
        self.coded = min(self.coded, self.offset)
        if self._holds_window():
            keep = self.offset - self.recent_start
            if keep <= 0:
                self._set_recent(None, None)
                self.recent_start = self.coded
                self._window_buffers = None
            elif self._window_buffers is not None:  # the window stays in its slots
                self._window_end = self.offset
            else:
                self._set_recent(self.recent_keys[:, :, :keep], self.recent_values[:, :, :keep])
        self._keep_key_means()
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        return _causal_mask_for(N, self.offset, window_size, return_array)

    def _extended(self) -> bool:
        """Whether `state` uses the 8-array layout (key scaling or a window)."""
        return bool(self.fp16_window or self.key_scaling)

    @property
    def state(self):
        if self.offset == 0 or (self.packed_keys is None and self.recent_keys is None):
            return []
        if self.packed_keys is not None:
            buffers = [x[:, :, : self.coded] for x in self._buffers()]
        else:
            buffers = [_EMPTY] * 4
        if not self._extended():
            return tuple(buffers + ([] if self.key_means is None else [self.key_means]))
        extra = [_EMPTY if x is None else x for x in (self.key_means, self.key_scales)]
        tail = [_EMPTY, _EMPTY]
        if self.coded < self.offset:
            held = self.coded - self.recent_start
            tail = [self.recent_keys[:, :, held:], self.recent_values[:, :, held:]]
        return tuple(buffers + extra + tail)

    @state.setter
    def state(self, v):
        self._segments = None
        self._set_recent(None, None)
        self._window_buffers = None
        if not v:
            self.packed_keys = self.key_norms = self.packed_values = self.value_norms = None
            self.key_means = self.key_scales = None
            self.coded = self.recent_start = 0
            return
        v = [None if x.size == 0 else x for x in v]
        self.packed_keys, self.key_norms, self.packed_values, self.value_norms = v[:4]
        self.coded = self.recent_start = 0 if v[0] is None else v[0].shape[2]
        self.key_means = v[4] if len(v) > 4 else None
        self.key_scales = v[5] if len(v) > 5 else None
        if len(v) > 6 and v[6] is not None:
            self._set_recent(v[6], v[7])

    @property
    def meta_state(self):
        return tuple(map(str, (self.offset, *self._codec_meta(), self.fp16_window)))

    @meta_state.setter
    def meta_state(self, v):
        offset, *codec = map(int, v)
        window = codec.pop(7) if len(codec) > 7 else 0
        self._set_codec_meta(*codec)
        self.fp16_window = window
        self.offset = offset

    @property
    def nbytes(self):
        """Bytes actually held: packed codes, norms (preallocated blocks included), the
        key means and scales, and the float16 window."""
        held = [] if self.recent_keys is None else [self.recent_keys, self.recent_values]
        if self._window_buffers is not None:
            held = list(self._window_buffers)
        codes = [] if self.packed_keys is None else self._stored_arrays()
        return sum(x.nbytes for x in codes + held)

    def __deepcopy__(self, memo):
        copy = TurboQuantKVCache.from_state(tuple(mx.array(x) for x in self.state), self.meta_state)
        return copy


class RotatingTurboQuantKVCache(TurboQuantCodec, RotatingKVCache):
    """A bounded TurboQuant cache: the ring buffer of `RotatingKVCache` (the first `keep`
    tokens plus the most recent ones, at most `max_size`) holding packed codes, norms
    and key-mean segment ids instead of FP16 keys and values.

    New key-mean segments are opened only while the ring has not dropped anything
    (segment starts up to `max_size // 2`), so each mean is computed from tokens that
    are all still held; later tokens share the last mean.
    """

    def __init__(
        self,
        max_size: Optional[int] = None,
        keep: int = 0,
        step: int = 256,
        key_bits: int = 3,
        value_bits: int = 3,
        seed: int = 0,
        layer_idx: int = 0,
        key_centering: bool = True,
        key_scaling: bool = False,
    ):
        RotatingKVCache.__init__(self, max_size, keep, step)
        self._init_codec(key_bits, value_bits, seed, layer_idx, key_centering, key_scaling)

    @property
    def max_segment(self) -> int:
        if not self.key_centering or self.max_size is None:
            return 0
        return key_mean_segment(max(self.max_size // 2, 1))  # capped at KEY_MEAN_MAX_SEGMENT

    def _stored_key_rows(self, start, stop):
        # Only called while nothing has been dropped: ring slot = position.
        packed, norms = self.keys[0], self.keys[1]
        return packed[:, :, start:stop], norms[:, :, start:stop, 0], 0, 0, stop - start

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        first = self.offset
        pk, kn, pv, vn = self._quantize(keys, values)
        segments = key_mean_segments(first, first + keys.shape[2], self.max_segment)
        B = keys.shape[0]
        segments = mx.broadcast_to(
            segments.astype(mx.uint8)[None, None, :, None], (B, 1, segments.size, 1)
        )
        RotatingKVCache.update_and_fetch(self, (pk, kn[..., None], segments), (pv, vn[..., None]))
        return self.keys, self.values

    @property
    def n_kv_heads(self) -> int:
        return self.keys[0].shape[1]

    def is_ring(self) -> bool:
        return True

    def kernel_view(self) -> KernelView:
        """The ring's buffers (slot order does not matter to attention) with the segment
        id of every slot (batch 0: all sequences share positions)."""
        (pk, kn, segments), (pv, vn) = self.keys, self.values
        filled = min(self.offset, pk.shape[2])
        return KernelView(
            pk, kn, pv, vn, segments, filled, filled, filled, None, None, (0, 0) * pk.shape[0]
        )

    def coded_keys_values(self, dtype=mx.float32, rotated: bool = True):
        (pk, kn, segments), (pv, vn) = self._filled()
        segments = segments[0, 0, :, 0].astype(mx.int32)
        inverse = not rotated
        return self._dequantized(
            pk, kn[..., 0], segments, pv, vn[..., 0], inverse, dtype, pk.shape[2]
        )

    def trim(self, n):
        n = RotatingKVCache.trim(self, n)
        self._keep_key_means()
        return n

    @property
    def state(self):
        if self.keys is None:
            return []
        (pk, kn, segments), (pv, vn) = self._filled()
        extra = tuple(x for x in (self.key_means, self.key_scales) if x is not None)
        return (pk, kn, segments, pv, vn) + extra

    @state.setter
    def state(self, v):
        if not v:
            self.keys = self.values = self.key_means = self.key_scales = None
            return
        pk, kn, segments, pv, vn = v[:5]
        self.key_means = v[5] if len(v) > 5 else None
        self.key_scales = v[6] if len(v) > 6 else None
        self.keys, self.values = (pk, kn, segments), (pv, vn)

    @property
    def meta_state(self):
        ring = (self.keep, self.max_size, self.step, self.offset, self._idx)
        return tuple(map(str, (*ring, *self._codec_meta())))

    @meta_state.setter
    def meta_state(self, v):
        keep, max_size, step, offset, idx, *codec = map(int, v)
        self._set_codec_meta(*codec)
        self.keep, self.max_size, self.step, self.offset, self._idx = (
            keep,
            max_size,
            step,
            offset,
            idx,
        )

    @property
    def nbytes(self):
        if self.keys is None:
            return 0
        extra = sum(x.nbytes for x in (self.key_means, self.key_scales) if x is not None)
        return RotatingKVCache.nbytes.fget(self) + extra

    def __deepcopy__(self, memo):
        # The whole ring (not `state`, which drops unfilled slots), in `state`'s layout.
        held = () if self.keys is None else (*self.keys, *self.values)
        extra = tuple(x for x in (self.key_means, self.key_scales) if x is not None)
        arrays = tuple(mx.array(x) for x in (*held, *extra))
        return RotatingTurboQuantKVCache.from_state(arrays, self.meta_state)


def resolve_turbo_bits(turbo_kv_bits=None, turbo_key_bits=None, turbo_value_bits=None):
    """(key_bits, value_bits) from the user's settings: `turbo_kv_bits` (2, 3 or 4) sets
    both, `turbo_key_bits` / `turbo_value_bits` (1-8) override either."""
    if turbo_kv_bits is not None and (
        isinstance(turbo_kv_bits, bool) or turbo_kv_bits not in (2, 3, 4)
    ):
        raise ValueError(f"turbo_kv_bits must be 2, 3 or 4 (got {turbo_kv_bits!r}).")
    key_bits = turbo_key_bits if turbo_key_bits is not None else turbo_kv_bits
    value_bits = turbo_value_bits if turbo_value_bits is not None else turbo_kv_bits
    if key_bits is None or value_bits is None:
        raise ValueError(
            "Set turbo_kv_bits (--turbo-kv-bits 2/3/4), or both turbo_key_bits and "
            "turbo_value_bits."
        )
    return check_turbo_bits("turbo_key_bits", key_bits), check_turbo_bits(
        "turbo_value_bits", value_bits
    )


def to_turbo_quantized_cache(
    cache,
    model,
    turbo_kv_bits=None,
    turbo_fp16_layers: int = 0,
    turbo_key_bits=None,
    turbo_value_bits=None,
    turbo_seed: int = 0,
    turbo_key_centering: bool = True,
    turbo_key_scaling: Optional[bool] = None,
    turbo_fp16_window: Optional[int] = None,
):
    """A new cache list with the attention layers' KV caches as TurboQuantKVCache.

    Only plain per-head K/V caches are converted (filled ones are compressed as they
    are). SSM/linear-attention state (`ArraysCache`) is kept exactly; the first and last
    `turbo_fp16_layers` attention layers stay FP16; sliding-window (rotating) caches
    become `RotatingTurboQuantKVCache`s with the same window. `turbo_key_scaling` and
    `turbo_fp16_window` are `TurboQuantKVCache`'s `key_scaling` and `fp16_window`
    (None: key scaling when key centering is on, a window of `DEFAULT_FP16_WINDOW`); the
    window applies to unbounded layers only (a ring is short already). Anything else - latent (MLA) caches, affine-quantized
    caches, unknown classes - is a ValueError naming the layer, its cache class and the
    model type. Validation happens before anything is converted, and the input list is
    not modified.
    """
    from .cache import ArraysCache, KVCache, RotatingKVCache

    key_bits, value_bits = resolve_turbo_bits(turbo_kv_bits, turbo_key_bits, turbo_value_bits)
    window = check_fp16_window(
        DEFAULT_FP16_WINDOW if turbo_fp16_window is None else turbo_fp16_window
    )
    if turbo_key_scaling is None:
        turbo_key_scaling = bool(turbo_key_centering)
    if turbo_key_scaling and not turbo_key_centering:
        raise ValueError(
            "turbo_key_scaling=True needs key centering: drop turbo_key_centering=False "
            "(--turbo-no-key-centering)."
        )
    model_type = getattr(model, "model_type", type(model).__name__)
    latent = getattr(getattr(model, "args", None), "kv_lora_rank", None)
    if latent:
        raise ValueError(
            f"Model type '{model_type}' uses multi-head latent attention (latent width "
            f"{latent}): its cache holds compressed latents, not per-head keys and values, "
            "and TurboQuant needs per-head keys and values. Run without --turbo-kv-bits, "
            "or use --kv-bits."
        )
    attention_layers = []
    for i, c in enumerate(cache):
        if type(c) in (KVCache, RotatingKVCache, TurboQuantKVCache, RotatingTurboQuantKVCache):
            attention_layers.append(i)
        elif isinstance(c, ArraysCache):
            continue
        else:
            hint = (
                " Use either --kv-bits or --turbo-kv-bits, not both."
                if type(c).__name__ == "QuantizedKVCache"
                else " Run without --turbo-kv-bits."
            )
            raise ValueError(
                f"Layer {i} of model type '{model_type}' uses a {type(c).__name__}, which "
                f"does not hold plain per-head keys and values; TurboQuant can only compress "
                f"KVCache layers.{hint}"
            )
    if not attention_layers:
        raise ValueError(
            f"Model type '{model_type}' has no attention KV cache to compress (its layers keep "
            f"recurrent {type(cache[0]).__name__} state). Run without --turbo-kv-bits."
        )
    n = turbo_fp16_layers
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or 2 * n >= len(attention_layers):
        raise ValueError(
            f"turbo_fp16_layers must be an integer from 0 to {(len(attention_layers) - 1) // 2} "
            f"for this model ({len(attention_layers)} attention layers; the first and last N "
            f"stay FP16), got {n!r}."
        )
    fp16 = set(attention_layers[:n] + attention_layers[len(attention_layers) - n :])
    new_cache = list(cache)
    for i in attention_layers:
        c = cache[i]
        if i in fp16:
            continue
        if isinstance(c, TurboQuantCodec):
            have = (c.key_bits, c.value_bits, c.key_centering, c.key_scaling)
            want = (key_bits, value_bits, bool(turbo_key_centering), bool(turbo_key_scaling))
            if not c.is_ring():
                have, want = have + (c.fp16_window,), want + (window,)
            if have != want:
                raise ValueError(
                    f"Layer {i} already holds a TurboQuant cache with settings (key bits, "
                    f"value bits, key centering, key scaling[, fp16 window]) {have}, not the "
                    f"requested {want}. Use matching --turbo-* flags or a fresh cache."
                )
        else:
            extra = {} if isinstance(c, RotatingKVCache) else {"fp16_window": window}
            new_cache[i] = c.to_turbo_quantized(
                key_bits,
                value_bits,
                turbo_seed,
                layer_idx=i,
                key_centering=turbo_key_centering,
                key_scaling=bool(turbo_key_scaling),
                **extra,
            )
    return new_cache


def _pad_axis2(x: mx.array, n: int) -> mx.array:
    """`x` with n zeros prepended along axis 2 (the token axis of the cache buffers)."""
    if n == 0:
        return x
    shape = list(x.shape)
    shape[2] = n
    return mx.concatenate([mx.zeros(shape, x.dtype), x], axis=2)


class BatchTurboQuantKVCache(TurboQuantCodec, _LeftPaddedBatch, _BaseCache):
    """TurboQuant codes of several sequences decoded together (continuous batching):
    the batch counterpart of `TurboQuantKVCache`, as `BatchKVCache` is of `KVCache`.

    Rows are left-padded in one [B, n_kv_heads, T, ...] buffer of packed codes and norms
    (row b's position j in slot pad_b + j; padding slots hold zeros and are masked).
    Causal key centering and key scaling depend on each sequence's own positions, so
    the batch keeps a key-mean segment id per slot and row (`segments`, int32 [B, T]; 0
    on padding), the means and scales per row (`key_means` / `key_scales`,
    [B, n_kv_heads, n, head_dim]: row b uses its first `segments_held_by[b] - 1`
    columns) and opens a segment for one row when that row's coded position reaches
    it, from that row's stored codes, exactly as the row's own cache would.

    With `fp16_window` = W, row b holds codes of positions [0, coded_by[b]) and float16
    keys/values of the rest in `recent_keys` / `recent_values` [B, n_kv_heads, n_w,
    head_dim], which cover the last n_w slots (left-padded per row). New tokens join
    the float16 buffer; a row left with more than 2W uncoded tokens codes all but its
    newest W with its own segments, means and scales. Each row therefore holds the
    codes, means, scales and float16 tokens its sequence would hold decoded alone.

    Decode attention runs the fused kernels on a GPU (per-row padding and windows),
    the pure-MLX reference (`turboquant_attention`) elsewhere.
    """

    step = 256
    is_batch = True

    def __init__(
        self,
        left_padding: List[int],
        key_bits: int = 3,
        value_bits: int = 3,
        seed: int = 0,
        layer_idx: int = 0,
        key_centering: bool = True,
        key_scaling: bool = False,
        fp16_window: int = 0,
    ):
        self._init_codec(key_bits, value_bits, seed, layer_idx, key_centering, key_scaling)
        self.fp16_window = check_fp16_window(fp16_window)
        self._pad = [int(p) for p in left_padding]
        self._filled = max(self._pad, default=0)
        self.segments_held_by = [1] * len(self._pad)
        self.coded_by = [0] * len(self._pad)  # positions held as codes, per row
        self.recent_start_by = [0] * len(self._pad)  # first float16 position read, per row
        self.packed_keys = self.key_norms = self.packed_values = self.value_norms = None
        self.segments = None
        self.recent_keys = self.recent_values = None

    @property
    def n_kv_heads(self) -> int:
        return self.packed_keys.shape[1]

    def is_ring(self) -> bool:
        return False

    def _buffers(self):
        return [self.packed_keys, self.key_norms, self.packed_values, self.value_norms]

    def _zero_codes(self, B: int, n_kv_heads: int, T: int):
        """Zero code buffers (packed keys, key norms, packed values, value norms), T slots."""
        shape = (B, n_kv_heads, T)
        return [
            mx.zeros((*shape, packed_words(self.head_dim, self.key_bits)), dtype=mx.uint32),
            mx.zeros(shape, dtype=mx.float16),
            mx.zeros((*shape, packed_words(self.head_dim, self.value_bits)), dtype=mx.uint32),
            mx.zeros(shape, dtype=mx.float16),
        ]

    # ---- building, filtering, extending, extracting ----
    #
    # All four go through rows: dict(codes=[4 buffers], segs [1, T], means, scales,
    # held, coded, tail=(keys, values) float16 of positions coded.. or None), each row's
    # buffers T slots long and right-aligned (its newest token in the last slot).

    @classmethod
    def merge(cls, caches: List["TurboQuantKVCache"]) -> "BatchTurboQuantKVCache":
        """One batch from single-sequence `TurboQuantKVCache`s of one layer (same bits,
        seed, layer, key centering, key scaling and FP16 window), each after its own
        prefill."""
        for i, c in enumerate(caches):
            if type(c) is not TurboQuantKVCache:
                raise ValueError(
                    f"BatchTurboQuantKVCache.merge takes TurboQuantKVCache layers; cache {i} "
                    f"is a {type(c).__name__}."
                )
        settings = _batch_settings(caches[0])
        for i, c in enumerate(caches):
            if _batch_settings(c) != settings:
                raise ValueError(
                    "Cannot batch TurboQuant caches with different settings: cache "
                    f"{i} has (key bits, value bits, seed, layer, centering, scaling, fp16 "
                    f"window) {_batch_settings(c)}, cache 0 {settings}."
                )
            held = c.packed_keys if c.packed_keys is not None else c.recent_keys
            if not c.empty() and held.shape[0] != 1:
                raise ValueError(
                    f"merge takes single-sequence caches; cache {i} has batch size "
                    f"{held.shape[0]}."
                )
        lengths = [c.offset for c in caches]
        T = max(lengths)
        batch = cls([T - n for n in lengths], *settings)
        batch._filled = T
        if T == 0:
            return batch
        ref = caches[lengths.index(T)]
        batch.head_dim = ref.head_dim
        batch._derive()
        H = ref.n_kv_heads
        batch._set_rows([batch._row_of(c, T, H) for c in caches], T)
        return batch

    def _row_of(self, c: "TurboQuantKVCache", T: int, H: int) -> dict:
        """A single cache as a row of T slots."""
        n, coded = c.offset, c.coded
        codes = self._zero_codes(1, H, T)
        if coded:  # padding, codes, then zeros where the window tokens sit
            codes = [
                mx.concatenate([z[:, :, : T - n], x[:, :, :coded], z[:, :, T - n + coded :]], 2)
                for z, x in zip(codes, c._buffers())
            ]
        segs = mx.concatenate(
            [
                mx.zeros((T - n,), mx.int32),
                key_mean_segments(0, coded, self.max_segment),
                mx.zeros((n - coded,), mx.int32),
            ]
        )[None]
        tail = None
        if coded < n:
            held = coded - c.recent_start
            tail = (c.recent_keys[:, :, held:], c.recent_values[:, :, held:])
        return dict(
            codes=codes,
            segs=segs,
            means=c.key_means,
            scales=c.key_scales,
            held=c.segments_held if n else 1,
            coded=coded,
            tail=tail,
        )

    def _set_rows(self, rows: List[dict], T: int):
        """Stack rows of T slots along the batch (`_pad` and `_filled` set by the caller)."""
        self.packed_keys, self.key_norms, self.packed_values, self.value_norms = (
            mx.concatenate([r["codes"][j] for r in rows], axis=0) for j in range(4)
        )
        self.segments = mx.concatenate([r["segs"] for r in rows], axis=0)
        self.segments_held_by = [r["held"] for r in rows]
        self.coded_by = [r["coded"] for r in rows]
        self.recent_start_by = list(self.coded_by)
        n = max(self.segments_held_by) - 1
        self.key_means = self._stack_columns([r["means"] for r in rows], n)
        self.key_scales = None
        if self.key_scaling:
            self.key_scales = self._stack_columns([r["scales"] for r in rows], n)
        self.recent_keys = self.recent_values = None
        n_w = max((0 if r["tail"] is None else r["tail"][0].shape[2]) for r in rows)
        if n_w:
            H, d = self.packed_keys.shape[1], self.head_dim
            none = mx.zeros((1, H, 0, d), mx.float16)
            tails = [(none, none) if r["tail"] is None else r["tail"] for r in rows]
            self.recent_keys, self.recent_values = (
                mx.concatenate([_pad_axis2(t[j], n_w - t[j].shape[2]) for t in tails], axis=0)
                for j in range(2)
            )

    def _stack_columns(self, per_row: List[Optional[mx.array]], n: int):
        """Per-row [1, H, m, d] means or scales (or None) as [B, H, n, d], zero-filled."""
        if n == 0:
            return None
        H, d = self.packed_keys.shape[1], self.head_dim
        out = []
        for m in per_row:
            m = mx.zeros((1, H, 0, d), mx.float16) if m is None else m[:, :, :n]
            if m.shape[2] < n:
                m = mx.concatenate([m, mx.zeros((1, H, n - m.shape[2], d), mx.float16)], axis=2)
            out.append(m)
        return mx.concatenate(out, axis=0)

    def _row(self, i: int, cut: int = 0) -> dict:
        """Row i as a row of its slots from `cut` on (nothing it holds is dropped)."""
        T = self._filled
        n, coded = T - self._pad[i], self.coded_by[i]
        tail = None
        if coded < n:
            w = self.recent_keys.shape[2] - (n - coded)
            tail = (self.recent_keys[i : i + 1, :, w:], self.recent_values[i : i + 1, :, w:])
        pick = lambda x: None if x is None else x[i : i + 1]  # noqa: E731
        return dict(
            codes=[x[i : i + 1, :, cut:T] for x in self._buffers()],
            segs=self.segments[i : i + 1, cut:T],
            means=pick(self.key_means),
            scales=pick(self.key_scales),
            held=self.segments_held_by[i],
            coded=coded,
            tail=tail,
        )

    def _pad_row(self, row: dict, extra: int) -> dict:
        """`row` with `extra` padding slots prepended."""
        row = dict(row)
        row["codes"] = [_pad_axis2(x, extra) for x in row["codes"]]
        row["segs"] = mx.concatenate([mx.zeros((1, extra), mx.int32), row["segs"]], axis=1)
        return row

    def filter(self, keep: List[int]):
        """Keep only the sequences at indices `keep` (in that order), in place; padding
        that every remaining row shares is dropped."""
        from .cache import _check_batch_index

        keep = _check_batch_index(keep, self.batch_size)
        pads = [self._pad[i] for i in keep]
        if self.packed_keys is None:
            self._pad = pads
            self.segments_held_by = [self.segments_held_by[i] for i in keep]
            self.coded_by = [self.coded_by[i] for i in keep]
            self.recent_start_by = [self.recent_start_by[i] for i in keep]
            self._filled = max(pads)
            return
        cut = min(pads)
        rows = [self._row(i, cut) for i in keep]
        self._filled -= cut
        self._pad = [p - cut for p in pads]
        self._set_rows(rows, self._filled)

    def extend(self, other: "BatchTurboQuantKVCache"):
        """Append the sequences of `other` to this batch, in place; the shorter side gets
        left padding so that both end at the same slot."""
        if not isinstance(other, BatchTurboQuantKVCache):
            raise ValueError(f"extend takes a BatchTurboQuantKVCache, got {type(other).__name__}.")
        if _batch_settings(other) != _batch_settings(self):
            raise ValueError(
                f"Cannot batch TurboQuant caches with different settings: {_batch_settings(other)} "
                f"vs {_batch_settings(self)} (key bits, value bits, seed, layer, centering, "
                "scaling, fp16 window)."
            )
        T = max(self._filled, other._filled)
        pads = [p + T - self._filled for p in self._pad]
        pads += [p + T - other._filled for p in other._pad]
        ref = self if self.packed_keys is not None else other
        if ref.packed_keys is None:  # nothing stored on either side
            self._pad, self._filled = pads, T
            self.segments_held_by += other.segments_held_by
            self.coded_by += other.coded_by
            self.recent_start_by += other.recent_start_by
            return
        if self.head_dim is None:
            self.head_dim = ref.head_dim
            self._derive()
        H = ref.packed_keys.shape[1]
        rows = []
        for c in (self, other):
            for i in range(c.batch_size):
                if c.packed_keys is None:
                    rows.append(self._row_of(TurboQuantKVCache(*_batch_settings(self)), T, H))
                else:
                    rows.append(self._pad_row(c._row(i), T - c._filled))
        self._pad, self._filled = pads, T
        self._set_rows(rows, T)

    def extract(self, i: int) -> "TurboQuantKVCache":
        """Sequence `i` as a single-sequence TurboQuantKVCache (a copy): what the same
        tokens would have left in a cache of their own (codes, means, scales, window)."""
        from .cache import _check_batch_index

        _check_batch_index([i], self.batch_size)
        n = self.lengths[i]
        cache = TurboQuantKVCache(*_batch_settings(self))
        if self.packed_keys is None or n == 0:
            return cache
        row = self._row(i, self._pad[i])
        coded, held = row["coded"], row["held"]
        state = [x[:, :, :coded] if coded else _EMPTY for x in row["codes"]]
        columns = [row["means"], row["scales"]]
        state += [_EMPTY if x is None or held == 1 else x[:, :, : held - 1] for x in columns]
        state += [_EMPTY, _EMPTY] if row["tail"] is None else list(row["tail"])
        if not cache._extended():
            state = state[:4] + ([] if held == 1 else [state[4]])
        settings = _batch_settings(self)
        meta = (n, *settings[:4], self.head_dim, *settings[4:])
        meta = tuple(str(int(x)) for x in meta)
        return TurboQuantKVCache.from_state(tuple(mx.array(x) for x in state), meta)

    # ---- decoding ----

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Store new tokens (with a window: they join the rows' float16 buffer and a row
        left with more than 2W uncoded tokens codes all but its newest W, as its own
        cache would; without: each is quantized); return the packed codes."""
        B, n_kv_heads, S, d = keys.shape
        if B != self.batch_size:
            raise ValueError(f"This batch cache holds {self.batch_size} sequences, got {B}.")
        if self.head_dim is None:
            self._setup(d, values.shape[-1])
        if not self.fp16_window:
            for t in range(S):
                self._append(keys[:, :, t : t + 1], values[:, :, t : t + 1])
            return self._compressed()
        # What this update's queries read in float16: from each row's coded count on.
        self.recent_start_by = list(self.coded_by)
        self._drop_read_window()
        self._grow(B, n_kv_heads, S)
        k16, v16 = keys.astype(mx.float16), values.astype(mx.float16)
        if self.recent_keys is not None:
            k16 = mx.concatenate([self.recent_keys, k16], axis=2)
            v16 = mx.concatenate([self.recent_values, v16], axis=2)
        self.recent_keys, self.recent_values = k16, v16
        self._filled += S
        for b, (n, c) in enumerate(zip(self.lengths, self.coded_by)):
            flush = window_flush(n - c, self.fp16_window)
            if flush:
                self._code_row(b, flush)
        return self._compressed()

    def _drop_read_window(self):
        """Drop float16 slots before every row's first window token (already coded)."""
        if self.recent_keys is None:
            return
        first = min(p + c for p, c in zip(self._pad, self.coded_by))
        cut = first - (self._filled - self.recent_keys.shape[2])
        if cut > 0:
            self.recent_keys = self.recent_keys[:, :, cut:]
            self.recent_values = self.recent_values[:, :, cut:]

    def _code_row(self, b: int, n: int):
        """Code row b's n oldest float16 tokens (positions coded_by[b]..), a key-mean
        segment piece at a time with the row's own means and scales, as
        `TurboQuantCodec._quantize` does for one sequence."""
        pad, coded = self._pad[b], self.coded_by[b]
        w = pad + coded - (self._filled - self.recent_keys.shape[2])
        backend = self.kernel_backend()
        for s, start, end in segment_pieces(coded, coded + n, self.max_segment):
            if s == self.segments_held_by[b]:
                self._open_segment(b, s)
            mean = scale = None
            if s > 0:
                column = lambda x: x[b : b + 1, :, s - 1 : s].astype(mx.float32)  # noqa: E731
                mean = inverse_rotate(column(self.key_means), self.key_signs)
                if self.key_scales is not None:
                    scale = column(self.key_scales)
            piece = slice(w + start - coded, w + end - coded)
            keys = self.recent_keys[b : b + 1, :, piece]
            values = self.recent_values[b : b + 1, :, piece]
            pk, kn, pv, vn = self._code(keys, values, mean, scale, backend, ("row", b, s))
            slots = slice(pad + start, pad + end)
            for buf, x in zip(self._buffers(), (pk, kn.astype(mx.float16), pv, vn)):
                buf[b : b + 1, :, slots] = x
            self.segments[b : b + 1, slots] = s
            self.coded_by[b] = end

    def _append(self, keys: mx.array, values: mx.array):
        """Code one new token of every row (no window), at the batch's newest slot."""
        B, n_kv_heads, _, d = keys.shape
        self._grow(B, n_kv_heads)
        self._filled += 1
        slot = self._filled - 1
        segs = [key_mean_segment(c, self.max_segment) for c in self.coded_by]
        for b, s in enumerate(segs):
            if s == self.segments_held_by[b]:
                self._open_segment(b, s)
        pk, kn, pv, vn = self._quantize_rows(keys, values, segs)
        new = [pk, kn.astype(mx.float16), pv, vn.astype(mx.float16)]
        for buf, x in zip(self._buffers(), new):
            buf[:, :, slot : slot + 1] = x
        self.segments[:, slot : slot + 1] = mx.array(segs, dtype=mx.int32)[:, None]
        self.coded_by = [c + 1 for c in self.coded_by]

    def _quantize_rows(self, keys: mx.array, values: mx.array, segs: List[int]):
        """Codes of one token per row, keys centered (and scaled) with each row's segment
        `segs[b]`, as `TurboQuantCodec._quantize` does for one sequence."""
        mean = scale = None
        if self.key_means is not None and any(segs):
            mean = self._derived(("mean", tuple(segs)), lambda: self._row_columns(segs, False))
            if self.key_scales is not None:
                scale = self._derived(("scale", tuple(segs)), lambda: self._row_columns(segs, True))
        return self._code(keys, values, mean, scale, self.kernel_backend(), ("fused", tuple(segs)))

    def _row_columns(self, segs: List[int], scales: bool) -> mx.array:
        """Per row, μ (Πᵀ M, 0 in segment 0) or σ (1 in segment 0) of its segment
        `segs[b]`, [B, n_kv_heads, 1, head_dim] float32 in the model's domain."""
        idx = mx.array(segs, dtype=mx.int32)[:, None, None, None]
        if scales:
            return mx.take_along_axis(self.key_scales_with_one(), idx, axis=2).astype(mx.float32)
        rotated = mx.take_along_axis(self.key_means_with_zero(), idx, axis=2)
        return inverse_rotate(rotated.astype(mx.float32), self.key_signs)

    def _open_segment(self, b: int, s: int):
        """M_s (and σ_s) of row b (see `TurboQuantCodec`) from the row's stored codes of
        [b_{s-1}, b_s)."""
        lo, hi, p = segment_start(s - 1), segment_start(s), self._pad[b]
        H = self.packed_keys.shape[1]
        source = (self.packed_keys, self.key_norms, b * H, p + lo, hi - lo)
        prev = (self.key_means, self.key_scales, b * H, s - 2) if s > 1 else None
        stats = self._open_stats([source], (1, H), prev, hi)
        self.key_means = self._with_column(self.key_means, b, s, stats.mean)
        if stats.scale is not None:
            self.key_scales = self._with_column(self.key_scales, b, s, stats.scale)
        self.segments_held_by[b] += 1

    def _with_column(self, columns, b: int, s: int, x: mx.array) -> mx.array:
        """`columns` ([B, H, n, d] or None) widened to s columns, row b's column s-1 = x."""
        if columns is None or columns.shape[2] < s:
            B, H = self.batch_size, self.packed_keys.shape[1]
            have = 0 if columns is None else columns.shape[2]
            wider = mx.zeros((B, H, s - have, self.head_dim), mx.float16)
            columns = wider if columns is None else mx.concatenate([columns, wider], axis=2)
        columns[b : b + 1, :, s - 1 : s] = x
        return columns

    def _grow(self, B: int, n_kv_heads: int, S: int = 1):
        if self.packed_keys is not None and self._filled + S <= self.packed_keys.shape[2]:
            return
        n_new = (self.step + S - 1) // self.step * self.step
        new = self._zero_codes(B, n_kv_heads, n_new)
        new_segments = mx.zeros((B, n_new), mx.int32)
        if self.packed_keys is None:
            # Nothing stored yet: the padding slots (if any) come first.
            new = [_pad_axis2(x, self._filled) for x in new]
            new_segments = mx.zeros((B, self._filled + n_new), mx.int32)
        else:
            old = [x[:, :, : self._filled] for x in self._buffers()]
            new = [mx.concatenate([o, n], axis=2) for o, n in zip(old, new)]
            new_segments = mx.concatenate([self.segments[:, : self._filled], new_segments], 1)
        self.packed_keys, self.key_norms, self.packed_values, self.value_norms = new
        self.segments = new_segments

    def coded_keys_values(self, dtype=mx.float32, rotated: bool = True):
        """Keys (each row's key means and scales applied) and values of every slot,
        [B, n_kv_heads, filled, head_dim], rotated domain or (`rotated=False`) the
        model's; padding and float16-window slots come out as whatever their zero codes
        give and are masked."""
        pk, kn, pv, vn = self._buffers()
        inverse = not rotated
        k, v = self._dequantized(pk, kn, self.segments, pv, vn, inverse, dtype, self._filled)
        return k[:, :, : self._filled], v[:, :, : self._filled]

    def window_layout(self):
        """For `windowed_attention` (see `TurboQuantKVCache.window_layout`), per row."""
        coded = max(p + c for p, c in zip(self._pad, self.coded_by))
        first = self._filled - self.recent_keys.shape[2]
        start = [p + r for p, r in zip(self._pad, self.recent_start_by)]
        return coded, first, self._filled, self.left_padding, mx.array(start, dtype=mx.int32)

    def _fetch(self, dtype):
        """Lazily dequantized keys and values of every slot, model domain (float16
        window tokens where rows hold them); never computed with our attention."""
        k, v = self.coded_keys_values(dtype, rotated=False)
        if self.recent_keys is None:
            return k, v
        n_w = self.recent_keys.shape[2]
        slots = mx.arange(self._filled)[None, None, :, None]
        window = mx.array([p + c for p, c in zip(self._pad, self.coded_by)])
        window = slots >= window[:, None, None, None]
        rk = _pad_axis2(self.recent_keys, self._filled - n_w).astype(dtype)
        rv = _pad_axis2(self.recent_values, self._filled - n_w).astype(dtype)
        return mx.where(window, rk, k), mx.where(window, rv, v)

    def kernel_view(self) -> KernelView:
        """Every row's codes and window in the batch's slots (see `window_layout`)."""
        coded = max(p + c for p, c in zip(self._pad, self.coded_by))
        window = self.recent_keys is not None
        first = self._filled - self.recent_keys.shape[2] if window else self._filled
        return KernelView(
            *self._buffers(),
            segments=None,
            coded=coded,
            slots=self._filled,
            first=first,
            window_keys=self.recent_keys,
            window_values=self.recent_values,
            rows=tuple(x for p, r in zip(self._pad, self.recent_start_by) for x in (p, p + r)),
        )

    # ---- the cache interface ----

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        from .cache import batch_mask

        return batch_mask(N, self._filled, self.left_padding, window_size)

    def size(self):
        return self._filled

    def empty(self):
        return self.packed_keys is None or all(n == 0 for n in self.lengths)

    def _held(self):
        extra = (self.key_means, self.key_scales, self.recent_keys, self.recent_values)
        return [x for x in extra if x is not None]

    @property
    def state(self):
        if self.packed_keys is None:
            return []
        bufs = [x[:, :, : self._filled] for x in self._buffers()]
        bufs.append(self.segments[:, : self._filled])
        return tuple(bufs + self._held())

    @property
    def nbytes(self):
        if self.packed_keys is None:
            return 0
        return sum(x.nbytes for x in self._buffers() + [self.segments] + self._held())


def _batch_settings(c):
    """What must agree for TurboQuant caches to share a batch, in the order of
    `TurboQuantKVCache`'s arguments (for a single or a batch cache)."""
    return (
        c.key_bits,
        c.value_bits,
        c.seed,
        c.layer_idx,
        c.key_centering,
        c.key_scaling,
        c.fp16_window,
    )
