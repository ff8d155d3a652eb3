"""Device time of each kernel of a decode step, FP16 cache vs TurboQuant (CUDA GPUs).

Wall-clock ratios of batch-1 steps move by 0.2x from run to run (the host builds and
launches every op), so they cannot tell a kernel change that saves 10 µs a layer. This
records what the GPU itself ran: PyTorch's profiler (CUPTI, which sees every CUDA kernel
of the process, MLX's included) over `--steps` pipelined greedy steps after a prompt of
each context, then per config the kernels per step, their summed device time per step
(ms; "vs fp16" is FP16's over this), the time the GPU was busy (the union of the
kernels' intervals: MLX's CUDA graph runs independent kernels at once, whose summed
durations count the overlap twice) and the `--top` kernels by time (µs per step and
per launch). Needs torch with CUDA next to MLX's CUDA backend (the GPU machine has both).

With `--prefill`, the same over one chunked prefill of each context (per prefill, not
per step): with step_split.py's `--prefill` wall-clock split, it tells a prefill's gap to
FP16 on the device from the one on the host.

    python benchmarks/kernel_trace.py --model random:qwen2.5-7b --contexts 1024 16384 \\
        --steps 16 --output trace.md
    python benchmarks/kernel_trace.py --model random:qwen2.5-7b --contexts 4096 16384 \\
        --prefill --top 10
"""

import collections
import json
import os
import re
import sys
import tempfile

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import CONFIGS, load_bench_model, print_table  # noqa: E402
from step_split import (  # noqa: E402
    config_parser,
    decode_start,
    parse_against_fp16,
    pipelined,
    split_prefill,
)


def kernel_name(name: str) -> str:
    """A kernel's name without namespaces, return type and arguments, at most 70 chars."""
    name = re.sub(r"^void ", "", name).split("(")[0]
    name = re.sub(r"\b(mlx::core::cu::|cutlass::|custom_kernel_)", "", name)
    return name[:70]


def busy_us(gpu) -> float:
    """µs during which at least one of the GPU events ran: their intervals' union. Less
    than the summed durations where kernels overlap (a CUDA graph runs independent
    kernels at once: the attention's first kernel needs only the queries, not the
    step's new keys and values)."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in gpu):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def summarize(events, steps: int, top: int):
    """(kernels per step, device ms per step, busy ms per step (`busy_us`), [(name,
    launches per step, µs per step, µs per launch)] of the `top` kernels by time) of a
    Chrome trace's GPU events."""
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    by_name = collections.defaultdict(lambda: [0, 0.0])
    for e in gpu:
        entry = by_name[kernel_name(e["name"])]
        entry[0] += 1
        entry[1] += e["dur"]
    rows = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:top]
    rows = [(n, c / steps, us / steps, us / c) for n, (c, us) in rows]
    device_ms = sum(e["dur"] for e in gpu) / steps / 1e3
    return len(gpu) / steps, device_ms, busy_us(gpu) / steps / 1e3, rows


def traced(run):
    """The Chrome-trace events of the GPU work `run()` does."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.zeros(1, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        mx.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            return json.load(f)["traceEvents"]


def traced_steps(model, config: dict, context: int, steps: int, batch=1, synthetic=False):
    """The Chrome-trace events of `steps` pipelined decode steps after the prompt (or a
    synthetic fill of `batch` sequences)."""
    step, y = decode_start(model, config, context, batch, synthetic)
    for _ in range(4):  # untimed: compiles kernels for new shapes
        y = step(y)
        mx.eval(y)

    return traced(lambda: pipelined(step, y, steps))


def traced_prefill(model, config: dict, context: int, prefill_step: int):
    """The Chrome-trace events of one prefill of `context` tokens in chunks."""
    split_prefill(model, config, min(context, prefill_step), prefill_step)  # compiles
    return traced(lambda: split_prefill(model, config, context, prefill_step))


def main(argv=None):
    p = config_parser(__doc__.splitlines()[0], dequantize=False)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--top", type=int, default=6, help="kernels listed per config")
    p.add_argument("--prefill", action="store_true", help="trace chunked prefills instead")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="decode: sequences per step")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="decode: fill the caches with random keys and values (kv_bench's synthetic "
        "fill) instead of prefilling; always so at batch > 1",
    )
    args = parse_against_fp16(p, argv)
    if args.prefill and (args.synthetic or args.batch > 1):
        raise SystemExit("--synthetic and --batch are for decode traces: drop --prefill.")
    cuda = getattr(mx, "cuda", None)
    if cuda is None or not cuda.is_available():
        raise SystemExit("kernel_trace needs MLX's CUDA backend on a CUDA GPU (and torch).")

    model = load_bench_model(args.model, False)
    if args.prefill:
        what, unit, per = f"one prefill in chunks of {args.prefill_step_size}", "prefill", 1

        def events_of(config, context):
            return traced_prefill(model, config, context, args.prefill_step_size)

    else:
        synthetic = args.synthetic or args.batch > 1  # no batched prefill here
        fill = " (synthetic fill)" if synthetic else ""
        what = f"{args.steps} pipelined decode steps at batch {args.batch}{fill}"
        unit, per = "step", args.steps

        def events_of(config, context):
            return traced_steps(model, config, context, args.steps, args.batch, synthetic)

    summary = [
        f"Model `{args.model}` on {mx.default_device()}; {what} per row; device time from "
        "CUPTI (PyTorch's profiler).",
        "",
        f"| context | config | kernels / {unit} | device ms / {unit} | vs fp16 | busy ms / {unit} "
        "| vs fp16 |",
        "|---|---|---|---|---|---|---|",
    ]
    details = []
    for context in args.contexts:
        found = {}
        for name in args.configs:
            found[name] = summarize(events_of(CONFIGS[name], context), per, args.top)
        for name, (count, ms, busy, rows) in found.items():
            ratio, busy_ratio = found["fp16"][1] / ms, found["fp16"][2] / busy
            summary.append(
                f"| {context} | {name} | {count:.0f} | {ms:.2f} | {ratio:.2f}x | {busy:.2f} "
                f"| {busy_ratio:.2f}x |"
            )
            details += [
                "",
                f"{name} at {context}:",
                "",
                f"| kernel | per {unit} | µs / {unit} | µs each |",
                "|---|---|---|---|",
            ]
            details += [f"| `{n}` | {c:.1f} | {us:.1f} | {each:.2f} |" for n, c, us, each in rows]
    print_table("\n".join(summary + details), args.output)


if __name__ == "__main__":
    main()
