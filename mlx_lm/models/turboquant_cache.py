"""TurboQuantKVCache: keys and values kept only as packed Lloyd-Max codes plus one
norm per vector (arXiv 2504.19874, TurboQuant_mse).

Per token and KV head the cache holds `packed_words(head_dim, bits)` uint32 words of
codes and one float16 norm, for keys and values separately: at head_dim 128 and 3 bits
that is 48 + 2 bytes instead of 256 bytes of FP16. There is no FP16 shadow copy: the
packed codes and norms are the only copy of the context.

Attention (see `turboquant_attention.py`) works in the rotated domain, so nothing is
inverse-rotated per token. `update_and_fetch` still returns ordinary (dequantized) keys
and values, built lazily: a model that calls `mx.fast.scaled_dot_product_attention`
directly gets correct results, and with our dispatch they are never computed.
"""

from functools import lru_cache
from typing import Optional

import mlx.core as mx

from .cache import _BaseCache, _causal_mask_for
from .turboquant import turboquant_dequantize_rotated, turboquant_quantize
from .turboquant_codebook import lloyd_max_codebook
from .turboquant_packing import packed_words
from .turboquant_rotation import inverse_rotate, rotation_signs

SUPPORTED_BITS = tuple(range(1, 9))


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


def check_turbo_bits(name: str, bits) -> int:
    """Validate a bit width (an int in 1..8); returns it."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{name} must be an integer from 1 to 8 (2, 3 or 4 for --turbo-kv-bits), got {bits!r}."
        )
    return bits


class TurboQuantKVCache(_BaseCache):
    """A KV cache compressed with TurboQuant.

    Args:
        key_bits, value_bits: bits per coordinate for keys and values (1-8).
        seed: seed of the random rotations (with `layer_idx`, fixes the signs).
        layer_idx: the layer this cache serves; each layer gets its own rotation.
        key_centering: subtract one per-head, per-channel key mean (taken from the
            first tokens stored) before quantizing. q·(k - μ) = q·k - q·μ shifts every
            score of a query by the same amount, so the softmax is unchanged and μ never
            has to be added back in attention. Off by default: it helps on long prompts
            (SmolLM2, 2K tokens of prose, 4-bit: +4.9% instead of +7.6% perplexity) but a
            mean taken from a short first chunk (a chat prompt) hurts: SmolLM2 no longer
            answers "Paris" at 3 bits. Issue 7 chooses the defaults by measurement.
    """

    step = 256

    def __init__(
        self,
        key_bits: int = 3,
        value_bits: int = 3,
        seed: int = 0,
        layer_idx: int = 0,
        key_centering: bool = False,
    ):
        self.key_bits = check_turbo_bits("key_bits", key_bits)
        self.value_bits = check_turbo_bits("value_bits", value_bits)
        self.seed = seed
        self.layer_idx = layer_idx
        self.key_centering = bool(key_centering)
        self.offset = 0
        self.head_dim = None
        self.packed_keys = None
        self.key_norms = None
        self.packed_values = None
        self.value_norms = None
        self.key_mean = None

    # ---- rotation and codebooks (derived from the settings, never stored) ----

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

    # ---- storage ----

    def _grow(self, B: int, n_kv_heads: int, S: int):
        prev = self.offset
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
        if self.packed_keys is None:
            self.packed_keys, self.key_norms, self.packed_values, self.value_norms = new
            return
        old = [x[:, :, :prev] for x in self._buffers()]
        merged = [mx.concatenate([o, n], axis=2) for o, n in zip(old, new)]
        self.packed_keys, self.key_norms, self.packed_values, self.value_norms = merged

    def _buffers(self):
        return [self.packed_keys, self.key_norms, self.packed_values, self.value_norms]

    def _stored(self):
        """The arrays a saved cache needs: the buffers, then the key mean if any."""
        return self._buffers() + ([self.key_mean] if self.key_mean is not None else [])

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Quantize and store the new tokens; return lazily dequantized keys/values
        of the whole context (never computed when attention goes through our dispatch)."""
        B, n_kv_heads, S, k_head_dim = keys.shape
        if self.head_dim is None:
            self._setup(k_head_dim, values.shape[-1])
        self._grow(B, n_kv_heads, S)
        if self.key_centering:
            if self.key_mean is None:
                self.key_mean = mx.mean(keys.astype(mx.float32), axis=2, keepdims=True)
            keys = keys - self.key_mean.astype(keys.dtype)
        pk, kn = turboquant_quantize(keys, self.key_signs, self.key_centroids, self.key_bits)
        pv, vn = turboquant_quantize(
            values, self.value_signs, self.value_centroids, self.value_bits
        )
        prev = self.offset
        self.offset += S
        self.packed_keys[:, :, prev : self.offset] = pk
        self.key_norms[:, :, prev : self.offset] = kn.astype(mx.float16)
        self.packed_values[:, :, prev : self.offset] = pv
        self.value_norms[:, :, prev : self.offset] = vn.astype(mx.float16)
        k_rot, v_rot = self.rotated_keys_values(mx.float32)
        k = inverse_rotate(k_rot, self.key_signs)
        if self.key_mean is not None:
            k = k + self.key_mean
        return k.astype(keys.dtype), inverse_rotate(v_rot, self.value_signs).astype(values.dtype)

    def rotated_keys_values(self, dtype=mx.float32):
        """Keys and values of the context in the rotated domain: norm x centroid vector
        (keys still centered: attention does not need the mean back).

        The whole allocated buffer is dequantized and then sliced, so the compiled
        dequantizer sees a new shape only when the buffer grows (every `step` tokens),
        not at every decoded token."""
        n = self.offset
        k = _dequantizer(self.key_bits, self.head_dim)(
            self.packed_keys, self.key_norms, self.key_centroids
        )
        v = _dequantizer(self.value_bits, self.head_dim)(
            self.packed_values, self.value_norms, self.value_centroids
        )
        return k[:, :, :n].astype(dtype), v[:, :, :n].astype(dtype)

    # ---- the cache interface ----

    def size(self):
        return self.offset

    def empty(self):
        return self.packed_keys is None or self.offset == 0

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        return _causal_mask_for(N, self.offset, window_size, return_array)

    @property
    def state(self):
        if self.packed_keys is None:
            return []
        n = self.offset
        buffers = self._buffers()
        if n != self.packed_keys.shape[2]:
            buffers = [x[:, :, :n] for x in buffers]
        return tuple(buffers + self._stored()[4:])

    @state.setter
    def state(self, v):
        if not v:
            self.packed_keys = self.key_norms = self.packed_values = self.value_norms = None
            self.key_mean = None
            return
        self.packed_keys, self.key_norms, self.packed_values, self.value_norms = v[:4]
        self.key_mean = v[4] if len(v) > 4 else None

    @property
    def meta_state(self):
        return tuple(
            map(
                str,
                (
                    self.offset,
                    self.key_bits,
                    self.value_bits,
                    self.seed,
                    self.layer_idx,
                    self.head_dim or 0,
                    int(self.key_centering),
                ),
            )
        )

    @meta_state.setter
    def meta_state(self, v):
        offset, key_bits, value_bits, seed, layer_idx, head_dim, centering = map(int, v)
        self.offset, self.seed, self.layer_idx = offset, seed, layer_idx
        self.key_centering = bool(centering)
        self.key_bits = check_turbo_bits("key_bits", key_bits)
        self.value_bits = check_turbo_bits("value_bits", value_bits)
        self.head_dim = head_dim or None
        if self.head_dim is not None:
            self._derive()

    @property
    def nbytes(self):
        """Bytes actually held: packed codes and norms (preallocated blocks included)."""
        if self.packed_keys is None:
            return 0
        return sum(x.nbytes for x in self._stored())

    def __deepcopy__(self, memo):
        new = TurboQuantKVCache(
            self.key_bits, self.value_bits, self.seed, self.layer_idx, self.key_centering
        )
        new.offset = self.offset
        new.head_dim = self.head_dim
        if self.packed_keys is not None:
            new.state = tuple(mx.array(x) for x in self._stored())
            new._derive()
        return new


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
    turbo_key_centering: bool = False,
):
    """A new cache list with the attention layers' KV caches as TurboQuantKVCache.

    Only plain per-head K/V caches are converted (filled ones are compressed as they
    are). SSM/linear-attention state (`ArraysCache`) is kept exactly; the first and last
    `turbo_fp16_layers` attention layers stay FP16; sliding-window (rotating) caches stay
    as they are (they are bounded). Anything else - latent (MLA) caches, affine-quantized
    caches, unknown classes - is a ValueError naming the layer, its cache class and the
    model type. Validation happens before anything is converted, and the input list is
    not modified.
    """
    from .cache import ArraysCache, KVCache, RotatingKVCache

    key_bits, value_bits = resolve_turbo_bits(turbo_kv_bits, turbo_key_bits, turbo_value_bits)
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
        if type(c) in (KVCache, RotatingKVCache, TurboQuantKVCache):
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
    converted = 0
    for i in attention_layers:
        c = cache[i]
        if i in fp16 or type(c) is RotatingKVCache:
            continue
        if isinstance(c, TurboQuantKVCache):
            if (c.key_bits, c.value_bits) != (key_bits, value_bits):
                raise ValueError(
                    f"Layer {i} already holds a TurboQuant cache with key/value bits "
                    f"{c.key_bits}/{c.value_bits}, not the requested {key_bits}/{value_bits}. "
                    "Use matching --turbo-* flags or a fresh cache."
                )
        else:
            new_cache[i] = c.to_turbo_quantized(
                key_bits, value_bits, turbo_seed, layer_idx=i, key_centering=turbo_key_centering
            )
        converted += 1
    if converted == 0:
        raise ValueError(
            f"No layer of model type '{model_type}' can be compressed: its attention caches are "
            "sliding-window/--max-kv-size rotating caches or FP16 layers. Drop --max-kv-size or "
            "lower --turbo-fp16-layers."
        )
    return new_cache
