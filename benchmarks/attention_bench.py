"""One layer's decode attention and cache update, FP16 vs TurboQuant, per context length.

Isolates what `kv_bench.py` measures for a whole model: a KV cache of one layer is filled
with `context` random tokens, then `--calls` attention calls (or cache updates) are
built and evaluated together, as a model's layers would be, and the time per call is
the median over `--rounds`. Each attention call's query is the previous call's output,
so that they run one after another as layers do (independent calls may overlap on a
GPU: earlier tables here timed them so). On a GPU the TurboQuant rows are the fused kernels (set
MLX_LM_TURBO_REFERENCE=1 for the reference); on the CPU they are the reference.

    python benchmarks/attention_bench.py --contexts 4096 32768 131072 --batch 1 \\
        --heads 28 --kv-heads 4 --head-dim 128 --bits 3 --output attn.md
"""

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import print_table  # noqa: E402

from mlx_lm.models import turboquant_kernels as kernels
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.turboquant_cache import TurboQuantKVCache


def chained(f, x, calls: int):
    """`calls` calls of f, each given the previous call's output (x the first's): an
    attention call's query is the last one's output, so the calls depend on each other
    as a model's layers do. (Cache updates ignore it.)"""
    for _ in range(calls):
        x = f(x)
    return x


def per_call_us(f, x, calls: int, rounds: int) -> float:
    mx.eval(f(x))
    times = []
    for _ in range(rounds):
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(chained(f, x, calls))
        times.append((time.perf_counter() - tic) / calls)
    return statistics.median(times) * 1e6


def eval_us(f, x, calls: int, rounds: int) -> float:
    """Time to evaluate `calls` calls' graph, built beforehand: the device's work and
    its launches, without the Python that builds the graph."""
    mx.eval(f(x))
    times = []
    for _ in range(rounds):
        out = chained(f, x, calls)
        mx.synchronize()
        tic = time.perf_counter()
        mx.eval(out)
        times.append((time.perf_counter() - tic) / calls)
    return statistics.median(times) * 1e6


def build_us(f, x, calls: int, rounds: int) -> float:
    """Host time to build one call's graph (nothing evaluated while timing): on a GPU at
    batch 1 a decode step is bound by this and the launches, not by the kernels."""
    times = []
    for _ in range(rounds):
        mx.synchronize()
        tic = time.perf_counter()
        out = chained(f, x, calls)
        times.append((time.perf_counter() - tic) / calls)
        mx.eval(out)
    return statistics.median(times) * 1e6


def with_constants(f, variant: str):
    """f with module constants of turboquant_kernels set while it builds its graph
    ("NAME=VALUE,NAME=VALUE"; values are ints, 0/1 for flags)."""
    settings = dict(item.split("=") for item in variant.split(","))
    for name in settings:
        if not hasattr(kernels, name):
            raise SystemExit(
                f"--variant: turboquant_kernels has no constant {name}; give one of its "
                "module constants, e.g. TARGET_GROUPS=512 or TENSOR_CORES=0."
            )

    def g(*args):
        saved = {name: getattr(kernels, name) for name in settings}
        for name, value in settings.items():
            setattr(kernels, name, type(saved[name])(int(value)))
        try:
            return f(*args)
        finally:
            for name, value in saved.items():
                setattr(kernels, name, value)

    return g


def filled_caches(B, H, D, context, bits, fp16_window=64, key_scaling=True):
    """(FP16 cache, TurboQuant cache, the decode token's keys and values) of one layer,
    both filled with the same `context` random tokens, then one decode step's update, so
    that the float16 window holds what it holds in decode (W + 1 tokens), not a whole
    4096-token update."""
    fp16 = KVCache()
    tq = TurboQuantKVCache(bits, bits, key_scaling=key_scaling, fp16_window=fp16_window)
    for start in range(0, context, 4096):
        n = min(4096, context - start)
        k = mx.random.normal((B, H, n, D)).astype(mx.float16)
        v = mx.random.normal((B, H, n, D)).astype(mx.float16)
        fp16.update_and_fetch(k, v)
        tq.update_and_fetch(k, v)
        mx.eval(fp16.state, tq.state)
    new = mx.random.normal((B, H, 1, D)).astype(mx.float16)
    for cache in (fp16, tq):
        cache.update_and_fetch(new, new)
        mx.eval(cache.state)
    return fp16, tq, new


def layer_parser(description: str, contexts=(1024, 4096), rounds: int = 7):
    """Arguments of one layer's attention over `filled_caches` (here and kernel_phases.py):
    contexts, batch, shapes, the TurboQuant cache, chained calls, rounds, output."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--contexts", type=int, nargs="+", default=list(contexts))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument(
        "--fp16-window", type=int, default=64, help="TurboQuant float16 window (0: none)"
    )
    p.add_argument("--no-key-scaling", action="store_true")
    p.add_argument("--calls", type=int, default=28, help="calls evaluated together")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--output")
    return p


def main():
    p = layer_parser(__doc__.splitlines()[0])
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also time the TurboQuant attention (device time) with these constants of "
        "turboquant_kernels set, e.g. TARGET_GROUPS=512 or TENSOR_CORES=0; repeatable",
    )
    args = p.parse_args()

    B, H, D = args.batch, args.kv_heads, args.head_dim
    q = mx.random.normal((B, args.heads, 1, D)).astype(mx.float16)
    scale = D**-0.5
    lines = [
        f"Device {mx.default_device()}; batch {B}, {args.heads} query / {H} KV heads, "
        f"head_dim {D}, TurboQuant {args.bits} bits (float16 window {args.fp16_window}, key "
        f"scaling {'off' if args.no_key_scaling else 'on'}); µs per call ({args.calls} calls "
        f"evaluated together, median of {args.rounds}).",
        "",
        "| context | fp16 attention | tq attention | tq/fp16 | tq per-lane | fp16 eval "
        "| tq eval | fp16 update | tq update | fp16 build | tq build |"
        + "".join(f" tq eval, {v} |" for v in args.variant),
        "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(args.variant),
    ]
    for context in args.contexts:
        fp16, tq, new = filled_caches(
            B, H, D, context, args.bits, args.fp16_window, not args.no_key_scaling
        )
        keys, values = fp16.state

        def update(cache):
            def f(_):
                cache.update_and_fetch(new, new)
                cache.trim(1)
                return cache.state

            return f

        def attend_fp16(x):
            return scaled_dot_product_attention(x, keys, values, fp16, scale, None)

        def attend_tq(x):
            return scaled_dot_product_attention(x, None, None, tq, scale, None)

        # The kernel without tensor cores: what Metal runs.
        attend_tq_per_lane = with_constants(attend_tq, "TENSOR_CORES=0")
        attends = (attend_fp16, attend_tq, attend_tq_per_lane)
        row = [per_call_us(f, q, args.calls, args.rounds) for f in attends]
        row += [eval_us(f, q, args.calls, args.rounds) for f in attends[:2]]
        variants_row = [
            eval_us(with_constants(attend_tq, v), q, args.calls, args.rounds) for v in args.variant
        ]
        row += [per_call_us(update(c), q, args.calls, args.rounds) for c in (fp16, tq)]
        # Graph building of a layer's step: the update, then the attention.
        row += [
            build_us(lambda x, c=c, a=a: (update(c)(x), a(x))[1], q, args.calls, args.rounds)
            for c, a in ((fp16, attend_fp16), (tq, attend_tq))
        ]
        lines.append(
            f"| {context} | {row[0]:.1f} | {row[1]:.1f} | {row[1] / row[0]:.2f}x | "
            + " | ".join(f"{x:.1f}" for x in row[2:] + variants_row)
            + " |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print_table(table, args.output)


if __name__ == "__main__":
    main()
