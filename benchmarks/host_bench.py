"""Host time of one layer's decode step (cache update + attention), FP16 vs TurboQuant,
on any machine: the fused kernels' Python path runs with stand-in kernels that only
allocate their outputs, so what is timed is what the host does to build a step's graph.
At batch 1 on a GPU a decode step is bound by this host work (attention_bench.py's build
columns measure it there, with the real kernels).

With `--in-model N`, the same timed inside the decode steps of an N-layer model (Qwen2
layout with these heads, a small MLP and vocabulary; timers around each layer's cache
update and attention): inside a model, between the other layers' work, every Python
operation of the step costs several times what it does in a loop of its own (on the CPU
machine the TurboQuant attention's pieces took 5-6 µs each there, against 0.4-1.3 µs in
a loop), so this is the host time a decode step really spends. Its rows: the update,
the attention and, within it, the decode kernels' call (`DecodeCall.attend`), and the
whole step's model call, per layer. With `--real-kernels` (on a GPU) the real kernels
run, each step is launched and waited for, and the launch (`mx.async_eval`) gets a row:
a batch-1 step on the H200 took about its build plus its launch.

With `--prefill-step N`, the same for a prefill of `--context` tokens in chunks of N: the
host time to build each chunk's graph (update + causal attention), per chunk and in all.
A GPU runs a chunk's graph only once it is built, so this time adds to the prefill's
(on the H200 the 4K-32K prefill gap to FP16 is of this order, ×28 layers).

    python benchmarks/host_bench.py --context 4096 --rounds 9 --output host.md
    python benchmarks/host_bench.py --context 16384 --prefill-step 2048 --rounds 5
    python benchmarks/host_bench.py --context 1024 --in-model 28 --rounds 21
    python benchmarks/host_bench.py --context 1024 --in-model 28 --real-kernels
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
    p.add_argument(
        "--in-model", type=int, metavar="LAYERS", help="time them inside a model's decode steps"
    )
    p.add_argument(
        "--real-kernels",
        action="store_true",
        help="with --in-model on a GPU: the real kernels, each step run (adds its launch)",
    )
    p.add_argument("--output")
    args = p.parse_args(argv)
    if args.real_kernels and (not args.in_model or kernels.fused_backend() is None):
        p.error(
            "--real-kernels times the real decode kernels inside a model: it needs --in-model "
            "and MLX's CUDA or Metal backend (none here: drop it for stand-in kernels)."
        )
    if args.prefill_step is not None and not 0 < args.prefill_step <= args.context:
        p.error(
            f"--prefill-step must be a chunk length from 1 to --context ({args.context}), "
            f"got {args.prefill_step}; e.g. --prefill-step 2048."
        )

    kernels.KERNEL_MAKERS["stand-in"] = ("cuda", lambda: stand_in_kernel)
    saved = turboquant_attention.fused_backend, turboquant_cache.fused_backend
    if not args.real_kernels:
        turboquant_attention.fused_backend = turboquant_cache.fused_backend = lambda: "stand-in"
    try:
        if args.prefill_step:
            table = prefill_table(args)
        elif args.in_model:
            table = in_model_table(args)
        else:
            table = host_table(args)
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


def in_model_table(args) -> str:
    """Host µs per layer of the cache update and the attention inside decode steps of an
    `--in-model`-layer model (each step's graph built, not run; the caches trimmed back
    after it), FP16 vs TurboQuant, interleaved rounds of `--calls` // 100 steps."""
    import mlx.nn as nn

    from mlx_lm.models import base, qwen2
    from mlx_lm.models.cache import make_prompt_cache

    H, D, layers = args.kv_heads, args.head_dim, args.in_model
    config = dict(hidden_size=args.heads * D, num_hidden_layers=layers, intermediate_size=128)
    config.update(num_attention_heads=args.heads, num_key_value_heads=H, rms_norm_eps=1e-6)
    model = qwen2.Model(
        qwen2.ModelArgs(model_type="qwen2", vocab_size=1024, tie_word_embeddings=False, **config)
    )
    model.set_dtype(mx.float16)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    # "kernels' call": the decode kernels' (compiled) call, part of the attention.
    # With real kernels each step is run: its graph built (the model call), then
    # launched (`mx.async_eval` returning), as generate_step does; a batch-1 step on a
    # GPU takes about their sum.
    parts = ["update", "attention", "kernels' call", "step built", "step launched"]
    spent = dict.fromkeys(parts, 0.0)

    def timed(part, f):
        def g(*a, **k):
            tic = time.perf_counter()
            out = f(*a, **k)
            spent[part] += time.perf_counter() - tic
            return out

        return g

    make_decode_call = kernels._decode_call

    def timed_decode_call(*a, **k):
        call = make_decode_call(*a, **k)  # once per kind of call, not per step
        return call if call is None else call._replace(attend=timed("kernels' call", call.attend))

    caches = {"fp16": make_prompt_cache(model), "tq3": make_prompt_cache(model, turbo_kv_bits=3)}
    k = mx.random.normal((1, H, args.context, D)).astype(mx.float16)
    for cache in caches.values():
        for layer in cache:
            layer.update_and_fetch(k, k)
            layer.update_and_fetch = timed("update", layer.update_and_fetch)
        mx.eval([layer.state for layer in cache])
    token = mx.array([[5]])
    times = {(n, part): [] for n in caches for part in spent}
    steps = max(1, args.calls // 100)
    saved = qwen2.scaled_dot_product_attention
    qwen2.scaled_dot_product_attention = timed("attention", base.scaled_dot_product_attention)
    kernels._decode_call = timed_decode_call
    try:
        for r in range(args.rounds + 1):  # interleaved; the first round untimed
            for name, cache in caches.items():
                spent.update(dict.fromkeys(parts, 0.0))
                for _ in range(steps):
                    tic = time.perf_counter()
                    logits = model(token, cache=cache)
                    built = time.perf_counter()
                    spent["step built"] += built - tic
                    if args.real_kernels:
                        mx.async_eval(logits)
                        spent["step launched"] += time.perf_counter() - built
                        mx.eval(logits)
                    for layer in cache:
                        layer.trim(1)
                for part, t in spent.items():
                    if r:
                        times[name, part].append(t / steps / layers * 1e6)
    finally:
        qwen2.scaled_dot_product_attention = saved
        kernels._decode_call = make_decode_call
    us = {key: statistics.median(t) for key, t in times.items()}
    shown = parts if args.real_kernels else parts[:-1]
    rows = [
        f"| {part} | {us['fp16', part]:.1f} | {us['tq3', part]:.1f} | "
        + (f"{us['tq3', part] / us['fp16', part]:.2f}x |" if us["fp16", part] else "- |")
        for part in shown
    ]
    run = "each step run" if args.real_kernels else "graphs built, nothing run"
    kernels_used = f"{kernels.fused_backend()} kernels" if args.real_kernels else "stand-in kernels"
    return "\n".join(
        [
            f"Host µs per layer inside the decode steps of a {layers}-layer model (Qwen2 "
            f"layout, {args.heads} query / {H} KV heads, head_dim {D}; {kernels_used}, {run}), "
            f"context {args.context}, TurboQuant 3 bits with the defaults; median of "
            f"{args.rounds} interleaved rounds x {steps} steps. Step built: the model call"
            + (", launched: `mx.async_eval`;" if args.real_kernels else ";")
            + " per layer.",
            "",
            "| part | fp16 | tq3 | tq3 / fp16 |",
            "|---|---|---|---|",
            *rows,
        ]
    )


if __name__ == "__main__":
    main()
