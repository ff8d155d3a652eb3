"""TurboQuantKVCache: keys and values kept only as packed Lloyd-Max codes plus one
norm per vector (arXiv 2504.19874, TurboQuant_mse).

Per token and KV head the cache holds `packed_words(head_dim, bits)` uint32 words of
codes and one float16 norm, for keys and values separately: at head_dim 128 and 3 bits
that is 48 + 2 bytes instead of 256 bytes of FP16. There is no FP16 shadow copy: the
packed codes and norms are the only copy of the context. With `fp16_window` = W the last
W tokens are held in float16 instead (their only copy), each quantized as it slides out.

Keys are quantized as residuals from a causal running key mean (see `key_mean_segment`):
keys carry a large per-channel offset that costs quantization levels without carrying
information, while values compress well as they are.

Attention (see `turboquant_attention.py`) works in the rotated domain, so nothing is
inverse-rotated per token. `update_and_fetch` still returns ordinary (dequantized) keys
and values, built lazily: a model that calls `mx.fast.scaled_dot_product_attention`
directly gets correct results, and with our dispatch they are never computed.
"""

from functools import lru_cache
from typing import Optional

import mlx.core as mx
import numpy as np

from .cache import RotatingKVCache, _BaseCache, _causal_mask_for
from .turboquant import turboquant_dequantize_rotated, turboquant_quantize
from .turboquant_codebook import lloyd_max_codebook
from .turboquant_kernels import fused_backend, fused_quantize, quantize_supported
from .turboquant_packing import packed_words
from .turboquant_rotation import inverse_rotate, rotate, rotation_signs

# Causal key mean: positions [32·4^(s-1), 32·4^s) form segment s and are quantized as
# residuals from the mean of every key before 32·4^(s-1); segment 0 (the first 32
# tokens) has mean 0. A mean per segment costs one float16 vector per head, so at most
# a few per cache (3 at 2K tokens); from 2^21 tokens on, the last segment's mean is kept.
KEY_MEAN_FIRST_SEGMENT = 32
KEY_MEAN_MAX_SEGMENT = 8

SUPPORTED_BITS = tuple(range(1, 9))

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


# Compiled once per bit width (and head_dim): fusing the dozens of small ops of
# quantize/dequantize into a few kernels matters on the GPU, where launches dominate.
@lru_cache(maxsize=None)
def _quantizer(bits: int):
    return mx.compile(lambda x, signs, centroids: turboquant_quantize(x, signs, centroids, bits))


@lru_cache(maxsize=None)
def _dequantizer(bits: int, head_dim: int):
    return mx.compile(
        lambda packed, norms, centroids: turboquant_dequantize_rotated(
            packed, norms, centroids, bits, head_dim
        )
    )


_EMPTY = mx.zeros((0,), dtype=mx.float16)  # an absent array in a saved state


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


def key_mean_segments(start: int, stop: int, max_segment: int = KEY_MEAN_MAX_SEGMENT):
    """s(p) for positions start..stop-1, as an int32 array."""
    q = np.arange(start, stop) // KEY_MEAN_FIRST_SEGMENT
    log2 = np.floor(np.log2(np.maximum(q, 1))).astype(np.int64)
    s = np.where(q > 0, log2 // 2 + 1, 0)
    return mx.array(np.minimum(s, max_segment).astype(np.int32))


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
    quantization levels of the others. The fused GPU kernels do not implement it: with
    key scaling, attention runs the reference path.
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
        if name not in self._derived_means:
            self._derived_means[name] = make()
        return self._derived_means[name]

    def _setup(self, k_head_dim: int, v_head_dim: int):
        if k_head_dim != v_head_dim:
            raise ValueError(
                f"TurboQuant needs keys and values of one head_dim (got {k_head_dim} and "
                f"{v_head_dim}); run this model without --turbo-kv-bits."
            )
        self.head_dim = k_head_dim
        self._derive()

    def _derive(self):
        d = self.head_dim
        self.key_signs = rotation_signs(d, self.seed, self.layer_idx, "k")
        self.value_signs = rotation_signs(d, self.seed, self.layer_idx, "v")
        self.key_centroids = mx.array(lloyd_max_codebook(self.key_bits, d), dtype=mx.float32)
        self.value_centroids = mx.array(lloyd_max_codebook(self.value_bits, d), dtype=mx.float32)

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

    def _stored_key_residuals(self, start: int, stop: int) -> mx.array:
        """ŷ of the stored keys of positions start..stop-1 (subclasses: where they are)."""
        raise NotImplementedError

    def _dequantize_keys(self, packed, norms) -> mx.array:
        return _dequantizer(self.key_bits, self.head_dim)(packed, norms, self.key_centroids)

    def _add_key_mean(self, s: int, first: int, pieces):
        """Append M_s (see the class docstring); `pieces` are this update's quantized
        keys so far as (start, packed, norms), the first at position `first`."""
        lo, hi = segment_start(s - 1), segment_start(s)
        parts = [self._stored_key_residuals(lo, first)] if lo < first else []
        parts += [self._dequantize_keys(pk, kn) for start, pk, kn in pieces if start >= lo]
        residuals = mx.concatenate(parts, axis=2)  # ŷ of segment s - 1, rotated
        total = mx.sum(residuals, axis=2, keepdims=True)
        if self.key_scales is not None and s > 1:  # Π(σ_{s-1} ∘ Πᵀ Σ ŷ): linear in ŷ
            total = inverse_rotate(total, self.key_signs) * self._key_scale(s - 1)
            total = rotate(total, self.key_signs)
        mean = (self._key_mean(s - 1) + total / hi).astype(mx.float16)
        self.key_means = mean if s == 1 else mx.concatenate([self.key_means, mean], axis=2)
        if self.key_scaling:
            scale = self._new_key_scale(s, residuals).astype(mx.float16)
            self.key_scales = scale if s == 1 else mx.concatenate([self.key_scales, scale], axis=2)

    def _new_key_scale(self, s: int, residuals: mx.array) -> mx.array:
        """σ_s [B, n_kv_heads, 1, head_dim] float32 from the reconstructed keys of segment s-1."""
        keys = inverse_rotate(residuals, self.key_signs)
        if s > 1:
            keys = self._key_scale(s - 1) * keys
        if s > 1:
            keys = keys + self._original_key_mean(s - 1)
        keys = keys - self._original_key_mean(s)
        var = mx.mean(keys * keys, axis=2, keepdims=True)
        half = var.shape[-1] // 2
        pair = (var[..., :half] + var[..., half:]) / 2  # RoPE pairs share a scale
        var = mx.concatenate([pair, pair], axis=-1)
        sigma = var ** (KEY_SCALE_EXPONENT / 2)
        sigma = sigma / mx.sqrt(mx.mean(sigma * sigma, axis=-1, keepdims=True) + 1e-30)
        return mx.maximum(sigma, KEY_SCALE_FLOOR)

    def _key_scale(self, s: int) -> mx.array:
        """σ_s [B, n_kv_heads, 1, head_dim] float32 (original domain; σ_0 = 1)."""
        if s == 0 or self.key_scales is None:
            return mx.array(1.0)
        return self.key_scales[:, :, s - 1 : s].astype(mx.float32)

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
        B, n_kv_heads, S, d = keys.shape
        if self.head_dim is None:
            self._setup(d, values.shape[-1])
        first = self.offset if first is None else first
        stop = first + S
        backend = fused_backend() if quantize_supported(d) else None

        def quantize(x, mean, signs, centroids, bits, scale=None):
            if scale is not None:  # (x - μ) / σ = x / σ - μ / σ
                x, mean = x.astype(mx.float32) / scale, mean / scale
            if backend is not None:  # one launch instead of a chain of small kernels
                return fused_quantize(x, mean, signs, centroids, bits, backend)
            if mean is not None:
                x = x.astype(mx.float32) - mean
            return _quantizer(bits)(x, signs, centroids)

        pieces, start = [], first
        while start < stop:
            s = key_mean_segment(start, self.max_segment)
            end = stop if s == self.max_segment else min(stop, segment_start(s + 1))
            if s == self.segments_held:
                self._add_key_mean(s, first, pieces)
            mean = self._original_key_mean(s) if s > 0 else None
            x = keys[:, :, start - first : end - first]
            scale = self._key_scale(s) if s > 0 and self.key_scales is not None else None
            pk, kn = quantize(x, mean, self.key_signs, self.key_centroids, self.key_bits, scale)
            pieces.append((start, pk, kn.astype(mx.float16)))
            start = end
        pv, vn = quantize(values, None, self.value_signs, self.value_centroids, self.value_bits)
        if len(pieces) > 1:
            pk = mx.concatenate([p[1] for p in pieces], axis=2)
            kn = mx.concatenate([p[2] for p in pieces], axis=2)
        else:
            pk, kn = pieces[0][1:]
        return pk, kn, pv, vn.astype(mx.float16)

    def _rotated(self, packed_keys, key_norms, segments, packed_values, value_norms, dtype):
        """Πk̂ = ŷ + M_s and Πv̂ for the given buffers (segments: int [T])."""
        k = self._dequantize_keys(packed_keys, key_norms)
        if self.key_means is not None:
            means = self.key_means_with_zero()
            # Preallocated slots past the offset may lie in segments not opened yet.
            segments = mx.minimum(segments, self.segments_held - 1)
            if self.key_scales is not None:
                scales = self.key_scales_with_one()
                scales = mx.take(scales, segments, axis=2).astype(mx.float32)
                k = rotate(scales * inverse_rotate(k, self.key_signs), self.key_signs)
            k = k + mx.take(means, segments, axis=2).astype(mx.float32)
        v = _dequantizer(self.value_bits, self.head_dim)(
            packed_values, value_norms, self.value_centroids
        )
        return k.astype(dtype), v.astype(dtype)

    def _fetch(self, dtype):
        """Lazily dequantized keys and values of the context, in the model's domain (what
        update_and_fetch returns; never computed when attention goes through our dispatch)."""
        k_rot, v_rot = self.rotated_keys_values(mx.float32)
        k = inverse_rotate(k_rot, self.key_signs).astype(dtype)
        return k, inverse_rotate(v_rot, self.value_signs).astype(dtype)

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

    def _original_key_mean(self, s: int) -> mx.array:
        """μ_s = Πᵀ M_s [B, n_kv_heads, 1, head_dim] float32, what new keys are centered by."""
        return self._derived(s, lambda: inverse_rotate(self._key_mean(s), self.key_signs))

    def _keep_key_means(self):
        """After a trim: drop the means of segments that start after the new offset (they
        are recomputed, identically, when those positions are filled again)."""
        n = key_mean_segment(self.n_coded, self.max_segment)
        if self.key_means is not None:
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
        fp16_window: keep the keys and values of the most recent `fp16_window` tokens
            in float16 and compress each token as it slides out (KIVI-style). A query at
            position p attends to positions (p - W, p] in float16 and to older ones
            through their codes, however the tokens arrived (one by one or in chunks).
            Held: the codes of positions before offset - W and float16 keys/values of
            the last W positions only; after an update the float16 keys/values of that
            update's tokens (which its attention reads) stay until the next update.
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
        # float16 keys/values of positions recent_start..offset-1 (recent_start <= coded)
        self.recent_keys = self.recent_values = None
        self.recent_start = 0

    @property
    def n_coded(self) -> int:
        return self.coded

    # ---- storage ----

    def _grow(self, B: int, n_kv_heads: int, S: int):
        prev = self.coded
        if self.packed_keys is not None and prev + S <= self.packed_keys.shape[2]:
            return
        n_new = (self.step + S - 1) // self.step * self.step
        shape = (B, n_kv_heads, n_new)
        kw, vw = packed_words(self.head_dim, self.key_bits), packed_words(
            self.head_dim, self.value_bits
        )
        new = [
            mx.zeros((*shape, kw), dtype=mx.uint32),
            mx.zeros(shape, dtype=mx.float16),
            mx.zeros((*shape, vw), dtype=mx.uint32),
            mx.zeros(shape, dtype=mx.float16),
        ]
        if self.packed_keys is not None:
            old = [x[:, :, :prev] for x in self._buffers()]
            new = [mx.concatenate([o, n], axis=2) for o, n in zip(old, new)]
        self.packed_keys, self.key_norms, self.packed_values, self.value_norms = new

    def _buffers(self):
        return [self.packed_keys, self.key_norms, self.packed_values, self.value_norms]

    def _stored_arrays(self):
        extra = [x for x in (self.key_means, self.key_scales) if x is not None]
        return self._buffers() + extra

    def _stored_key_residuals(self, start, stop):
        return self._dequantize_keys(
            self.packed_keys[:, :, start:stop], self.key_norms[:, :, start:stop]
        )

    def _slide_window(self, keys: mx.array, values: mx.array):
        """Append new tokens to the float16 window; return the tokens that slide out of
        it (positions coded.. , to be quantized)."""
        keys, values = keys.astype(mx.float16), values.astype(mx.float16)
        if self.recent_keys is not None:
            held = self.coded - self.recent_start
            keys = mx.concatenate([self.recent_keys[:, :, held:], keys], axis=2)
            values = mx.concatenate([self.recent_values[:, :, held:], values], axis=2)
        self.recent_keys, self.recent_values, self.recent_start = keys, values, self.coded
        n = max(0, keys.shape[2] - self.fp16_window)
        return keys[:, :, :n], values[:, :, :n]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Quantize and store the new tokens (with a window: those that slide out of
        it); return lazily dequantized keys/values of the whole context."""
        B, n_kv_heads, S, _ = keys.shape
        new_keys, new_values = keys, values
        if self.fp16_window:
            new_keys, new_values = self._slide_window(keys, values)
        self.offset += S
        n = new_keys.shape[2]
        if n == 0:
            if self.head_dim is None:
                self._setup(keys.shape[-1], values.shape[-1])
            return self._fetch(keys.dtype)
        pk, kn, pv, vn = self._quantize(new_keys, new_values, self.coded)
        self._grow(B, n_kv_heads, n)
        prev = self.coded
        self.coded += n
        self.packed_keys[:, :, prev : self.coded] = pk
        self.key_norms[:, :, prev : self.coded] = kn
        self.packed_values[:, :, prev : self.coded] = pv
        self.value_norms[:, :, prev : self.coded] = vn
        return self._fetch(keys.dtype)

    def _fetch(self, dtype):
        if self.coded:
            k, v = TurboQuantCodec._fetch(self, dtype)
        if self.coded == self.offset:
            return k, v
        held = self.coded - self.recent_start
        tail_k = self.recent_keys[:, :, held:].astype(dtype)
        tail_v = self.recent_values[:, :, held:].astype(dtype)
        if not self.coded:
            return tail_k, tail_v
        return mx.concatenate([k, tail_k], axis=2), mx.concatenate([v, tail_v], axis=2)

    def rotated_keys_values(self, dtype=mx.float32):
        """Keys and values of the coded context in the rotated domain (key means added
        back).

        The whole allocated buffer is dequantized and then sliced, so the compiled
        dequantizer sees a new shape only when the buffer grows (every `step` tokens),
        not at every decoded token."""
        pk, kn, pv, vn = self._buffers()
        k, v = self._rotated(pk, kn, self._segment_ids(), pv, vn, dtype)
        return k[:, :, : self.coded], v[:, :, : self.coded]

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

    def kernel_buffers(self):
        """What the fused kernels read: the whole allocated buffers (no copies), the
        segment id of every slot and the number of slots filled."""
        return (*self._buffers(), self._segment_ids(), self.offset)

    # ---- the cache interface ----

    def size(self):
        return self.offset

    def empty(self):
        return self.offset == 0

    def is_trimmable(self):
        return True

    def trim(self, n):
        """Drop the last n tokens. With a window, positions that had already slid out
        of it stay coded (their float16 copy is gone), so until new tokens refill the
        window fewer recent positions are float16 than in a cache filled afresh."""
        n = min(self.offset, n)
        self.offset -= n
        self.coded = min(self.coded, self.offset)
        if self.recent_keys is not None:
            keep = self.offset - self.recent_start
            if keep <= 0:
                self.recent_keys = self.recent_values = None
                self.recent_start = self.coded
            else:
                self.recent_keys = self.recent_keys[:, :, :keep]
                self.recent_values = self.recent_values[:, :, :keep]
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
        self.recent_keys = self.recent_values = None
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
            self.recent_keys, self.recent_values = v[6], v[7]

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

    def _stored_key_residuals(self, start, stop):
        # Only called while nothing has been dropped: ring slot = position.
        packed, norms = self.keys[0], self.keys[1]
        return self._dequantize_keys(packed[:, :, start:stop], norms[:, :, start:stop, 0])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        first = self.offset
        pk, kn, pv, vn = self._quantize(keys, values)
        segments = key_mean_segments(first, first + keys.shape[2], self.max_segment)
        B = keys.shape[0]
        segments = mx.broadcast_to(
            segments.astype(mx.uint8)[None, None, :, None], (B, 1, segments.size, 1)
        )
        RotatingKVCache.update_and_fetch(self, (pk, kn[..., None], segments), (pv, vn[..., None]))
        return self._fetch(keys.dtype)

    @property
    def n_kv_heads(self) -> int:
        return self.keys[0].shape[1]

    def is_ring(self) -> bool:
        return True

    def kernel_buffers(self):
        """The ring's buffers (slot order does not matter to attention), the segment id
        of every slot (batch 0: all sequences share positions) and the slots filled."""
        (pk, kn, segments), (pv, vn) = self.keys, self.values
        return pk, kn, pv, vn, segments, min(self.offset, pk.shape[2])

    def rotated_keys_values(self, dtype=mx.float32):
        (pk, kn, segments), (pv, vn) = self._filled()
        return self._rotated(
            pk, kn[..., 0], segments[0, 0, :, 0].astype(mx.int32), pv, vn[..., 0], dtype
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
