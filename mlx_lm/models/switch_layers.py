"""Mixture-of-experts building blocks over stacked expert weights.

Every expert's projection lives in one [num_experts, output_dims, input_dims] tensor, so a
token's top-k experts are applied with a single `mx.gather_mm` (or `mx.gather_qmm` once
quantized) instead of a Python loop over experts. Checkpoints that store one tensor per
expert (Hugging Face's `mlp.experts.E.gate_proj.weight`) are stacked by the model's
`sanitize`.
"""

import math
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

# Below this many (token, expert) pairs the sort costs more than it saves.
_SORT_THRESHOLD = 64


def _gather_sort(x: mx.array, indices: mx.array):
    """Order the (token, expert) pairs by expert, so that `gather_mm` reads each expert's
    weights once per contiguous run. Returns the reordered inputs, indices and the
    permutation that undoes the ordering."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    inverse = mx.argsort(order)
    x = x.flatten(0, -3)[order // k]
    return x, flat[order], inverse


def _scatter_unsort(x: mx.array, inverse: mx.array, shape) -> mx.array:
    """Undo `_gather_sort`: back to token order, shaped [*shape, 1, out]."""
    return x[inverse].reshape(*shape, *x.shape[1:])


class SwitchLinear(nn.Module):
    """`num_experts` linear layers, applied by index: weight [E, output_dims, input_dims]."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(
            low=-scale, high=scale, shape=(num_experts, output_dims, input_dims)
        )
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    @property
    def input_dims(self):
        return self.weight.shape[2]

    @property
    def output_dims(self):
        return self.weight.shape[1]

    @property
    def num_experts(self):
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        # x [..., 1, input_dims] with indices [...]: one matmul per (row, chosen expert).
        x = mx.gather_mm(
            x, self["weight"].swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_indices
        )
        if "bias" in self:
            x = x + mx.expand_dims(self["bias"][indices], -2)
        return x

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **kwargs):
        """The quantized twin, for `nn.quantize` (and so for the loader's quantized configs)."""
        return QuantizedSwitchLinear.from_switch_linear(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """`SwitchLinear` with affine-quantized weights (`mx.quantize` along input_dims)."""

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = False,
        group_size: int = 64,
        bits: int = 4,
        mode: str = "affine",
    ):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        scale = math.sqrt(1 / input_dims)
        w = mx.random.uniform(low=-scale, high=scale, shape=(num_experts, output_dims, input_dims))
        self.weight, self.scales, *biases = mx.quantize(
            w, group_size=group_size, bits=bits, mode=mode
        )
        if biases:
            self.biases = biases[0]
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))
        self.freeze()

    @classmethod
    def from_switch_linear(cls, layer: SwitchLinear, group_size=64, bits=4, mode="affine"):
        num_experts, output_dims, input_dims = layer.weight.shape
        ql = cls(input_dims, output_dims, num_experts, "bias" in layer, group_size, bits, mode)
        ql.weight, ql.scales, *biases = mx.quantize(
            layer.weight, group_size=group_size, bits=bits, mode=mode
        )
        if biases:
            ql.biases = biases[0]
        if "bias" in layer:
            ql.bias = layer.bias
        return ql

    @property
    def num_experts(self):
        return self.weight.shape[0]

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        x = mx.gather_qmm(
            x,
            self["weight"],
            self["scales"],
            self.get("biases"),
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
            sorted_indices=sorted_indices,
        )
        if "bias" in self:
            x = x + mx.expand_dims(self["bias"][indices], -2)
        return x


class SwitchGLU(nn.Module):
    """The gated (SwiGLU) expert MLP, `down(act(gate(x)) * up(x))`, for each of a token's
    chosen experts. Weights: gate_proj/up_proj [E, hidden, input], down_proj [E, input,
    hidden]."""

    def __init__(
        self,
        input_dims: int,
        hidden_dims: int,
        num_experts: int,
        activation: Callable[[mx.array], mx.array] = nn.silu,
        bias: bool = False,
    ):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias=bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias=bias)
        self.activation = activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x [..., input_dims], indices [..., k] (int) -> [..., k, input_dims]."""
        # Each token row becomes a [1, input_dims] matrix, broadcast over its k experts.
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= _SORT_THRESHOLD
        idx, inverse = indices, None
        if do_sort:
            x, idx, inverse = _gather_sort(x, indices)
        h = self.activation(self.gate_proj(x, idx, do_sort)) * self.up_proj(x, idx, do_sort)
        out = self.down_proj(h, idx, do_sort)
        if do_sort:
            out = _scatter_unsort(out, inverse, indices.shape)
        return out.squeeze(-2)
