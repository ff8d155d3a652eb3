"""The kernel tools in benchmarks/: what they refuse, and what they build."""

import importlib.util
import os

import mlx.core as mx
import numpy as np
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


def test_attention_bench_chains_its_calls():
    """The timed attention calls depend on each other, as a model's layers do (each
    query the previous call's output), so a GPU cannot overlap them."""
    bench = load("attention_bench")
    seen = []

    def attend(x):
        seen.append(x)
        return x * 2

    out = bench.chained(attend, mx.array(1.0), 4)
    assert out.item() == 16 and [x.item() for x in seen] == [1, 2, 4, 8]
    assert bench.per_call_us(attend, mx.array(1.0), 3, 2) > 0


def test_kernel_resources_builds_every_decode_kernel_and_says_when_nvcc_is_missing(monkeypatch):
    resources = load("kernel_resources")
    plans = resources.decode_plans()
    assert [label for label, _ in plans] == [
        "qwen2.5-7b mma",
        "qwen2.5-7b mma, long calls",
        "qwen2.5-7b per-lane",
        "gemma3 mma",
    ]
    source = resources.translation_unit(plans[0][1])
    assert 'extern "C" __global__ void turboquant_decode_partial(const __half* q' in source
    assert "constexpr int MMA = 1;" in source and "__launch_bounds__" not in source
    assert "__launch_bounds__(128, 4)" in resources.translation_unit(plans[1][1])
    assert "constexpr int MMA = 0;" in resources.translation_unit(plans[2][1])
    monkeypatch.setattr(resources.shutil, "which", lambda name: None)
    monkeypatch.setattr(resources.os.path, "exists", lambda path: False)
    with pytest.raises(SystemExit, match="needs CUDA's nvcc"):
        resources.compile_report(source, "sm_90")


def test_host_bench_times_the_fused_path_and_restores_the_dispatch(tmp_path):
    """host_bench drives the fused kernels' host code (stand-in kernels made through
    `_specialised`), then puts the backend dispatch back as it was."""
    from mlx_lm.models import turboquant_attention, turboquant_cache
    from mlx_lm.models import turboquant_kernels as kernels

    before = turboquant_attention.fused_backend, turboquant_cache.fused_backend
    kernels._decode_kernels.cache_clear()
    out = tmp_path / "host.md"
    load("host_bench").main(
        ["--context", "300", "--calls", "20", "--rounds", "1", "--output", str(out)]
    )
    assert kernels._decode_kernels.cache_info().currsize == 1  # the fused path ran
    assert (turboquant_attention.fused_backend, turboquant_cache.fused_backend) == before
    assert "| fp16 | tq3 | tq3 / fp16 |" in out.read_text()


def test_host_bench_times_each_prefill_chunk(tmp_path, capsys):
    """With --prefill-step, host_bench builds a chunked prefill's graphs through the
    fused path (the dequantize stand-in runs) and reports every chunk."""
    from mlx_lm.models import turboquant_kernels as kernels

    before = kernels._specialised.cache_info().hits + kernels._specialised.cache_info().misses
    out = tmp_path / "prefill.md"
    load("host_bench").main(
        ["--context", "600", "--prefill-step", "256", "--rounds", "1", "--heads", "4"]
        + ["--kv-heads", "2", "--head-dim", "64", "--output", str(out)]
    )
    info = kernels._specialised.cache_info()
    assert info.hits + info.misses > before  # stand-in kernels were asked for
    text = out.read_text()
    assert "| config | chunk 0 | chunk 1 | chunk 2 | all |" in text
    assert "| fp16 |" in text and "| tq3 |" in text and "tq3 / fp16 in all" in text
    for bad in ("0", "-5", "700"):
        with pytest.raises(SystemExit):
            load("host_bench").main(["--context", "600", "--prefill-step", bad])
        assert f"--prefill-step must be a chunk length from 1 to --context (600), got {bad}" in (
            capsys.readouterr().err
        )


def test_host_bench_times_update_and_attention_inside_a_model(tmp_path):
    """With --in-model, host_bench times each layer's cache update and attention inside
    decode steps of a small model, through the fused path (the decode kernels' stand-ins
    are asked for), and puts the model's attention back as it was."""
    from mlx_lm.models import qwen2
    from mlx_lm.models import turboquant_kernels as kernels

    attention = qwen2.scaled_dot_product_attention
    kernels._decode_kernels.cache_clear()
    out = tmp_path / "in_model.md"
    load("host_bench").main(
        ["--context", "300", "--in-model", "2", "--calls", "100", "--rounds", "1"]
        + ["--heads", "4", "--kv-heads", "2", "--head-dim", "64", "--output", str(out)]
    )
    assert kernels._decode_kernels.cache_info().currsize == 1  # the fused path ran
    assert qwen2.scaled_dot_product_attention is attention
    text = out.read_text()
    assert "inside the decode steps of a 2-layer model" in text
    for part in ("update", "attention", "step built"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {part} |"))
        fp16, tq3 = (float(x) for x in row.split("|")[2:4])
        assert fp16 > 0 and tq3 > 0
    row = next(line for line in text.splitlines() if line.startswith("| kernels' call |"))
    assert float(row.split("|")[3]) > 0  # the decode call's timer was on the fused path
    assert kernels._decode_call.__name__ == "_decode_call"  # put back
    assert "| step launched |" not in text  # stand-in kernels: nothing launched


def test_host_bench_refuses_real_kernels_without_a_gpu_or_a_model(capsys):
    with pytest.raises(SystemExit):
        load("host_bench").main(["--context", "300", "--real-kernels"])
    assert "--real-kernels times the real decode kernels inside a model" in (
        capsys.readouterr().err
    )


def test_step_split_times_every_part_of_a_decode_step(tmp_path):
    """step_split writes one row per context and config, FP16's ratio 1.00x, and refuses
    a table without FP16 to compare with."""
    split = load("step_split")
    with pytest.raises(SystemExit, match="must include fp16"):
        split.main(["--model", "random:smollm2-135m", "--configs", "tq3"])
    out = tmp_path / "split.md"
    args = ["--model", "random:smollm2-135m", "--dequantize", "--contexts", "40"]
    split.main(args + ["--steps", "2", "--rounds", "1", "--output", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 40 ")]
    assert [r[1] for r in rows] == ["fp16", "tq3"] and rows[0][3] == "1.00x"
    assert all(float(x) > 0 for r in rows for x in (r[2], r[4], r[6].rstrip(" |")))
    assert all(float(r[5]) >= 0 for r in rows)  # launch: on the CPU it may round to 0


def test_step_split_decodes_after_a_synthetic_fill(tmp_path, monkeypatch):
    """With --synthetic, the caches are filled by kv_bench's synthetic fill (no prefill
    runs the model) before the steps are split."""
    split = load("step_split")
    filled = []
    fill = split.synthetic_fill
    monkeypatch.setattr(
        split, "synthetic_fill", lambda *a: filled.append(a[3]) or fill(*a)  # the context
    )
    monkeypatch.setattr(split, "prefilled", None)  # a prefill would fail
    out = tmp_path / "split.md"
    args = ["--model", "random:smollm2-135m", "--dequantize", "--contexts", "40", "--synthetic"]
    split.main(args + ["--steps", "2", "--rounds", "1", "--output", str(out)])
    assert filled == [40, 40]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 40 ")]
    assert [r[1] for r in rows] == ["fp16", "tq3"]


def test_step_split_splits_a_chunked_prefill(tmp_path, monkeypatch):
    """step_split --prefill sums each chunk's build, launch and wait over a prefill
    (timed after a warm-up prefill of one chunk), its total their sum."""
    split = load("step_split")
    chunks, model = [], split.load_bench_model("random:smollm2-135m", True)

    class Counted:  # the model, counting the tokens of each call
        def __getattr__(self, name):
            return getattr(model, name)

        def __call__(self, tokens, cache):
            chunks.append(tokens.shape[1])
            return model(tokens, cache=cache)

    monkeypatch.setattr(split, "load_bench_model", lambda *a: Counted())
    out = tmp_path / "split.md"
    args = ["--model", "random:smollm2-135m", "--dequantize", "--contexts", "40", "--prefill"]
    split.main(args + ["--prefill-step-size", "16", "--rounds", "1", "--output", str(out)])
    # per config: a warm-up prefill of one chunk, then 40 tokens in chunks of 16
    assert chunks == [16, 16, 16, 8] * 2
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 40 ")]
    assert [r[1] for r in rows] == ["fp16", "tq3"] and rows[0][3] == "1.00x"
    for r in rows:
        total, build, launch, wait = (float(x.rstrip(" |")) for x in (r[2], r[4], r[5], r[6]))
        assert build > 0 and wait >= 0 and abs(total - (build + launch + wait)) < 0.02


def test_kernel_trace_sums_device_time_per_step():
    """kernel_trace's summary of a Chrome trace: GPU events only, per step, by name."""
    trace = load("kernel_trace")
    events = [
        {"cat": "kernel", "name": "void mlx::core::cu::qmv<8>(float*)", "ts": 0.0, "dur": 30.0},
        {"cat": "kernel", "name": "void mlx::core::cu::qmv<8>(float*)", "ts": 50.0, "dur": 10.0},
        # runs while the second qmv does: 4 of its 6 µs add to the busy time
        {"cat": "kernel", "name": "custom_kernel_turboquant_merge(f)", "ts": 58.0, "dur": 6.0},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 100.0, "dur": 2.0},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0.0, "dur": 500.0},  # host
    ]
    count, ms, busy, rows = trace.summarize(events, steps=2, top=2)
    assert count == 2.0 and ms == (30 + 10 + 6 + 2) / 2 / 1e3
    assert busy == (30 + 10 + 4 + 2) / 2 / 1e3
    assert rows == [("qmv<8>", 1.0, 20.0, 20.0), ("turboquant_merge", 0.5, 3.0, 6.0)]
    with pytest.raises(SystemExit, match="must include fp16"):
        trace.main(["--model", "random:smollm2-135m", "--configs", "tq3"])
    with pytest.raises(SystemExit, match="for decode traces: drop --prefill"):
        trace.main(["--model", "random:smollm2-135m", "--prefill", "--batch", "8"])
    if getattr(mx, "cuda", None) is None or not mx.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA"):
            trace.main(["--model", "random:smollm2-135m"])


def test_paired_decode_rotates_blocks_and_pairs_them(tmp_path):
    """paired_decode runs every config's block once a round, the first config of each
    round rotating, and pairs each block with FP16's of the same round; its table gives
    FP16 1.000x and refuses what it cannot compare or prefill."""
    paired = load("paired_decode")
    ran = []

    def stepper(name):
        def step(y):
            ran.append(name)
            return y + 1

        return [step, mx.zeros((2,), mx.uint32)]

    steppers = {n: stepper(n) for n in ("fp16", "tq3", "tq4")}
    rates = paired.block_rates(steppers, blocks=4, block_steps=2)
    firsts = [ran[6 * b] for b in range(4)]  # 3 configs x 2 steps a round
    assert firsts == ["fp16", "tq3", "tq4", "fp16"] and len(ran) == 24
    assert all(len(r) == 4 for r in rates.values()) and steppers["tq3"][1].tolist() == [8, 8]
    # Paired by round: a config twice as fast as FP16 in every round is 2x, however the
    # rounds' speeds move; the quartiles are those of the rounds' ratios (2, 1, 0.5, 1
    # here: the medians of the speeds alone would say 0.9x).
    ratios = paired.paired_ratios({"fp16": [1, 10, 3, 7], "tq3": [2, 20, 6, 14]})
    assert ratios["tq3"] == (2.0, 2.0, 2.0) and ratios["fp16"] == (1.0, 1.0, 1.0)
    ratios = paired.paired_ratios({"fp16": [1, 10, 3, 7], "tq3": [2, 10, 1.5, 7]})
    assert ratios["tq3"] == pytest.approx((0.625, 1.0, 1.75))

    with pytest.raises(SystemExit, match="must include fp16"):
        paired.main(["--model", "random:smollm2-135m", "--configs", "tq3"])
    with pytest.raises(SystemExit, match="drop --batch or --prefill"):
        paired.main(["--model", "random:smollm2-135m", "--prefill", "--batch", "2"])
    out = tmp_path / "paired.md"
    args = ["--model", "random:smollm2-135m", "--dequantize", "--contexts", "40", "--batch", "2"]
    paired.main(args + ["--blocks", "2", "--block-steps", "1", "--output", str(out)])
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| 40 ")]
    assert [r[1] for r in rows] == ["fp16", "tq3"] and rows[0][3] == "1.000x"
    assert float(rows[1][2]) > 0 and float(rows[1][3].rstrip("x")) > 0


def test_kernel_phases_marks_the_partial_kernel_and_reads_the_marks_back():
    """The marks go in after each phase's barrier (the body's text they follow must still
    be there), and the table's phases and spans come out of the stored marks."""
    phases = load("kernel_phases")
    from mlx_lm.models import turboquant_kernels as kernels

    marked = phases.with_marks(kernels.PARTIAL_BODY)
    for k in range(7):
        assert marked.count(f"tqc[{k}] = clock64();") == 1
    # Each mark follows the barrier that ends its phase, in order.
    at = [marked.index(f"tqc[{k}] = clock64();") for k in range(7)]
    assert at == sorted(at)
    assert marked.index("// Merge the warps") < at[5]
    with pytest.raises(ValueError, match="no longer has"):
        phases.with_marks(kernels.PARTIAL_BODY.replace("const int e = i % D;", "int e = i % D;"))

    # Two calls of two groups; clock 2 GHz: 2,000 cycles a µs, 1,000 ns a µs.
    D = 16
    calls = []
    for start in (5_000_000, 9_000_000):
        out = np.zeros((2, 1, 1, D), np.float32)
        for g, lag in enumerate((0, 1000)):
            marks = [2000 * k for k in (1, 2, 3, 4, 5, 6)]  # 1 µs each phase
            t0, t1 = start + lag, start + lag + 6000
            out[g, 0, 0, :10] = marks + [t0 >> 20, t0 & 0xFFFFF, t1 >> 20, t1 & 0xFFFFF]
        calls.append(phases.group_marks(out, D))
    per_phase, group, span = phases.summarize(calls)
    assert np.allclose(per_phase, 1.0) and group == pytest.approx(6.0)
    assert span == pytest.approx(7.0)  # the second group starts 1 µs later
    if kernels.fused_backend() != "cuda":  # the CPU CI: the tool says what it needs
        with pytest.raises(SystemExit, match="needs MLX's CUDA backend"):
            phases.main(["--contexts", "1024"])


def test_kernel_ab_swaps_the_decode_kernels_sources_and_names(tmp_path):
    """A variant's HEADER, PARTIAL_BODY, MERGE_BODY and CUDA_PRELUDE are read from its
    file and build the decode kernels under names of their own; None restores the
    module's."""
    ab = load("kernel_ab")
    from mlx_lm.models import turboquant_kernels as kernels

    with open(kernels.__file__) as f:
        text = f.read()
    marked = text.replace("constexpr int NW = NT / 32;", "constexpr int NW = NT / 32;  // probe")
    assert marked != text
    path = tmp_path / "variant.py"
    path.write_text(marked)
    sources = ab.sources_of(str(path))
    assert set(sources) == set(ab.SWAPPED)
    assert "// probe" in sources["PARTIAL_BODY"] and sources["MERGE_BODY"] == kernels.MERGE_BODY
    try:
        ab.use("probe", sources)
        assert "// probe" in kernels.kernel_sources("cuda")[1]
        names = [k[0] for k in kernels.KERNELS]
        assert names[:2] == ["turboquant_decode_partial_probe", "turboquant_decode_merge_probe"]
        assert names[2:] == [k[0] for k in ab.MAIN_KERNELS[2:]]
    finally:
        ab.use(None, ab.MAIN)
    assert kernels.KERNELS is ab.MAIN_KERNELS and kernels.PARTIAL_BODY == ab.MAIN["PARTIAL_BODY"]

    (tmp_path / "other.py").write_text("HEADER = 'x'\n")
    with pytest.raises(SystemExit, match="assigns no PARTIAL_BODY, MERGE_BODY"):
        ab.sources_of(str(tmp_path / "other.py"))
    with pytest.raises(SystemExit, match="give NAME=PATH"):
        ab.main(["--model", "random:qwen2.5-7b", "--variant", str(path)])
    if kernels.fused_backend() != "cuda":  # the CPU CI: the tool says what it needs
        with pytest.raises(SystemExit, match="needs MLX's CUDA backend"):
            ab.main(["--model", "random:qwen2.5-7b", "--variant", f"probe={path}"])


def test_matmul_bench_says_what_it_needs():
    from mlx_lm.models import turboquant_kernels as kernels

    bench = load("matmul_bench")
    for rows in ("9", "0"):
        with pytest.raises(SystemExit, match="1 to 8 rows"):
            bench.main(["--rows", rows])
    if kernels.fused_backend() != "cuda":  # the CPU CI
        with pytest.raises(SystemExit, match="needs MLX's CUDA backend"):
            bench.main(["--rows", "1"])
