"""Decode step time of `BatchGenerator` per batch size: what continuous batching buys.

Every sequence gets the same prompt (plus one distinct token), is prefilled alone and
merged into the batch; after 3 warm-up steps, `--steps` steps are timed. Reports ms per
step and aggregate tokens/s per KV cache config and batch size.

    python benchmarks/batch_decode_bench.py --model $(python -m mlx_lm.sample_models smollm2) \\
        --dequantize --configs fp16 tq3 --batch-sizes 1 2 4 8 16
"""

import argparse
import time

from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import make_prompt_cache

CONFIGS = {"fp16": {}, "tq4": dict(turbo_kv_bits=4), "tq3": dict(turbo_kv_bits=3)}
PROMPT = "Explain in two sentences why the sky is blue, then give an example."


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dequantize", action="store_true")
    p.add_argument("--configs", nargs="+", default=["fp16", "tq3"], choices=list(CONFIGS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()

    model, tokenizer = load(args.model, dequantize=args.dequantize)
    prompt = tokenizer.encode(PROMPT)
    print("| KV cache | batch | ms per step | aggregate tok/s |")
    print("|---|---|---|---|")
    for name in args.configs:
        for B in args.batch_sizes:
            gen = BatchGenerator(model, max_batch_size=B)
            for i in range(B):
                gen.insert(prompt + [i + 10], make_prompt_cache(model, **CONFIGS[name]))
            for _ in range(3):
                gen.step()
            tic = time.perf_counter()
            for _ in range(args.steps):
                gen.step()
            dt = (time.perf_counter() - tic) / args.steps
            print(f"| {name} | {B} | {1000 * dt:.0f} | {B / dt:.1f} |", flush=True)


if __name__ == "__main__":
    main()
