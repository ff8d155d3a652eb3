"""KV-cache speed and memory per cache config, context length and batch size.

For each (batch, context, config): prefill tok/s, decode tok/s, KV bytes and MLX peak
memory, measured in this one process (configs interleaved per round, medians over
rounds, after an untimed warm-up; the first decode step of a run is not timed; peak
memory reset before every run). On the GPU use
`--rounds 3` or more: a new context length can still trigger a kernel compile in the
first round. Decoding is greedy over `batch` sequences
at once, straight through the model and the cache, so what is measured is the cache.

    python benchmarks/kv_bench.py --model random:qwen2.5-7b --contexts 1024 4096 16384 \\
        32768 131072 --batches 1 8 --configs fp16 kv8 kv4 tq4 tq3 tq2 --output out/kv

writes out/kv.md (table) and out/kv.png (decode tok/s and KV bytes against context).
"""

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import (  # noqa: E402
    CACHE_KEYS,
    CONFIGS,
    RANDOM_MODELS,
    load_bench_model,
    print_table,
)

from mlx_lm.generate import maybe_quantize_kv_cache  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402


def synthetic_fill(model, cache, batch: int, context: int, kv_bits, chunk: int = 4096):
    """Fill every layer's cache with `context` random keys/values (float16, the model's
    KV shapes) straight through `update_and_fetch`, without running the model: decode
    cost does not depend on what the cache holds, and a 128K or 8 x 32K prefill of a 7B
    model would take most of a GPU session's time."""
    a = model.args
    n_kv = a.num_key_value_heads
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // a.num_attention_heads
    for start in range(0, context, chunk):
        n = min(chunk, context - start)
        for c in cache:
            k = mx.random.normal((batch, n_kv, n, head_dim)).astype(mx.float16)
            v = mx.random.normal((batch, n_kv, n, head_dim)).astype(mx.float16)
            c.update_and_fetch(k, v)
        maybe_quantize_kv_cache(cache, 0, 64, kv_bits)
        mx.eval([c.state for c in cache])


def run(
    model,
    config: dict,
    batch: int,
    context: int,
    gen: int,
    prefill_step: int,
    synthetic: bool = False,
) -> dict:
    """One prefill of `batch` x `context` random tokens (or a synthetic fill: prefill
    reported as nan), then `gen` greedy steps."""
    config = dict(config)
    reference = config.pop("reference", False)
    if reference:
        os.environ["MLX_LM_TURBO_REFERENCE"] = "1"
    try:
        cache = make_prompt_cache(model, **{k: v for k, v in config.items() if k in CACHE_KEYS})
        kv_bits = config.get("kv_bits")
        vocab = model.args.vocab_size
        rng = np.random.default_rng(context + batch)
        tokens = mx.array(rng.integers(100, vocab - 100, (batch, context)), dtype=mx.uint32)
        mx.synchronize()
        mx.reset_peak_memory()
        tic = time.perf_counter()
        if synthetic:
            synthetic_fill(model, cache, batch, context, kv_bits)
            logits = model(tokens[:, -1:], cache=cache)
        else:
            for start in range(0, context, prefill_step):
                logits = model(tokens[:, start : start + prefill_step], cache=cache)
                maybe_quantize_kv_cache(cache, 0, 64, kv_bits)
                mx.eval(logits, [c.state for c in cache])
        y = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(y)
        prefill_s = float("nan") if synthetic else time.perf_counter() - tic
        # One untimed step first, as mlx_lm's generation tok/s leaves out the first
        # token: it may compile kernels for a new shape.
        y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
        mx.eval(y)
        tic = time.perf_counter()
        for _ in range(gen):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.async_eval(y)
        mx.eval(y)
        decode_s = time.perf_counter() - tic
        return dict(
            prefill=batch * context / prefill_s,
            decode=batch * gen / decode_s,
            kv=sum(c.nbytes for c in cache),
            peak=mx.get_peak_memory(),
        )
    finally:
        os.environ.pop("MLX_LM_TURBO_REFERENCE", None)


def plot(rows, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(6 * len(batches), 8), squeeze=False)
    for col, batch in enumerate(batches):
        for config in dict.fromkeys(r["config"] for r in rows):
            sel = [r for r in rows if r["batch"] == batch and r["config"] == config]
            x = [r["context"] for r in sel]
            axes[0][col].plot(x, [r["decode"] for r in sel], marker="o", label=config)
            axes[1][col].plot(x, [r["kv"] / 2**20 for r in sel], marker="o", label=config)
        for row, label in enumerate(["decode tok/s (all sequences)", "KV MiB"]):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context")
            ax.set_ylabel(label)
            ax.set_title(f"batch {batch}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        required=True,
        help=f"a model path, or random:<shape> with shape in {sorted(RANDOM_MODELS)}",
    )
    parser.add_argument("--dequantize", action="store_true", help="float32 weights (CPU)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--gen", type=int, default=32, help="decode steps per run")
    parser.add_argument("--configs", nargs="+", default=["fp16", "tq3"], choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument(
        "--synthetic-from",
        type=int,
        default=None,
        help="fill caches of at least this many tokens (x batch) with random keys/values "
        "instead of a prefill (decode figures only; prefill shown as nan)",
    )
    parser.add_argument("--output", help="write OUTPUT.md (table) and OUTPUT.png (plot)")
    args = parser.parse_args()

    model = load_bench_model(args.model, args.dequantize)
    mx.eval(model.parameters())
    rows = []
    # Warm-up, untimed: the first run of each config JIT-compiles its kernels (on the
    # CUDA backend, per shape), which would otherwise land in the first round's figures.
    for name in args.configs:
        run(model, CONFIGS[name], 1, min(args.contexts), 2, args.prefill_step_size)
    for batch in args.batches:
        for context in args.contexts:
            runs = {name: [] for name in args.configs}
            synthetic = args.synthetic_from is not None and batch * context >= args.synthetic_from
            for _ in range(args.rounds):
                for name in args.configs:
                    runs[name].append(
                        run(
                            model,
                            CONFIGS[name],
                            batch,
                            context,
                            args.gen,
                            args.prefill_step_size,
                            synthetic,
                        )
                    )
            for name in args.configs:
                figures = {k: statistics.median(r[k] for r in runs[name]) for k in runs[name][0]}
                rows.append(dict(batch=batch, context=context, config=name, **figures))
                print(rows[-1], file=sys.stderr, flush=True)

    fp16 = {(r["batch"], r["context"]): r for r in rows if r["config"] == "fp16"}
    lines = [
        f"Model: `{args.model}`; device: {mx.default_device()}; {args.gen} decode steps; "
        f"median of {args.rounds} interleaved rounds."
        + (
            f" Caches of {args.synthetic_from} tokens (x batch) or more were filled with "
            "random keys/values (no prefill: prefill nan)."
            if args.synthetic_from
            else ""
        ),
        "",
        "| batch | context | config | prefill tok/s | prefill vs fp16 | decode tok/s | "
        "decode vs fp16 | KV MiB | MLX peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = fp16.get((r["batch"], r["context"]))

        def ratio(key):
            return f"{r[key] / ref[key]:.2f}x" if ref and ref[key] == ref[key] else "-"

        lines.append(
            f"| {r['batch']} | {r['context']} | {r['config']} | {r['prefill']:.0f} | "
            f"{ratio('prefill')} | {r['decode']:.1f} | {ratio('decode')} | "
            f"{r['kv'] / 2**20:.1f} | {r['peak'] / 2**20:.0f} |"
        )
    table = "\n".join(lines)
    print_table(table, args.output and args.output + ".md")
    if args.output:
        plot(rows, args.output + ".png")


if __name__ == "__main__":
    main()
