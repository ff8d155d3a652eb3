"""Where a decode step's time goes, FP16 cache vs TurboQuant, on this machine's backend.
With `--query-tokens N` (N > 1) the step is a prefill chunk of N tokens instead.

Fills one FP16 and one TurboQuant cache with a `context`-token prompt, then times (median
over `--steps` decode steps, everything evaluated per call, one process, interleaved):
the whole model step, and per layer the cache update (for TurboQuant: quantizing the new
token) and the attention over the cache (for TurboQuant on the CPU: the pure-MLX
reference, which dequantizes the context (rotated domain; a GPU's, model domain) and calls
`mx.fast.scaled_dot_product_attention`; split into that dequantization and the rest).
"Other" is the step minus attention and update over all layers: the weights' matmuls,
norms, RoPE, sampling.

    python benchmarks/decode_profile.py --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --dequantize --context 2048 --turbo-kv-bits 3 --output profile.md
"""

import argparse
import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import (  # noqa: E402
    CACHE_KEYS,
    CONFIGS,
    load_bench_model,
    print_table,
    prompt_tokens,
)

from mlx_lm.models.base import scaled_dot_product_attention  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402
from mlx_lm.models.turboquant_attention import attends_rotated  # noqa: E402


def timed(f, repeats: int) -> float:
    """Median seconds of f() with its result evaluated."""
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        mx.eval(f())
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model path or random:<shape>")
    parser.add_argument("--dequantize", action="store_true")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--turbo-kv-bits", type=int, default=3)
    parser.add_argument(
        "--configs",
        nargs="+",
        choices=sorted(CONFIGS),
        help="cache configs to compare (generate_bench's names; default fp16 and tqN)",
    )
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument(
        "--query-tokens", type=int, default=1, help="tokens per step (e.g. 2048: a prefill chunk)"
    )
    parser.add_argument("--output", help="also write the table to this markdown file")
    args = parser.parse_args()

    model = load_bench_model(args.model, args.dequantize)
    a = model.args
    n_heads, n_kv = a.num_attention_heads, a.num_key_value_heads
    head_dim = getattr(a, "head_dim", None) or a.hidden_size // n_heads
    prompt = prompt_tokens(args.context, a.vocab_size)[None]
    configs = {"fp16": {}, f"tq{args.turbo_kv_bits}": {"turbo_kv_bits": args.turbo_kv_bits}}
    if args.configs:
        configs = {name: CONFIGS[name] for name in args.configs}
    caches = {
        name: make_prompt_cache(model, **{k: v for k, v in c.items() if k in CACHE_KEYS})
        for name, c in configs.items()
    }
    for cache in caches.values():
        for start in range(0, args.context, 512):
            model(prompt[:, start : start + 512], cache=cache)
            mx.eval([c.state for c in cache])

    dtype = mx.float32 if args.dequantize else mx.float16
    L = args.query_tokens
    token = prompt[:, -L:]
    k = mx.random.normal((1, n_kv, L, head_dim)).astype(dtype)
    q = mx.random.normal((1, n_heads, L, head_dim)).astype(dtype)
    mask = "causal" if L > 1 else None
    scale = head_dim**-0.5
    rows = {name: {} for name in caches}
    for _ in range(3):  # interleaved rounds
        for name, cache in caches.items():
            layer = cache[len(cache) // 2]
            r = rows[name]

            def step():
                out = model(token, cache=cache)
                for c in cache:
                    c.trim(L)
                return out

            def update():
                layer.update_and_fetch(k, k)
                layer.trim(L)
                return [x for x in layer.state]

            def attention():
                # TurboQuant attention reads the cache itself; FP16 gets the stored K/V.
                keys, values = layer.state[:2] if name == "fp16" else (None, None)
                return scaled_dot_product_attention(q, keys, values, layer, scale, mask)

            r.setdefault("step", []).append(timed(step, args.steps))
            r.setdefault("update", []).append(timed(update, args.steps) * len(cache))
            r.setdefault("attention", []).append(timed(attention, args.steps) * len(cache))
            if hasattr(layer, "coded_keys_values"):
                rotated = attends_rotated(layer)
                deq = timed(lambda: layer.coded_keys_values(dtype, rotated), args.steps)
                r.setdefault("dequantize", []).append(deq * len(cache))
    lines = [
        f"Model `{args.model}`, context {args.context}, device {mx.default_device()}: "
        f"ms per step of {L} token(s) (median of 3 interleaved rounds x {args.steps} steps).",
        "",
        "| cache | step | cache update (all layers) | attention (all layers) | of which "
        "dequantize | other | step vs first |",
        "|---|---|---|---|---|---|---|",
    ]
    first_step = statistics.median(next(iter(rows.values()))["step"])
    for name, r in rows.items():
        m = {key: statistics.median(v) * 1e3 for key, v in r.items()}
        deq = f"{m['dequantize']:.2f}" if "dequantize" in m else "-"
        other = m["step"] - m["update"] - m["attention"]
        lines.append(
            f"| {name} | {m['step']:.2f} | {m['update']:.2f} | {m['attention']:.2f} | {deq} | "
            f"{other:.2f} | {first_step * 1e3 / m['step']:.2f}x |"
        )
    table = "\n".join(lines)
    print_table(table, args.output)


if __name__ == "__main__":
    main()
