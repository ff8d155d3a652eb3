"""Memory of a long generation through a bounded TurboQuant cache (--max-kv-size).

Generates `--tokens` tokens with `make_prompt_cache(model, max_kv_size=W,
turbo_kv_bits=3)` and prints, every `--every` tokens, the cache's bytes, MLX's active
memory and the process RSS: after the window fills, all three must stay flat.

    python benchmarks/window_memory.py --tokens 65536 --max-kv-size 4096 --output out.md
"""

import argparse
import resource
import time

import mlx.core as mx
import numpy as np

from mlx_lm.generate import generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--max-kv-size", type=int, default=4096)
    parser.add_argument("--every", type=int, default=4096)
    parser.add_argument("--turbo-kv-bits", type=int, default=3)
    parser.add_argument("--output", help="also write the markdown table here")
    args = parser.parse_args()

    # A small llama (2 layers, 4 KV heads of 64): the cache logic is what is measured.
    config = dict(
        model_type="llama",
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=512,
    )
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    cache = make_prompt_cache(model, max_kv_size=args.max_kv_size, turbo_kv_bits=args.turbo_kv_bits)
    prompt = mx.array(np.random.default_rng(0).integers(0, 512, 16), dtype=mx.uint32)
    rows = ["| tokens | cache bytes | MLX active (MB) | RSS (MB) |", "|---|---|---|---|"]
    print(f"{type(cache[0]).__name__}, window {args.max_kv_size}, {args.tokens} tokens")
    print("\n".join(rows), flush=True)
    tic = time.perf_counter()
    steps = generate_step(prompt, model, max_tokens=args.tokens, prompt_cache=cache)
    for i, _ in enumerate(steps, 1):
        if i % args.every == 0:
            mx.eval([c.state for c in cache])
            row = (
                f"| {i} | {sum(c.nbytes for c in cache)} | "
                f"{mx.get_active_memory() / 2**20:.1f} | {rss_mb():.1f} |"
            )
            rows.append(row)
            print(row, flush=True)
    print(f"{args.tokens / (time.perf_counter() - tic):.0f} tok/s")
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
