"""The decode matmul kernel (`mlx_lm.models.quantized_matmul`) against `mx.quantized_matmul`.

On this CPU-only CI the kernel's CUDA source runs in the emulator (tests/kernel_emulator.py,
tensor-core products emulated from their fragment layouts); on a CUDA GPU the kernel
itself runs (`python -m pytest tests/test_quantized_matmul.py`).
"""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from mlx_lm.models import quantized_matmul as qm
from mlx_lm.models import turboquant_kernels as kernels
from mlx_lm.utils import _get_classes, build_model

ON_CUDA = kernels.cuda_available() and mx.default_device().type is mx.gpu
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="needs MLX's CUDA backend")


def quantized(K, N, group_size, dtype=mx.float16, seed=0):
    mx.random.seed(seed)
    w = (0.02 * mx.random.normal((N, K))).astype(dtype)
    return mx.quantize(w, group_size=group_size, bits=4)


def relative_error(x, w, scales, biases, group_size, bias, y):
    """max |y - ref| / max |ref|, the reference being MLX's matmul in float32."""
    f32 = mx.float32
    ref = mx.quantized_matmul(
        x.astype(f32), w, scales.astype(f32), biases.astype(f32), True, group_size, 4
    )
    if bias is not None:
        ref = ref + bias.astype(f32)
    return (mx.abs(y.astype(f32) - ref).max() / mx.abs(ref).max()).item()


def check(M, K, N, group_size, with_bias, backend, dtype=mx.float16, lead=(), bound=2e-3):
    w, scales, biases = quantized(K, N, group_size, dtype)
    # An offset makes sum_k x large against sum_k q x: the bias term of (1) matters.
    x = (mx.random.normal((*lead, M, K)) + 0.3).astype(dtype)
    bias = mx.random.normal((N,)).astype(dtype) if with_bias else None
    y = qm.rows_matmul(x, w, scales, biases, group_size, bias, backend=backend)
    assert y.shape == (*lead, M, N) and y.dtype == dtype
    err = relative_error(x, w, scales, biases, group_size, bias, y)
    assert err <= bound, (M, K, N, group_size, with_bias, err)


@pytest.fixture(scope="module")
def emulated():
    import kernel_emulator

    kernel_emulator.register()
    return "emulate"


# (M, K, N, group size, bias): every group size, one to eight rows, one warp a tile
# and several (K / G groups over MIN_GROUPS_PER_WARP each), groups not a multiple of the
# warps' loads (U), and the bias.
EMULATED_CASES = [
    (1, 256, 32, 64, False),
    (3, 256, 32, 32, True),
    (8, 512, 16, 128, False),
    (5, 576, 48, 64, True),
    (2, 1024, 16, 32, False),
]


@pytest.mark.parametrize("c", EMULATED_CASES, ids=str)
def test_emulated_rows_kernel_matches_mlx(c, emulated):
    check(*c, backend=emulated)


def test_emulated_rows_kernel_keeps_leading_axes(emulated):
    check(1, 128, 16, 64, False, emulated, lead=(2,))


def test_warps_leave_each_enough_groups():
    assert qm.warps_per_tile(3584, 64) == 8  # 56 groups: 7 a warp
    assert qm.warps_per_tile(18944, 64) == 16
    assert qm.warps_per_tile(128, 64) == 1
    for k in (256, 1024, 3584, 4096, 18944):
        warps = qm.warps_per_tile(k, 32)
        assert warps == 1 or k // 32 >= qm.MIN_GROUPS_PER_WARP * warps


def test_supports_only_what_the_kernel_computes():
    w, scales, biases = quantized(256, 32, 64)
    x = mx.zeros((8, 256), mx.float16)
    assert qm.supports(x, w, scales, biases, 64, 4)
    assert not qm.supports(mx.zeros((9, 256), mx.float16), w, scales, biases, 64, 4)
    assert not qm.supports(x.astype(mx.float32), w, scales, biases, 64, 4)
    assert not qm.supports(x, w, scales.astype(mx.float32), biases, 64, 4)
    assert not qm.supports(x, w, scales, biases, 64, 8)
    assert not qm.supports(x, w, scales, None, 64, 4, "mxfp4")
    w16, s16, b16 = quantized(256, 24, 64)  # N not a multiple of the 16-row tile
    assert not qm.supports(x, w16, s16, b16, 64, 4)


def test_loaded_quantized_layers_dispatch_and_match_mlx():
    """build_model makes quantized layers `QuantizedLinear`; off CUDA (or past 8 rows)
    they compute what `nn.QuantizedLinear` does."""
    config = dict(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=1,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
        rms_norm_eps=1e-5,
        vocab_size=64,
        tie_word_embeddings=True,
        quantization={"group_size": 64, "bits": 4},
    )
    model_class, args_class = _get_classes(config)
    source = model_class(args_class.from_dict(config))
    nn.quantize(source, group_size=64, bits=4)
    model = build_model(config, dict(tree_flatten(source.parameters())))
    layer = model.layers[0].mlp.gate_proj
    assert type(layer) is qm.QuantizedLinear and isinstance(layer, nn.QuantizedLinear)
    embedding = model.model.embed_tokens
    assert type(embedding) is qm.QuantizedEmbedding
    x = mx.random.normal((1, 12, 128))
    if not ON_CUDA:
        assert mx.array_equal(layer(x), nn.QuantizedLinear.__call__(layer, x))
        assert mx.array_equal(embedding.as_linear(x), nn.QuantizedEmbedding.as_linear(embedding, x))


GPU_SHAPES = [(3584, 512, 64), (512, 256, 32), (1024, 4096, 128), (18944, 3584, 64)]


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
@pytest.mark.parametrize("M", [1, 3, 8])
def test_rows_kernel_matches_mlx_on_cuda(shape, M, dtype):
    # bfloat16's own rounding is 2^-9 of a value (MLX's kernel: 3e-3 to 7e-3 here).
    bound = 2e-3 if dtype == mx.float16 else 8e-3
    check(M, *shape, with_bias=M == 3, backend="cuda", dtype=dtype, lead=(1,), bound=bound)


@needs_cuda
def test_quantized_linear_runs_the_kernel_on_cuda(monkeypatch):
    w, scales, biases = quantized(1024, 256, 64)
    layer = qm.QuantizedLinear(1024, 256, bias=True, group_size=64, bits=4)
    layer.update({"weight": w, "scales": scales, "biases": biases})
    layer.set_dtype(mx.float16)
    x = mx.random.normal((4, 1, 1024)).astype(mx.float16)
    calls, launch = [], qm._launch
    monkeypatch.setattr(qm, "_launch", lambda *a: calls.append(1) or launch(*a))
    monkeypatch.setattr(qm, "COMPILE_CALLS", False)
    qm._CALLS.clear()
    y = layer(x)
    qm._CALLS.clear()
    assert calls, "the kernel did not run"
    ref = nn.QuantizedLinear.__call__(layer, x)
    assert (mx.abs(y - ref).max() / mx.abs(ref).max()).item() < 2e-3


@needs_cuda
@pytest.mark.parametrize("M", [1, 8])
def test_compiled_dispatch_matches_mlx_on_cuda(M):
    """The path decode takes: `quantized_matmul`'s compiled call per shape, made on the
    first call and reused on the second (its sizes are a constant of the compiled graph)."""
    assert qm.COMPILE_CALLS
    w, scales, biases = quantized(3584, 512, 64)
    bias = mx.random.normal((512,)).astype(mx.float16)
    qm._CALLS.clear()
    for seed in (1, 2):
        mx.random.seed(seed)
        x = mx.random.normal((M, 1, 3584)).astype(mx.float16)
        y = qm.quantized_matmul(x, w, scales, biases, 64, 4, bias=bias)
        assert qm._CALLS and all(callable(c) for c in qm._CALLS.values())
        assert relative_error(x, w, scales, biases, 64, bias, y) <= 2e-3
    qm._CALLS.clear()
