"""Shared pieces of every architecture: argument dataclasses, masks, attention."""

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx

from .cache import QuantizedKVCache
from .turboquant_attention import turboquant_scaled_dot_product_attention
from .turboquant_cache import TurboQuantCodec
from .turboquant_kernels import cuda_available


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params):
        """Build the dataclass from a config dict, ignoring keys it does not name."""
        fields = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in fields})


def create_causal_mask(
    N: int,
    offset: int = 0,
    window_size: Optional[int] = None,
    lengths: Optional[mx.array] = None,
):
    """Boolean [N, offset + N] mask: query i (at position offset + i) sees key j
    when j <= offset + i and, with a window, offset + i - j < window_size."""
    rinds = mx.arange(offset + N)
    linds = mx.arange(offset, offset + N) if offset else rinds
    linds = linds[:, None]
    rinds = rinds[None]
    mask = linds >= rinds
    if window_size is not None:
        mask = mask & (linds < rinds + window_size)
    if lengths is not None:
        lengths = lengths[:, None, None, None]
        mask = mask & (rinds < lengths)
    return mask


def create_attention_mask(
    h: mx.array,
    cache: Optional[Any] = None,
    window_size: Optional[int] = None,
    return_array: bool = False,
):
    """The mask for the hidden states `h` ([B, N, D]) attending through `cache`.

    Returns None for a single query, the string "causal" where the fused kernel can
    build the mask itself, or a boolean array (windows, rotating caches)."""
    N = h.shape[1]
    if cache is not None and hasattr(cache, "make_mask"):
        return cache.make_mask(N, window_size=window_size, return_array=return_array)
    if N == 1:
        return None
    if return_array or window_size is not None:
        return create_causal_mask(N, 0, window_size=window_size)
    return "causal"


def _no_quantized_matmul() -> bool:
    """True on MLX's CUDA backend, whose quantized_matmul lacks the attention shapes."""
    return mx.default_device() == mx.gpu and cuda_available()


def quantized_scaled_dot_product_attention(
    queries: mx.array,
    q_keys: tuple,
    q_values: tuple,
    scale: float,
    mask: Optional[mx.array],
    group_size: int = 64,
    bits: int = 8,
    dequantize: Optional[bool] = None,
) -> mx.array:
    """Attention over an affine-quantized cache (upstream's `kv_bits` path).

    Keys and values are (packed, scales, biases) triples; `mx.quantized_matmul` scores
    and aggregates without dequantizing. Query heads are grouped over KV heads (GQA).
    Where `quantized_matmul` has no kernel (the CUDA backend; `dequantize=None` picks by
    device), the cache is dequantized layer by layer instead.
    """
    if dequantize is None:
        dequantize = _no_quantized_matmul()
    if dequantize:
        # MLX's CUDA backend has no quantized_matmul for these shapes: dequantize into a
        # transient buffer (freed after this layer) and use the fused SDPA instead.
        keys = mx.dequantize(*q_keys, group_size=group_size, bits=bits)
        values = mx.dequantize(*q_values, group_size=group_size, bits=bits)
        return mx.fast.scaled_dot_product_attention(
            queries,
            keys.astype(queries.dtype),
            values.astype(queries.dtype),
            scale=scale,
            mask=mask,
        )
    B, n_q_heads, L, D = queries.shape
    n_kv_heads = q_keys[0].shape[-3]
    n_repeats = n_q_heads // n_kv_heads

    queries = queries * scale  # not *=: that would scale the caller's array in place
    if n_repeats > 1:
        queries = mx.reshape(queries, (B, n_kv_heads, n_repeats, L, D))
        q_keys = tuple(mx.expand_dims(x, axis=-3) for x in q_keys)
        q_values = tuple(mx.expand_dims(x, axis=-3) for x in q_values)

    scores = mx.quantized_matmul(queries, *q_keys, transpose=True, group_size=group_size, bits=bits)
    if mask is not None:
        if isinstance(mask, str):
            qL, kL = scores.shape[-2:]
            mask = create_causal_mask(qL, kL - qL)
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        else:
            scores += mask
    scores = mx.softmax(scores, axis=-1, precise=True)
    out = mx.quantized_matmul(scores, *q_values, transpose=False, group_size=group_size, bits=bits)
    if n_repeats > 1:
        out = mx.reshape(out, (B, n_q_heads, L, D))
    return out


def scaled_dot_product_attention(
    queries: mx.array,
    keys,
    values,
    cache,
    scale: float,
    mask: Optional[Any],
    sinks: Optional[mx.array] = None,
) -> mx.array:
    """The one dispatch point for attention: the cache type decides the kernel.

    `keys`/`values` are what `cache.update_and_fetch` returned. Caches that keep
    their context compressed get their own attention (dispatched on the cache class);
    everything else goes to `mx.fast.scaled_dot_product_attention`.
    """
    if isinstance(cache, TurboQuantCodec):
        return turboquant_scaled_dot_product_attention(queries, cache, scale, mask)
    if isinstance(cache, QuantizedKVCache):
        return quantized_scaled_dot_product_attention(
            queries,
            keys,
            values,
            scale=scale,
            mask=mask,
            group_size=cache.group_size,
            bits=cache.bits,
        )
    return mx.fast.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask, sinks=sinks
    )
