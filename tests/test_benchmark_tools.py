"""The kernel tools in benchmarks/: what they refuse, and what they build."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(REPO, "benchmarks", name + ".py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_bench_variant_names_an_unknown_constant():
    bench = load("attention_bench")
    with pytest.raises(SystemExit, match="no constant NOPE"):
        bench.with_constants(lambda: None, "NOPE=1")
    from mlx_lm.models import turboquant_kernels as kernels

    seen = []
    f = bench.with_constants(
        lambda: seen.append((kernels.TENSOR_CORES, kernels.TARGET_GROUPS)),
        "TENSOR_CORES=0,TARGET_GROUPS=64",
    )
    f()
    assert seen == [(False, 64)]
    assert kernels.TENSOR_CORES is True and kernels.TARGET_GROUPS != 64  # restored


def test_kernel_resources_builds_every_decode_kernel_and_says_when_nvcc_is_missing(monkeypatch):
    resources = load("kernel_resources")
    plans = resources.decode_plans()
    assert [label for label, _ in plans] == ["qwen2.5-7b mma", "qwen2.5-7b per-lane", "gemma3 mma"]
    source = resources.translation_unit(plans[0][1])
    assert 'extern "C" __global__ void turboquant_decode_partial(const __half* q' in source
    assert "constexpr int MMA = 1;" in source
    monkeypatch.setattr(resources.shutil, "which", lambda name: None)
    monkeypatch.setattr(resources.os.path, "exists", lambda path: False)
    with pytest.raises(SystemExit, match="needs CUDA's nvcc"):
        resources.compile_report(source, "sm_90")
