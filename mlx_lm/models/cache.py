"""Prompt caches: what each attention (or recurrent) layer keeps between steps.

Every cache holds keys/values (or state) of shape [B, n_kv_heads, T, head_dim] and
returns from `update_and_fetch` what the layer's attention should read. `state` and
`meta_state` are what `save_prompt_cache` writes; `from_state` rebuilds a cache.
"""

from typing import Any, Dict, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten


def _causal_mask_for(N: int, offset: int, window_size: Optional[int], return_array: bool):
    """Mask for N new queries after `offset` cached tokens in a linear (non-ring) cache."""
    # base.py imports this module for attention dispatch, so import it lazily here.
    from .base import create_causal_mask

    if window_size is not None and offset + N > window_size:
        return create_causal_mask(N, offset, window_size=window_size)
    if N == 1:
        return None
    if return_array:
        return create_causal_mask(N, offset, window_size=window_size)
    return "causal"


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in _leaves(tree))


def _leaves(tree) -> List[mx.array]:
    return [x for _, x in tree_flatten(tree) if isinstance(x, mx.array)]


def _length(v) -> int:
    """Tokens in a buffer or a tuple of buffers (axis 2)."""
    return _leaves(v)[0].shape[2]


class _BaseCache:
    """The interface every cache class implements."""

    @property
    def state(self):
        return []

    @state.setter
    def state(self, v):
        if v is not None and v:
            raise ValueError(f"{type(self).__name__} holds no state to set.")

    @property
    def meta_state(self):
        return ""

    @meta_state.setter
    def meta_state(self, v):
        if v is not None and v:
            raise ValueError(f"{type(self).__name__} holds no meta state to set.")

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        return 0

    def size(self) -> int:
        return 0

    def empty(self) -> bool:
        return self.size() == 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self.state)

    @classmethod
    def from_state(cls, state, meta_state):
        obj = cls.__new__(cls)
        cls.__init__(obj)
        obj.state = state
        obj.meta_state = meta_state
        return obj


class KVCache(_BaseCache):
    """An unbounded FP16 (model dtype) cache, grown in blocks of `step` tokens."""

    step = 256

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        prev = self.offset
        S = keys.shape[2]
        if self.keys is None or prev + S > self.keys.shape[2]:
            B, n_kv_heads, _, k_head_dim = keys.shape
            v_head_dim = values.shape[3]
            n_steps = (self.step + S - 1) // self.step
            new_k = mx.zeros((B, n_kv_heads, n_steps * self.step, k_head_dim), keys.dtype)
            new_v = mx.zeros((B, n_kv_heads, n_steps * self.step, v_head_dim), values.dtype)
            if self.keys is not None:
                if prev % self.step != 0:
                    self.keys = self.keys[..., :prev, :]
                    self.values = self.values[..., :prev, :]
                self.keys = mx.concatenate([self.keys, new_k], axis=2)
                self.values = mx.concatenate([self.values, new_v], axis=2)
            else:
                self.keys, self.values = new_k, new_v
        self.offset += S
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def size(self):
        return self.offset

    @property
    def state(self):
        if self.keys is None:
            return []
        if self.offset == self.keys.shape[2]:
            return self.keys, self.values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    @state.setter
    def state(self, v):
        if not v:
            self.keys = self.values = None
            self.offset = 0
            return
        self.keys, self.values = v
        self.offset = self.keys.shape[2]

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        return _causal_mask_for(N, self.offset, window_size, return_array)

    @property
    def nbytes(self):
        # The preallocated block is memory held, so count all of it.
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "QuantizedKVCache":
        """Convert to upstream's affine-quantized cache (`--kv-bits`)."""
        quant_cache = QuantizedKVCache(group_size=group_size, bits=bits)
        quant_cache.offset = self.offset
        if self.keys is not None:
            keys, values = self.state
            quant_cache.keys = mx.quantize(keys, group_size=group_size, bits=bits)
            quant_cache.values = mx.quantize(values, group_size=group_size, bits=bits)
        return quant_cache

    def to_turbo_quantized(
        self,
        key_bits: int = 3,
        value_bits: int = 3,
        seed: int = 0,
        layer_idx: int = 0,
        key_centering: bool = True,
        key_scaling: bool = False,
        fp16_window: int = 0,
    ):
        """Convert to a `TurboQuantKVCache` holding the same tokens, compressed."""
        from .turboquant_cache import TurboQuantKVCache

        turbo = TurboQuantKVCache(
            key_bits, value_bits, seed, layer_idx, key_centering, key_scaling, fp16_window
        )
        if self.keys is not None and self.offset > 0:
            keys, values = self.state
            turbo.update_and_fetch(keys, values)
        return turbo


class RotatingKVCache(_BaseCache):
    """A bounded cache: the first `keep` tokens plus the most recent ones, at most
    `max_size` in all, held in a ring buffer (sliding-window layers, `--max-kv-size`).

    Single-token updates write in place; multi-token updates put the buffer back in
    temporal order and append, keeping `max_size - 1` old tokens so every new query
    still sees a full window (the mask from `make_mask` limits each query to it).
    """

    step = 256

    def __init__(self, max_size: Optional[int] = None, keep: int = 0, step: int = 256):
        self.keep = keep
        self.keys = None
        self.values = None
        self.offset = 0
        self.max_size = max_size
        self.step = step
        self._idx = 0

    # The ring operations below work on a buffer or a tuple of buffers (token axis 2), so
    # that a compressed cache (RotatingTurboQuantKVCache) can keep its codes in the ring.

    def _trim(self, trim_size, v, append=None):
        def one(x, *new):
            parts = [x[..., : self.keep, :], x[..., trim_size + self.keep :, :]]
            return mx.concatenate((parts if trim_size > 0 else [x]) + list(new), axis=2)

        return tree_map(one, v) if append is None else tree_map(one, v, append)

    def _temporal_order(self, v):
        """The buffer's tokens oldest first (the ring may have wrapped)."""
        if self._idx == _length(v):
            return v
        if self._idx < self.offset:
            return tree_map(
                lambda x: mx.concatenate(
                    [
                        x[..., : self.keep, :],
                        x[..., self._idx :, :],
                        x[..., self.keep : self._idx, :],
                    ],
                    axis=2,
                ),
                v,
            )
        return tree_map(lambda x: x[..., : self._idx, :], v)

    def _update_concat(self, keys, values):
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = self._temporal_order(self.keys)
            self.values = self._temporal_order(self.values)
            self._idx = _length(self.keys)
            trim_size = self._idx - self.max_size + 1
            self.keys = self._trim(trim_size, self.keys, keys)
            self.values = self._trim(trim_size, self.values, values)
        self.offset += _length(keys)
        self._idx = _length(self.keys)
        return self.keys, self.values

    def _update_in_place(self, keys, values):
        S = _length(keys)
        prev = self.offset
        if self.keys is None or (prev >= _length(self.keys) and _length(self.keys) < self.max_size):
            new_size = min(self.step, self.max_size - prev)

            def blank(x):
                return mx.zeros((x.shape[0], x.shape[1], new_size, *x.shape[3:]), x.dtype)

            new_k, new_v = tree_map(blank, keys), tree_map(blank, values)
            if self.keys is not None:
                grow = lambda old, new: mx.concatenate([old, new], axis=2)  # noqa: E731
                self.keys = tree_map(grow, self.keys, new_k)
                self.values = tree_map(grow, self.values, new_v)
            else:
                self.keys, self.values = new_k, new_v
            self._idx = prev

        trim_size = _length(self.keys) - self.max_size
        if trim_size > 0:
            self.keys = self._trim(trim_size, self.keys)
            self.values = self._trim(trim_size, self.values)
            self._idx = self.max_size

        if self._idx == self.max_size:
            self._idx = self.keep

        for buf, new in zip(_leaves((self.keys, self.values)), _leaves((keys, values))):
            buf[..., self._idx : self._idx + S, :] = new
        self.offset += S
        self._idx += S
        return self._filled()

    def _filled(self):
        """(keys, values) of the filled part of the buffer."""
        if self.offset < _length(self.keys):
            return tree_map(lambda x: x[..., : self.offset, :], (self.keys, self.values))
        return self.keys, self.values

    def update_and_fetch(self, keys, values):
        if _length(keys) == 1:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    def size(self):
        return min(self.offset, self.max_size)

    @property
    def state(self):
        if self.keys is None:
            return []
        return self._filled()

    @state.setter
    def state(self, v):
        if not v:
            self.keys = self.values = None
            return
        self.keys, self.values = v

    @property
    def meta_state(self):
        return tuple(map(str, (self.keep, self.max_size, self.step, self.offset, self._idx)))

    @meta_state.setter
    def meta_state(self, v):
        self.keep, self.max_size, self.step, self.offset, self._idx = map(int, v)

    def is_trimmable(self):
        return self.offset < self.max_size

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        self._idx -= n
        return n

    def to_turbo_quantized(
        self,
        key_bits: int = 3,
        value_bits: int = 3,
        seed: int = 0,
        layer_idx: int = 0,
        key_centering: bool = True,
        key_scaling: bool = False,
    ):
        """Convert to a `RotatingTurboQuantKVCache` with the same window and tokens."""
        from .turboquant_cache import RotatingTurboQuantKVCache

        turbo = RotatingTurboQuantKVCache(
            self.max_size,
            self.keep,
            self.step,
            key_bits,
            value_bits,
            seed,
            layer_idx,
            key_centering,
            key_scaling,
        )
        if self.keys is not None and self.offset > 0:
            if self.offset > _length(self.keys):
                raise ValueError(
                    f"This sliding-window cache has already dropped tokens ({self.offset} seen, "
                    f"{_length(self.keys)} held): convert it to TurboQuant before its window "
                    "fills, or start from an empty cache."
                )
            turbo.update_and_fetch(*self.state)  # nothing dropped: in temporal order
        return turbo

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        from .base import create_causal_mask

        if N > 1:
            window_size = window_size or self.max_size
            offset = min(self.max_size - 1, self.offset)
            if offset + N > window_size or return_array:
                return create_causal_mask(N, offset, window_size=window_size)
            return "causal"
        if window_size is None or self.offset < window_size or self.max_size <= window_size:
            return None
        # A window narrower than the buffer: mask the oldest slots of the ring.
        idx = self._idx if self._idx < self.max_size else self.keep
        size = min(self.max_size, self.offset + 1)
        mask = mx.arange(size) >= (size - window_size)
        return mx.roll(mask, shift=idx + 1)

    @property
    def nbytes(self):
        return _nbytes((self.keys, self.values))


class QuantizedKVCache(_BaseCache):
    """Upstream's affine-quantized cache (`--kv-bits`): keys and values as
    (packed, scales, biases) from `mx.quantize`, grown in blocks of `step` tokens."""

    step = 256

    def __init__(self, group_size: int = 64, bits: int = 8):
        self.keys = None
        self.values = None
        self.offset = 0
        self.group_size = group_size
        self.bits = bits

    def update_and_fetch(self, keys, values):
        B, n_kv_heads, S, k_head_dim = keys.shape
        v_head_dim = values.shape[-1]
        prev = self.offset

        if self.keys is None or (prev + S) > self.keys[0].shape[-2]:
            el_per_int = 8 * mx.uint32.size // self.bits
            new_steps = (self.step + S - 1) // self.step * self.step

            def init_quant(dim):
                shape = (B, n_kv_heads, new_steps)
                return (
                    mx.zeros((*shape, dim // el_per_int), dtype=mx.uint32),
                    mx.zeros((*shape, dim // self.group_size), dtype=keys.dtype),
                    mx.zeros((*shape, dim // self.group_size), dtype=keys.dtype),
                )

            def expand_quant(x):
                new_x = mx.zeros((*x.shape[:-2], new_steps, x.shape[-1]), dtype=x.dtype)
                return mx.concatenate([x, new_x], axis=-2)

            if self.keys is not None:
                if prev % self.step != 0:
                    self.keys, self.values = tree_map(
                        lambda x: x[..., :prev, :], (self.keys, self.values)
                    )
                self.keys, self.values = tree_map(expand_quant, (self.keys, self.values))
            else:
                self.keys, self.values = init_quant(k_head_dim), init_quant(v_head_dim)

        self.offset += S
        keys = mx.quantize(keys, group_size=self.group_size, bits=self.bits)
        values = mx.quantize(values, group_size=self.group_size, bits=self.bits)
        for i in range(len(self.keys)):
            self.keys[i][..., prev : self.offset, :] = keys[i]
            self.values[i][..., prev : self.offset, :] = values[i]
        return tree_map(lambda x: x[..., : self.offset, :], (self.keys, self.values))

    def size(self):
        return self.offset

    @property
    def state(self):
        if self.keys is None:
            return []
        if self.offset == self.keys[0].shape[2]:
            return self.keys, self.values
        return tree_map(lambda x: x[..., : self.offset, :], (self.keys, self.values))

    @state.setter
    def state(self, v):
        if not v:
            self.keys = self.values = None
            return
        self.keys, self.values = (tuple(x) for x in v)

    @property
    def meta_state(self):
        return tuple(map(str, (self.step, self.offset, self.group_size, self.bits)))

    @meta_state.setter
    def meta_state(self, v):
        self.step, self.offset, self.group_size, self.bits = map(int, v)

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        return _causal_mask_for(N, self.offset, window_size, return_array)

    @property
    def nbytes(self):
        return _nbytes((self.keys, self.values)) if self.keys is not None else 0


class ArraysCache(_BaseCache):
    """A fixed number of arrays per layer (recurrent state of SSM/linear-attention layers)."""

    def __init__(self, size: int = 0, left_padding: Optional[List[int]] = None):
        self.cache = [None] * size
        self.left_padding = mx.array(left_padding) if left_padding is not None else None

    def __setitem__(self, idx, value):
        self.cache[idx] = value

    def __getitem__(self, idx):
        return self.cache[idx]

    @property
    def state(self):
        return self.cache

    @state.setter
    def state(self, v):
        self.cache = list(v)

    def size(self):
        return 0 if self.cache[0] is None else 1

    def empty(self):
        return self.cache[0] is None

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        if self.left_padding is None:
            return None
        pos = mx.arange(N)
        return pos >= self.left_padding[:, None]


class MambaCache(ArraysCache):
    def __init__(self, left_padding: Optional[List[int]] = None):
        super().__init__(size=2, left_padding=left_padding)


class CacheList(_BaseCache):
    """Several caches for one layer (e.g. a layer with two attention branches)."""

    def __init__(self, *caches):
        self.caches = list(caches)

    def __getitem__(self, idx):
        return self.caches[idx]

    def is_trimmable(self):
        return all(c.is_trimmable() for c in self.caches)

    def trim(self, n):
        return [c.trim(n) for c in self.caches][0]

    def size(self):
        return max((c.size() for c in self.caches), default=0)

    @property
    def state(self):
        return [c.state for c in self.caches]

    @state.setter
    def state(self, v):
        for c, s in zip(self.caches, v):
            c.state = s

    @property
    def meta_state(self):
        return [type(c).__name__ for c in self.caches], [c.meta_state for c in self.caches]

    @meta_state.setter
    def meta_state(self, v):
        classes, metas = v
        self.caches = [_cache_class(name).__new__(_cache_class(name)) for name in classes]
        for c, name, m in zip(self.caches, classes, metas):
            type(c).__init__(c)
            c.meta_state = m

    @classmethod
    def from_state(cls, state, meta_state):
        classes, metas = meta_state
        return cls(
            *(_cache_class(name).from_state(s, m) for name, s, m in zip(classes, state, metas))
        )


def batch_mask(N: int, filled: int, left_padding: mx.array, window_size: Optional[int] = None):
    """Boolean [B, 1, N, filled + N] mask for N new queries of a left-padded batch whose
    buffer already holds `filled` slots: causal (and windowed) within each sequence, and
    blind to the `left_padding[b]` padding slots at the start of row b."""
    from .base import create_causal_mask

    causal = create_causal_mask(N, filled, window_size=window_size)
    real = mx.arange(filled + N)[None] >= left_padding[:, None]
    return causal[None, None] & real[:, None, None, :]


def _check_batch_index(keep, B: int) -> List[int]:
    keep = [int(i) for i in keep]
    if not keep or any(not 0 <= i < B for i in keep) or len(set(keep)) != len(keep):
        raise ValueError(
            f"filter needs distinct sequence indices in [0, {B}) (at least one), got {keep}; "
            "to drop every sequence, discard the batch cache instead."
        )
    return keep


class _LeftPaddedBatch:
    """Shape bookkeeping of a left-padded batch cache: `_pad` (padding slots per row)
    and `_filled` (slots used, padding included)."""

    @property
    def left_padding(self) -> mx.array:
        return mx.array(self._pad, dtype=mx.int32)

    @property
    def lengths(self) -> List[int]:
        """Tokens held per sequence."""
        return [self._filled - p for p in self._pad]

    @property
    def offset(self) -> mx.array:
        # Read by every layer's RoPE: made once per step, not once per call.
        key = (self._filled, tuple(self._pad))
        if getattr(self, "_offset_key", None) != key:
            self._offset_key, self._offset = key, mx.array(self.lengths, dtype=mx.int32)
        return self._offset

    @property
    def batch_size(self) -> int:
        return len(self._pad)


class BatchKVCache(_LeftPaddedBatch, _BaseCache):
    """FP16 keys and values of several sequences decoded together (continuous batching).

    The sequences share one [B, n_kv_heads, T, head_dim] buffer, left-padded: row b's
    first `left_padding[b]` slots hold no token, so every sequence's newest token sits in
    the same slot. `offset` is an int array [B], each sequence's own position (RoPE takes
    it as a per-sequence offset) and `make_mask` hides the padding.

    A batch is built from per-request caches after their own prefill (`merge`), grows by
    one slot per decode step, loses finished sequences (`filter`), gains new ones
    (`extend`) and hands a sequence back as a plain `KVCache` (`extract`).
    """

    step = 256

    def __init__(self, left_padding: List[int]):
        self.keys = None
        self.values = None
        self._pad = [int(p) for p in left_padding]
        self._filled = max(self._pad, default=0)  # slots used (padding included)

    @classmethod
    def merge(cls, caches: List["KVCache"]) -> "BatchKVCache":
        """One batch from single-sequence `KVCache`s (each with batch size 1)."""
        for i, c in enumerate(caches):
            if type(c) is not KVCache:
                raise ValueError(
                    f"BatchKVCache.merge takes KVCache layers; cache {i} is a "
                    f"{type(c).__name__}."
                )
            if c.keys is not None and c.keys.shape[0] != 1:
                raise ValueError(
                    f"BatchKVCache.merge takes single-sequence caches; cache {i} has batch "
                    f"size {c.keys.shape[0]}."
                )
        lengths = [c.offset for c in caches]
        T = max(lengths)
        batch = cls([T - n for n in lengths])
        batch._filled = T
        if T == 0:
            return batch
        ref = next(c for c in caches if c.offset > 0)
        rows_k, rows_v = [], []
        for c, n in zip(caches, lengths):
            k, v = (c.keys[..., :n, :], c.values[..., :n, :]) if n else (None, None)
            rows_k.append(_left_pad(k, T - n, ref.keys))
            rows_v.append(_left_pad(v, T - n, ref.values))
        batch.keys = mx.concatenate(rows_k, axis=0)
        batch.values = mx.concatenate(rows_v, axis=0)
        return batch

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        B, n_kv_heads, S, k_head_dim = keys.shape
        if B != self.batch_size:
            raise ValueError(f"This batch cache holds {self.batch_size} sequences, got {B}.")
        prev = self._filled
        if self.keys is None or prev + S > self.keys.shape[2]:
            n_new = (self.step + S - 1) // self.step * self.step
            new_k = mx.zeros((B, n_kv_heads, n_new, k_head_dim), keys.dtype)
            new_v = mx.zeros((B, n_kv_heads, n_new, values.shape[3]), values.dtype)
            if self.keys is None:  # nothing stored yet, so no slot is filled either
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        self._filled += S
        self.keys[..., prev : self._filled, :] = keys
        self.values[..., prev : self._filled, :] = values
        return self.keys[..., : self._filled, :], self.values[..., : self._filled, :]

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        return batch_mask(N, self._filled, self.left_padding, window_size)

    def filter(self, keep: List[int]):
        """Keep only the sequences at indices `keep` (in that order), in place; padding
        that every remaining row shares is dropped."""
        keep = _check_batch_index(keep, self.batch_size)
        self._pad = [self._pad[i] for i in keep]
        if self.keys is not None:
            idx = mx.array(keep)
            self.keys, self.values = self.keys[idx], self.values[idx]
        self._drop_shared_padding()

    def _drop_shared_padding(self):
        cut = min(self._pad)
        if cut > 0:
            self._pad = [p - cut for p in self._pad]
            self._filled -= cut
            if self.keys is not None:
                self.keys = self.keys[..., cut:, :]
                self.values = self.values[..., cut:, :]

    def extend(self, other: "BatchKVCache"):
        """Append the sequences of `other` (another BatchKVCache) to this batch, in place.
        The shorter side gets left padding so that both end at the same slot."""
        if not isinstance(other, BatchKVCache):
            raise ValueError(f"extend takes a BatchKVCache, got {type(other).__name__}.")
        T = max(self._filled, other._filled)
        parts = []
        for c in (self, other):
            extra = T - c._filled
            if c.keys is None:
                parts.append(None)
                continue
            parts.append(
                (
                    _left_pad(c.keys[..., : c._filled, :], extra, c.keys),
                    _left_pad(c.values[..., : c._filled, :], extra, c.values),
                )
            )
        pads = [p + T - self._filled for p in self._pad] + [
            p + T - other._filled for p in other._pad
        ]
        held = [p for p in parts if p is not None]
        if held:
            ref_k, ref_v = held[0]
            rows_k, rows_v = [], []
            for c, p in zip((self, other), parts):
                if p is None:  # nothing stored yet: all padding
                    shape = (c.batch_size, *ref_k.shape[1:])
                    p = (
                        mx.zeros(shape, ref_k.dtype),
                        mx.zeros(shape[:3] + ref_v.shape[3:], ref_v.dtype),
                    )
                rows_k.append(p[0])
                rows_v.append(p[1])
            self.keys = mx.concatenate(rows_k, axis=0)
            self.values = mx.concatenate(rows_v, axis=0)
        self._pad, self._filled = pads, T

    def extract(self, i: int) -> "KVCache":
        """Sequence `i` as a plain single-sequence KVCache (a copy)."""
        _check_batch_index([i], self.batch_size)
        cache = KVCache()
        if self.keys is not None and self._filled > self._pad[i]:
            sl = slice(self._pad[i], self._filled)
            cache.state = (
                mx.array(self.keys[i : i + 1, :, sl]),
                mx.array(self.values[i : i + 1, :, sl]),
            )
        return cache

    def size(self):
        return self._filled

    def empty(self):
        return self.keys is None or all(n == 0 for n in self.lengths)

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self._filled, :], self.values[..., : self._filled, :]

    @property
    def meta_state(self):
        return tuple(map(str, self._pad))

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _left_pad(x: Optional[mx.array], n: int, like: mx.array) -> mx.array:
    """`x` [1 or B, H, T, D] with n zero slots prepended (x None: n zero slots, one row)."""
    if x is None:
        return mx.zeros((1, like.shape[1], n, *like.shape[3:]), like.dtype)
    if n == 0:
        return x
    zeros = mx.zeros((x.shape[0], x.shape[1], n, *x.shape[3:]), x.dtype)
    return mx.concatenate([zeros, x], axis=2)


def can_batch(cache: List[Any]) -> bool:
    """Whether a per-request cache list can join a continuous batch: every layer a plain
    `KVCache` or `TurboQuantKVCache` (not rotating, affine-quantized or recurrent)."""
    from .turboquant_cache import TurboQuantKVCache

    return bool(cache) and all(type(c) in (KVCache, TurboQuantKVCache) for c in cache)


def merge_caches(caches: List[List[Any]]) -> List[Any]:
    """Per-layer batch caches from several requests' cache lists (one list per request,
    same model and settings): `BatchKVCache` for KVCache layers, `BatchTurboQuantKVCache`
    for TurboQuant ones."""
    from .turboquant_cache import BatchTurboQuantKVCache, TurboQuantKVCache

    if not caches:
        raise ValueError("merge_caches needs at least one request's cache.")
    layers = len(caches[0])
    if any(len(c) != layers for c in caches):
        raise ValueError("merge_caches: the requests' caches have different numbers of layers.")
    out = []
    for i in range(layers):
        column = [c[i] for c in caches]
        kinds = {type(c) for c in column}
        if kinds == {KVCache}:
            out.append(BatchKVCache.merge(column))
        elif kinds == {TurboQuantKVCache}:
            out.append(BatchTurboQuantKVCache.merge(column))
        else:
            names = sorted(k.__name__ for k in kinds)
            raise ValueError(
                f"Layer {i} cannot be batched: its caches are {names}; continuous batching "
                "takes KVCache or TurboQuantKVCache layers (no --max-kv-size, --kv-bits, "
                "sliding windows or recurrent layers), one kind per layer."
            )
    return out


def _cache_classes() -> Dict[str, type]:
    """Every cache class defined so far (subclasses of `_BaseCache`), by name."""
    found, todo = {}, [_BaseCache]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            found[sub.__name__] = sub
            todo.append(sub)
    return found


def _cache_class(name: str) -> type:
    classes = _cache_classes()
    if name not in classes:
        # TurboQuant caches live in their own module; import it before giving up.
        try:
            from . import turboquant_cache  # noqa: F401
        except ImportError:
            pass
        classes = _cache_classes()
    if name not in classes:
        raise ValueError(
            f"Unknown cache class '{name}' in the prompt-cache file. Known: {sorted(classes)}."
        )
    return classes[name]


def make_prompt_cache(
    model,
    max_kv_size: Optional[int] = None,
    turbo_kv_bits: Optional[int] = None,
    turbo_fp16_layers: int = 0,
    turbo_key_bits: Optional[int] = None,
    turbo_value_bits: Optional[int] = None,
    turbo_seed: int = 0,
    turbo_key_centering: bool = True,
    turbo_key_scaling: Optional[bool] = None,
    turbo_fp16_window: Optional[int] = None,
) -> List[Any]:
    """One cache per layer for `model`.

    Models whose layers differ (sliding windows, SSM layers) build their own with
    `model.make_cache()`. With `max_kv_size`, unbounded KV caches become
    `RotatingKVCache(max_kv_size, keep=4)` (the first tokens are kept as attention sinks).

    With `turbo_kv_bits` (or `turbo_key_bits` / `turbo_value_bits`) the attention layers'
    caches become `TurboQuantKVCache`s, except the first and last `turbo_fp16_layers`
    attention layers, which stay `KVCache`. `turbo_key_scaling` and `turbo_fp16_window`
    default (None) to key scaling where key centering is on and a float16 window of the
    last 64 tokens. See `to_turbo_quantized_cache`.
    """
    if max_kv_size is not None and (
        isinstance(max_kv_size, bool) or not isinstance(max_kv_size, int) or max_kv_size < 1
    ):
        raise ValueError(f"max_kv_size must be a positive integer, got {max_kv_size!r}.")
    if hasattr(model, "make_cache"):
        cache = model.make_cache()
    else:
        cache = [KVCache() for _ in range(len(model.layers))]
    if max_kv_size is not None:
        cache = [
            RotatingKVCache(max_size=max_kv_size, keep=4) if type(c) is KVCache else c
            for c in cache
        ]
    if turbo_kv_bits is None and turbo_key_bits is None and turbo_value_bits is None:
        return cache
    from .turboquant_cache import to_turbo_quantized_cache

    return to_turbo_quantized_cache(
        cache,
        model,
        turbo_kv_bits=turbo_kv_bits,
        turbo_fp16_layers=turbo_fp16_layers,
        turbo_key_bits=turbo_key_bits,
        turbo_value_bits=turbo_value_bits,
        turbo_seed=turbo_seed,
        turbo_key_centering=turbo_key_centering,
        turbo_key_scaling=turbo_key_scaling,
        turbo_fp16_window=turbo_fp16_window,
    )


def save_prompt_cache(file_name: str, cache: List[Any], metadata: Dict[str, str] = {}):
    """Save the caches' arrays to a safetensors file; class names, meta state and the
    user's `metadata` (str -> str) go into its header."""
    cache_data = dict(tree_flatten([c.state for c in cache]))
    cache_info = [c.meta_state for c in cache]
    cache_classes = [type(c).__name__ for c in cache]
    cache_metadata = dict(tree_flatten([cache_info, metadata, cache_classes]))
    mx.save_safetensors(file_name, cache_data, cache_metadata)


def load_prompt_cache(file_name: str, return_metadata: bool = False):
    """Load a prompt cache saved by `save_prompt_cache`."""
    arrays, cache_metadata = mx.load(file_name, return_metadata=True)
    arrays = tree_unflatten(list(arrays.items()))
    cache_metadata = tree_unflatten(list(cache_metadata.items()))
    info, metadata, classes = cache_metadata
    if not arrays:
        arrays = [[] for _ in classes]
    cache = [
        _cache_class(c).from_state(state, meta) for c, state, meta in zip(classes, arrays, info)
    ]
    if return_metadata:
        return cache, metadata
    return cache


def can_trim_prompt_cache(cache: List[Any]) -> bool:
    return all(c.is_trimmable() for c in cache)


def trim_prompt_cache(cache: List[Any], num_tokens: int) -> int:
    """Drop the last `num_tokens` tokens from every layer; returns how many were dropped."""
    if not can_trim_prompt_cache(cache) or len(cache) == 0:
        return 0
    return [c.trim(num_tokens) for c in cache][0]
