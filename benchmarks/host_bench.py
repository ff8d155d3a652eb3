"""Host time of one layer's decode step (cache update + attention), FP16 vs TurboQuant,
on any machine: the fused kernels' Python path runs with stand-in kernels that only
allocate their outputs, so what is timed is what the host does to build a step's graph.
At batch 1 on a GPU a decode step is bound by this host work (attention_bench.py's build
columns measure it there, with the real kernels).

With `--prefill-step N`, the same for a prefill of `--context` tokens in chunks of N: the
host time to build each chunk's graph (update + causal attention), per chunk and in all.
A GPU runs a chunk's graph only once it is built, so this time adds to the prefill's
(on the H200 the 4K-32K prefill gap to FP16 is of this order, ×28 layers).

    python benchmarks/host_bench.py --context 4096 --rounds 9 --output host.md
    python benchmarks/host_bench.py --context 16384 --prefill-step 2048 --rounds 5
"""

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import print_table  # noqa: E402

from mlx_lm.models import turboquant_attention, turboquant_cache
from mlx_lm.models import turboquant_kernels as kernels
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.turboquant_cache import TurboQuantKVCache


def stand_in_kernel(**_):
    """What `mx.fast.cuda_kernel` returns, minus the kernel: outputs allocated, not run."""

    def call(inputs, grid, threadgroup, output_shapes, output_dtypes, **kwargs):
        return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]

    return call


def turbo_cache() -> TurboQuantKVCache:
    """The TurboQuant cache both tables time: 3 bits with the defaults."""
    return TurboQuantKVCache(3, 3, key_scaling=True, fp16_window=64)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prefill-step", type=int, help="time a chunked prefill's graphs instead")
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.prefill_step is not None and not 0 < args.prefill_step <= args.context:
        p.error(
            f"--prefill-step must be a chunk length from 1 to --context ({args.context}), "
            f"got {args.prefill_step}; e.g. --prefill-step 2048."
        )

    kernels.KERNEL_MAKERS["stand-in"] = ("cuda", lambda: stand_in_kernel)
    saved = turboquant_attention.fused_backend, turboquant_cache.fused_backend
    turboquant_attention.fused_backend = turboquant_cache.fused_backend = lambda: "stand-in"
    try:
        table = prefill_table(args) if args.prefill_step else host_table(args)
    finally:
        turboquant_attention.fused_backend, turboquant_cache.fused_backend = saved
    print_table(table, args.output)


def prefill_table(args) -> str:
    """Host µs to build each prefill chunk's graph (update + causal attention) of one
    layer, FP16 vs TurboQuant; the caches' states are evaluated between chunks (with
    stand-in kernels: zeros), the attention is not."""
    H, D, S = args.kv_heads, args.head_dim, args.prefill_step
    k = mx.random.normal((1, H, S, D)).astype(mx.float16)
    q = mx.random.normal((1, args.heads, S, D)).astype(mx.float16)
    mx.eval(k, q)
    makers = {"fp16": KVCache, "tq3": turbo_cache}

    def prefill(make):
        cache, times = make(), []
        for _ in range(0, args.context, S):
            tic = time.perf_counter()
            keys, values = cache.update_and_fetch(k, k)
            scaled_dot_product_attention(q, keys, values, cache, D**-0.5, "causal")
            times.append((time.perf_counter() - tic) * 1e6)
            mx.eval(cache.state)
        return times

    runs = {name: [] for name in makers}
    for _ in range(args.rounds):  # interleaved
        for name, make in makers.items():
            runs[name].append(prefill(make))
    per_chunk = {n: [statistics.median(c) for c in zip(*r)] for n, r in runs.items()}
    fp, tq = (sum(per_chunk[n]) for n in ("fp16", "tq3"))
    chunks = len(per_chunk["fp16"])
    return "\n".join(
        [
            f"Host µs to build one layer's prefill chunk graphs (update + causal attention, "
            f"nothing of the attention run), {args.context} tokens in chunks of {S}, "
            f"{args.heads} query / {H} KV heads, head_dim {D}, TurboQuant 3 bits with the "
            f"defaults; median of {args.rounds} interleaved rounds.",
            "",
            "| config | " + " | ".join(f"chunk {i}" for i in range(chunks)) + " | all |",
            "|---|" + "---|" * (chunks + 1),
            *(
                f"| {n} | " + " | ".join(f"{x:.0f}" for x in c) + f" | {sum(c):.0f} |"
                for n, c in per_chunk.items()
            ),
            "",
            f"tq3 / fp16 in all: {tq / fp:.2f}x ({tq - fp:.0f} µs more a layer).",
        ]
    )


def host_table(args) -> str:
    H, D = args.kv_heads, args.head_dim
    fp16, tq = KVCache(), turbo_cache()
    k = mx.random.normal((1, H, args.context, D)).astype(mx.float16)
    fp16.update_and_fetch(k, k)
    tq.update_and_fetch(k, k)
    mx.eval(fp16.state, tq.state)
    q = mx.random.normal((1, args.heads, 1, D)).astype(mx.float16)
    new = mx.random.normal((1, H, 1, D)).astype(mx.float16)

    def step(cache):
        def f():
            keys, values = cache.update_and_fetch(new, new)
            out = scaled_dot_product_attention(q, keys, values, cache, D**-0.5, None)
            cache.trim(1)
            return out

        return f

    steps = {"fp16": step(fp16), "tq3": step(tq)}
    times = {name: [] for name in steps}
    for _ in range(args.rounds):  # interleaved
        for name, f in steps.items():
            for _ in range(args.calls // 10):
                f()
            tic = time.perf_counter()
            for _ in range(args.calls):
                f()
            times[name].append((time.perf_counter() - tic) / args.calls * 1e6)
    fp, tq_us = (statistics.median(times[n]) for n in ("fp16", "tq3"))
    return "\n".join(
        [
            f"Host µs per layer step (update + attention, graph built, nothing run), context "
            f"{args.context}, {args.heads} query / {H} KV heads, head_dim {D}, TurboQuant 3 "
            f"bits with the defaults; median of {args.rounds} interleaved rounds x "
            f"{args.calls} calls.",
            "",
            "| fp16 | tq3 | tq3 / fp16 |",
            "|---|---|---|",
            f"| {fp:.1f} | {tq_us:.1f} | {tq_us / fp:.2f}x |",
        ]
    )


if __name__ == "__main__":
    main()
