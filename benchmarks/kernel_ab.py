"""Decode kernel sources against each other in one process: µs a call and busy time.

On the H200 the partial kernel's time moved by 10% between processes running the same
code (128K: 67.1 µs a call in one session, 80.6 in the next), more than most kernel
changes gain. Here one process fills the caches once; then every round traces FP16's
steps and each variant's, the variants in a random order. A variant is a copy of
`turboquant_kernels.py` (from a branch: `git show BRANCH:mlx_lm/models/turboquant_kernels.py
> /tmp/v.py`): its HEADER, PARTIAL_BODY, MERGE_BODY and CUDA_PRELUDE replace the
module's, under kernel names of their own (MLX keeps compiled kernels by name), and the
caches' decode plans are dropped so that they are made anew. `main` is the installed
module's own sources.
Printed: medians over the rounds of the partial and merge kernels' µs a call (CUPTI) and
of a step's busy time (`kernel_trace.busy_us`), and that against FP16's.

    python benchmarks/kernel_ab.py --model random:qwen2.5-7b --variant probe=/tmp/v.py \\
        --contexts 1024 16384 131072 --rounds 3
    python benchmarks/kernel_ab.py --model random:qwen2.5-7b --variant probe=/tmp/v.py \\
        --contexts 32768 --batch 8
"""

import argparse
import ast
import os
import random
import statistics
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import CONFIGS, load_bench_model, print_table  # noqa: E402
from kernel_trace import summarize, traced  # noqa: E402
from step_split import greedy_step, pipelined, synthetic_cache  # noqa: E402

from mlx_lm.models import turboquant_kernels as kernels  # noqa: E402

# The module's sources a variant replaces, and the kernels (KERNELS' first two: partial,
# merge) renamed for it. (The CUDA prelude too: the other kernels, built under their own
# names, keep whichever prelude they were first compiled with.)
SWAPPED = ("HEADER", "PARTIAL_BODY", "MERGE_BODY", "CUDA_PRELUDE")
RENAMED = 2


def sources_of(path: str) -> dict:
    """SWAPPED's string constants as assigned in the Python file at `path`."""
    with open(path) as f:
        tree = ast.parse(f.read())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", None)
            if name in SWAPPED and isinstance(node.value, ast.Constant):
                found[name] = node.value.value
    missing = [name for name in SWAPPED if name not in found]
    if missing:
        raise SystemExit(f"{path} assigns no {', '.join(missing)}: is it turboquant_kernels.py?")
    return found


MAIN = {name: getattr(kernels, name) for name in SWAPPED}
MAIN_KERNELS = kernels.KERNELS


def use(name, sources: dict):
    """Build the decode kernels from `sources` from now on, their names ending in `name`
    (None: the module's own names)."""
    for key, text in sources.items():
        setattr(kernels, key, text)
    kernels.KERNELS = MAIN_KERNELS
    if name is not None:
        renamed = tuple((n + "_" + name, *rest) for n, *rest in MAIN_KERNELS[:RENAMED])
        kernels.KERNELS = renamed + MAIN_KERNELS[RENAMED:]
    kernels._specialised.cache_clear()
    kernels._decode_kernels.cache_clear()


def drop_decode_calls(cache):
    """Forget the caches' decode plans (`DecodeCall`s, which hold the built kernels)."""
    for c in cache:
        derived = getattr(c, "_derived_means", None) or {}
        for key in [k for k in derived if isinstance(k, tuple) and k[:1] == ("decode",)]:
            del derived[key]


def per_call(rows, prefix: str) -> float:
    """µs a call of the first kernel of `summarize`'s rows whose name starts with prefix."""
    return next(us for name, _, _, us in rows if name.startswith(prefix))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a model path, or random:<shape>")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a copy of turboquant_kernels.py to time (repeatable); main is always timed",
    )
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument(
        "--config",
        default="tq3",
        choices=sorted(c for c in CONFIGS if c.startswith("tq") and "ref" not in c),
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=8, help="traced decode steps a round")
    p.add_argument("--output", help="also write the table to this file")
    args = p.parse_args(argv)
    variants = {"main": MAIN}
    for spec in args.variant:
        name, sep, path = spec.partition("=")
        if not sep or not name.isidentifier() or name in variants:
            raise SystemExit(f"--variant {spec!r}: give NAME=PATH, a new identifier as NAME.")
        variants[name] = sources_of(path)
    if kernels.fused_backend() != "cuda":
        raise SystemExit("kernel_ab needs MLX's CUDA backend on a CUDA GPU (and torch).")

    model = load_bench_model(args.model, False)
    rows = []
    for context in args.contexts:
        caches = {
            config: synthetic_cache(model, CONFIGS[config], args.batch, context)
            for config in ("fp16", args.config)
        }

        def run(config):
            step = greedy_step(model, caches[config])
            y = mx.full((args.batch,), 100, mx.uint32)
            for _ in range(3):  # untimed: compiles the variant's kernels
                y = step(y)
                mx.eval(y)
            return summarize(traced(lambda: pipelined(step, y, args.steps)), args.steps, 50)

        runs = {name: [] for name in ["fp16", *variants]}
        for _ in range(args.rounds):
            runs["fp16"].append(run("fp16"))
            for name in random.sample(list(variants), len(variants)):
                use(name, variants[name])
                drop_decode_calls(caches[args.config])
                runs[name].append(run(args.config))
        use(None, MAIN)
        fp16_busy = statistics.median(r[2] for r in runs["fp16"])
        for name in variants:
            busy = statistics.median(r[2] for r in runs[name])
            partial = statistics.median(
                per_call(r[3], "turboquant_decode_partial") for r in runs[name]
            )
            merge = statistics.median(per_call(r[3], "turboquant_decode_merge") for r in runs[name])
            rows.append(
                f"| {context} | {name} | {partial:.2f} | {merge:.2f} | {busy:.3f} | "
                f"{fp16_busy / busy:.3f}x |"
            )
    print_table(
        f"Model `{args.model}` on {mx.default_device()}; batch {args.batch}, synthetic fill, "
        f"{args.config}; {args.rounds} rounds of {args.steps} traced steps per variant, "
        "order shuffled per round; medians (CUPTI).\n\n"
        "| context | variant | partial µs a call | merge µs a call | busy ms / step | vs fp16 |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows),
        args.output,
    )


if __name__ == "__main__":
    main()
