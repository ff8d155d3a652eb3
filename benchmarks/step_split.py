"""Where a decode step's wall time goes: building its graph in Python, launching its ops,
waiting for them, and all overlapped as generation runs them, FP16 cache vs TurboQuant.

At batch 1 on a GPU a step is bound by the host (building the graph, then launching its
ops one by one), not by the attention's bytes: this splits the step so that a change can
be told to act on the build, the launch, the device, or none. For each context and
config (interleaved rounds, one process): a prompt prefilled in chunks, then `--steps`
greedy steps pipelined as kv_bench runs them (ms per step), then `--steps` more each
built, launched (`mx.async_eval` until it returns) and waited for on its own (median ms
of each part). Pipelined, a step takes at least its build + launch (one host thread) and
at least its device time.

With `--prefill`, the same split for a chunked prefill of each context (each chunk's
graph built, launched and waited for, as generate_step runs them: ms per prefill, summed
over its chunks), so that a prefill gap to FP16 can be told to come from the host's
building, its launching, or the device.

    python benchmarks/step_split.py --model random:qwen2.5-7b --contexts 1024 16384 \\
        --steps 64 --rounds 2 --output split.md
    python benchmarks/step_split.py --model random:qwen2.5-7b --contexts 4096 16384 \\
        --prefill --rounds 3
    python benchmarks/step_split.py --model random:qwen2.5-7b --contexts 131072 --synthetic
"""

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import CACHE_KEYS, CONFIGS, load_bench_model, print_table  # noqa: E402
from kv_bench import synthetic_fill  # noqa: E402

from mlx_lm.models.cache import make_prompt_cache  # noqa: E402


def fresh_cache(model, config: dict):
    """A fresh prompt cache of `config` (generate_bench's CONFIGS entries)."""
    return make_prompt_cache(model, **{k: v for k, v in config.items() if k in CACHE_KEYS})


def fresh_prompt(model, config: dict, context: int):
    """(a fresh cache of `config`, a prompt of `context` random tokens, seeded by it)."""
    cache = fresh_cache(model, config)
    rng = np.random.default_rng(context)
    tokens = mx.array(rng.integers(100, model.args.vocab_size - 100, (1, context)), mx.uint32)
    return cache, tokens


def prefilled(model, config: dict, context: int, prefill_step: int = 2048):
    """(greedy decode step y -> next y, first y) after a prompt of `context` random tokens
    prefilled in chunks into a fresh cache of `config`."""
    cache, tokens = fresh_prompt(model, config, context)
    for start in range(0, context, prefill_step):
        logits = model(tokens[:, start : start + prefill_step], cache=cache)
        mx.eval(logits, [c.state for c in cache])
    return greedy_step(model, cache), mx.argmax(logits[:, -1], axis=-1)


def greedy_step(model, cache):
    """The greedy decode step y -> next y of `model` over `cache` (y: a token per row)."""

    def step(y):
        return mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)

    return step


def synthetic_cache(model, config: dict, batch: int, context: int):
    """A fresh cache of `config` after kv_bench's synthetic fill of `batch` x `context`
    random keys and values (no model run: 128K or 8 x 32K prefills of a 7B model cost
    most of a GPU session)."""
    cache = fresh_cache(model, config)
    synthetic_fill(model, cache, batch, context, config.get("kv_bits"))
    return cache


def synthetic_prefilled(model, config: dict, batch: int, context: int):
    """(greedy decode step, first y) after `synthetic_cache`'s fill."""
    cache = synthetic_cache(model, config, batch, context)
    return greedy_step(model, cache), mx.full((batch,), 100, mx.uint32)


def decode_start(model, config: dict, context: int, batch: int = 1, synthetic: bool = False):
    """(greedy decode step, first y) after `context` tokens: kv_bench's synthetic fill of
    `batch` sequences (`synthetic`), else a prefill of random tokens (batch 1)."""
    if synthetic:
        return synthetic_prefilled(model, config, batch, context)
    return prefilled(model, config, context)


def split_prefill(model, config: dict, context: int, prefill_step: int = 2048):
    """(ms in all, build ms, launch ms, wait ms) of a prefill of `context` random tokens
    in chunks of `prefill_step` into a fresh cache of `config`, each chunk's parts summed:
    its graph built (the model call), launched (`mx.async_eval` returning), then waited
    for, as generate_step evaluates each chunk before building the next."""
    cache, tokens = fresh_prompt(model, config, context)
    mx.synchronize()
    parts = []
    for start in range(0, context, prefill_step):
        tic = time.perf_counter()
        logits = model(tokens[:, start : start + prefill_step], cache=cache)
        built = time.perf_counter()
        mx.async_eval(logits, [c.state for c in cache])
        launched = time.perf_counter()
        mx.eval(logits, [c.state for c in cache])
        parts.append((built - tic, launched - built, time.perf_counter() - launched))
    parts = [sum(p[i] for p in parts) * 1e3 for i in range(3)]
    return (sum(parts), *parts)


def pipelined(step, y, steps: int):
    """`steps` decode steps y -> step(y) as generation runs them (each launched while the
    previous evaluates), waited for at the end; returns the last y."""
    for _ in range(steps):
        y = step(y)
        mx.async_eval(y)
    mx.eval(y)
    return y


def split_step(model, config: dict, context: int, steps: int, synthetic: bool = False):
    """(pipelined ms per step, build ms, launch ms, wait ms) after a prompt of `context`
    random tokens (`synthetic`: kv_bench's synthetic fill instead): launch is
    `mx.async_eval` returning (the host submitting the built graph's ops), wait what
    evaluation takes after that."""
    step, y = decode_start(model, config, context, synthetic=synthetic)
    mx.eval(step(y))  # untimed: it may compile kernels for a new shape
    mx.synchronize()
    tic = time.perf_counter()
    y = pipelined(step, y, steps)
    per_step = (time.perf_counter() - tic) / steps * 1e3
    parts = []
    for _ in range(steps):
        mx.synchronize()
        tic = time.perf_counter()
        y = step(y)
        built = time.perf_counter()
        mx.async_eval(y)
        launched = time.perf_counter()
        mx.eval(y)
        parts.append((built - tic, launched - built, time.perf_counter() - launched))
    return (per_step, *(statistics.median(p[i] for p in parts) * 1e3 for i in range(3)))


def config_parser(description: str, dequantize: bool = True) -> argparse.ArgumentParser:
    """The arguments of the tools that compare cache configs step by step (this one,
    kernel_trace, paired_decode): the model, the contexts, the configs and --output."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="a model path, or random:<shape>")
    if dequantize:
        p.add_argument("--dequantize", action="store_true", help="float32 weights (CPU)")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--configs", nargs="+", default=["fp16", "tq3"], choices=sorted(CONFIGS))
    p.add_argument("--output", help="also write the table to this file")
    return p


def parse_against_fp16(p: argparse.ArgumentParser, argv):
    """`p`'s arguments, refused unless FP16 is among the configs: the tables' ratios
    are against it."""
    args = p.parse_args(argv)
    if "fp16" not in args.configs:
        raise SystemExit("--configs must include fp16: the table's ratios are against it.")
    return args


def main(argv=None):
    p = config_parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prefill", action="store_true", help="split chunked prefills instead")
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--synthetic", action="store_true", help="decode after a synthetic fill, not a prefill"
    )
    args = parse_against_fp16(p, argv)

    model = load_bench_model(args.model, args.dequantize)
    if args.prefill:
        what = f"ms per prefill in chunks of {args.prefill_step_size} (each chunk's parts summed)"
        first = "in all"

        def split(config, context):
            # The first chunk of a new shape compiles kernels: a warm-up prefill, untimed.
            split_prefill(model, config, min(context, args.prefill_step_size))
            return split_prefill(model, config, context, args.prefill_step_size)

    else:
        what, first = f"{args.steps} steps per part; ms per step", "pipelined"

        def split(config, context):
            return split_step(model, config, context, args.steps, args.synthetic)

    lines = [
        f"Model `{args.model}` on {mx.default_device()}; {what}, median of {args.rounds} "
        "interleaved rounds.",
        "",
        f"| context | config | {first} | vs fp16 | build | launch | wait |",
        "|---|---|---|---|---|---|---|",
    ]
    for context in args.contexts:
        runs = {name: [] for name in args.configs}
        for _ in range(args.rounds):
            for name in args.configs:
                runs[name].append(split(CONFIGS[name], context))
        med = {n: [statistics.median(r[i] for r in runs[n]) for i in range(4)] for n in runs}
        for name in args.configs:
            per_step, build, launch, wait = med[name]
            ratio = med["fp16"][0] / per_step  # speed against FP16's
            lines.append(
                f"| {context} | {name} | {per_step:.2f} | {ratio:.2f}x | {build:.2f} | "
                f"{launch:.2f} | {wait:.2f} |"
            )
    table = "\n".join(lines)
    print_table(table, args.output)


if __name__ == "__main__":
    main()
