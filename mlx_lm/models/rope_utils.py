"""Rotary position embeddings and the scaled variants Hugging Face configs name.

`initialize_rope` maps a config's `rope_scaling` (or, in transformers >= 5, its
`rope_parameters`) to a module called as `rope(x, offset=cache_offset)` on tensors shaped
[B, n_heads, L, head_dim]. Scaled variants compute their frequencies once, the way
transformers' `modeling_rope_utils` does, and hand them to `mx.fast.rope(freqs=...)`.
Note `mx.fast.rope`'s `freqs` are periods (base ** (2i / dims)), the inverse of HF's
`inv_freq`.
"""

import math
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _base_periods(dims: int, base: float) -> mx.array:
    """base ** (2i / dims) for i < dims / 2 (float32): the unscaled RoPE periods."""
    return base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)


class Llama3RoPE(nn.Module):
    """Llama 3.1's RoPE: long wavelengths slowed by `factor`, short ones untouched and a
    smooth blend in between (HF `_compute_llama3_parameters`)."""

    def __init__(
        self,
        dims: int,
        max_position_embeddings: Optional[int] = None,
        traditional: bool = False,
        base: float = 10000,
        scaling_config: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        factor = scaling_config["factor"]
        low_freq_factor = scaling_config.get("low_freq_factor", 1.0)
        high_freq_factor = scaling_config.get("high_freq_factor", 4.0)
        old_context_len = scaling_config.get(
            "original_max_position_embeddings", max_position_embeddings or 8192
        )
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor

        periods = _base_periods(dims, base)
        wavelens = 2 * math.pi * periods
        # Long wavelengths: divide the frequency by `factor` (multiply the period).
        periods = mx.where(wavelens > low_freq_wavelen, periods * factor, periods)
        # Medium wavelengths: interpolate the frequency between scaled and unscaled.
        is_medium = (wavelens >= high_freq_wavelen) & (wavelens <= low_freq_wavelen)
        smooth = (old_context_len / wavelens - low_freq_factor) / (
            high_freq_factor - low_freq_factor
        )
        smoothed = periods / ((1 - smooth) / factor + smooth)
        self._freqs = mx.where(is_medium, smoothed, periods)

    def extra_repr(self):
        return f"{self.dims}, traditional={self.traditional}"

    def __call__(self, x, offset: int = 0):
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


class YarnRoPE(nn.Module):
    """YaRN: frequencies blended between interpolated and extrapolated by a linear ramp
    over the dimensions, and cos/sin scaled by an attention factor (HF
    `_compute_yarn_parameters`). Scaling cos and sin by m equals scaling the rotated
    input by m, which is what we do."""

    def __init__(
        self,
        dims: int,
        traditional: bool = False,
        base: float = 10000,
        scaling_config: Optional[Dict[str, Any]] = None,
        max_position_embeddings: Optional[int] = None,
    ):
        super().__init__()
        self.dims = dims
        self.traditional = traditional
        original_max = scaling_config.get("original_max_position_embeddings")
        factor = scaling_config.get("factor")
        if factor is None:
            if original_max is None or max_position_embeddings is None:
                raise ValueError(
                    "yarn rope_scaling needs 'factor' (or both 'original_max_position_embeddings' "
                    "and max_position_embeddings to derive it)."
                )
            factor = max_position_embeddings / original_max
        if original_max is None:
            raise ValueError("yarn rope_scaling needs 'original_max_position_embeddings'.")

        def get_mscale(scale, mscale=1.0):
            return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

        attention_factor = scaling_config.get("attention_factor")
        mscale = scaling_config.get("mscale")
        mscale_all_dim = scaling_config.get("mscale_all_dim")
        if attention_factor is None:
            if mscale and mscale_all_dim:
                attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
            else:
                attention_factor = get_mscale(factor)
        self.mscale = float(attention_factor)

        beta_fast = scaling_config.get("beta_fast") or 32
        beta_slow = scaling_config.get("beta_slow") or 1
        truncate = scaling_config.get("truncate", True)

        def correction_dim(num_rotations):
            return (dims * math.log(original_max / (num_rotations * 2 * math.pi))) / (
                2 * math.log(base)
            )

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dims - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = mx.clip((mx.arange(dims // 2, dtype=mx.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp  # weight of the unscaled frequency

        periods = _base_periods(dims, base)
        inv_freq = (1 / (factor * periods)) * (1 - extrapolation) + (1 / periods) * extrapolation
        self._freqs = 1 / inv_freq

    def extra_repr(self):
        return f"{self.dims}, traditional={self.traditional}, mscale={self.mscale}"

    def __call__(self, x, offset: int = 0):
        if self.mscale != 1.0:
            x = mx.concatenate([x[..., : self.dims] * self.mscale, x[..., self.dims :]], axis=-1)
        return mx.fast.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._freqs,
        )


def rope_type_of(scaling_config: Optional[Dict[str, Any]]) -> str:
    """The rope type a scaling dict names ("rope_type", or the older "type")."""
    if not scaling_config:
        return "default"
    return scaling_config.get("rope_type", scaling_config.get("type", "default")) or "default"


def initialize_rope(
    dims: int,
    base: float,
    traditional: bool,
    scaling_config: Optional[Dict[str, Any]] = None,
    max_position_embeddings: Optional[int] = None,
) -> nn.Module:
    """The RoPE module for `dims` rotated dimensions, base `base` and the HF scaling
    dict `scaling_config` (None or rope_type "default" for plain RoPE)."""
    rope_type = rope_type_of(scaling_config)
    if rope_type == "default":
        return nn.RoPE(dims, traditional=traditional, base=base)
    if rope_type == "linear":
        # Linear position interpolation: positions (equivalently frequencies) / factor.
        return nn.RoPE(dims, traditional=traditional, base=base, scale=1 / scaling_config["factor"])
    if rope_type == "llama3":
        return Llama3RoPE(
            dims,
            max_position_embeddings=max_position_embeddings,
            traditional=traditional,
            base=base,
            scaling_config=scaling_config,
        )
    if rope_type == "yarn":
        return YarnRoPE(
            dims,
            traditional=traditional,
            base=base,
            scaling_config=scaling_config,
            max_position_embeddings=max_position_embeddings,
        )
    raise ValueError(
        f"Unsupported rope_type '{rope_type}' in the config's rope_scaling/rope_parameters. "
        f"Supported: {', '.join(SUPPORTED_ROPE_TYPES)}."
    )


def split_rope_parameters(
    rope_parameters: Optional[Dict[str, Any]],
    rope_theta: float,
    rope_scaling: Optional[Dict[str, Any]],
) -> Tuple[float, Optional[Dict[str, Any]]]:
    """Reconcile the two ways configs give RoPE settings.

    transformers < 5 writes `rope_theta` and `rope_scaling`; transformers >= 5 writes one
    `rope_parameters` dict holding `rope_theta` and the scaling keys. Returns
    (theta, scaling dict or None for plain RoPE).
    """
    if rope_parameters:
        rope_theta = rope_parameters.get("rope_theta", rope_theta)
        if rope_scaling is None and rope_type_of(rope_parameters) != "default":
            rope_scaling = dict(rope_parameters)
    if rope_type_of(rope_scaling) == "default":
        rope_scaling = None
    return rope_theta, rope_scaling
