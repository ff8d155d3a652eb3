"""Quality of KV-cache configs against the uncompressed cache, like the paper's tables.

For each model: the text is fed through the cache in chunks (as generation does), and each
config is compared with one uncompressed run of the same text: perplexity, its change,
mean KL of the next-token distributions and top-1 agreement (`mlx_lm.perplexity`'s
measures, sharing its reference run across configs).

    python benchmarks/quality_tables.py --models $(python -m mlx_lm.sample_models smollm2) \\
        $(python -m mlx_lm.sample_models gemma3) --output bench_out/quality.md

Default text: `mlx_lm.perplexity.prose_text()` (Debian's gnu-standards, else GPL-3).
"""

import argparse
import os
import sys
import time

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache
from mlx_lm.models.turboquant_cache import TurboQuantCodec
from mlx_lm.perplexity import compare, prose_text, teacher_forced_logprobs
from mlx_lm.utils import load

# Each TurboQuant lever spelled out, so that a row means the same whatever the defaults.
_PLAIN = dict(turbo_key_centering=False, turbo_key_scaling=False, turbo_fp16_window=0)
_CENTERED = dict(turbo_key_centering=True, turbo_key_scaling=False, turbo_fp16_window=0)
_SCALED = dict(turbo_key_centering=True, turbo_key_scaling=True, turbo_fp16_window=0)

# name -> (make_prompt_cache keywords, teacher_forced_logprobs keywords)
CONFIGS = {
    "affine kv8": ({}, {"kv_bits": 8}),
    "affine kv4": ({}, {"kv_bits": 4}),
    "TQ K4/V4 plain": ({"turbo_kv_bits": 4, **_PLAIN}, {}),
    "TQ K3/V3 plain": ({"turbo_kv_bits": 3, **_PLAIN}, {}),
    "TQ K4/V4 centered": ({"turbo_kv_bits": 4, **_CENTERED}, {}),
    "TQ K3/V3 centered": ({"turbo_kv_bits": 3, **_CENTERED}, {}),
    "TQ K4/V4 centered+scaled": ({"turbo_kv_bits": 4, **_SCALED}, {}),
    "TQ K3/V3 centered+scaled": ({"turbo_kv_bits": 3, **_SCALED}, {}),
    "TQ K4/V4 centered, window 64": (
        {"turbo_kv_bits": 4, **_CENTERED, "turbo_fp16_window": 64},
        {},
    ),
    "TQ K3/V3 centered, window 64": (
        {"turbo_kv_bits": 3, **_CENTERED, "turbo_fp16_window": 64},
        {},
    ),
    "TQ K3/V3 centered, window 128": (
        {"turbo_kv_bits": 3, **_CENTERED, "turbo_fp16_window": 128},
        {},
    ),
    "TQ K3/V3 fp16-layers 1": ({"turbo_kv_bits": 3, **_CENTERED, "turbo_fp16_layers": 1}, {}),
    "TQ K4/V3 centered": ({"turbo_key_bits": 4, "turbo_value_bits": 3, **_CENTERED}, {}),
    # 8-bit keys stand in for "keys uncompressed": what values alone cost.
    "TQ K8/V3 centered": ({"turbo_key_bits": 8, "turbo_value_bits": 3, **_CENTERED}, {}),
    # The defaults of --turbo-kv-bits N (make_prompt_cache's, whatever they are now).
    "--turbo-kv-bits 4": ({"turbo_kv_bits": 4}, {}),
    "--turbo-kv-bits 3": ({"turbo_kv_bits": 3}, {}),
    "--turbo-kv-bits 2": ({"turbo_kv_bits": 2}, {}),
    # Candidates for a high-quality setting (<= 6 bits per value).
    "--turbo-key-bits 5 --turbo-value-bits 4": ({"turbo_key_bits": 5, "turbo_value_bits": 4}, {}),
    "--turbo-key-bits 6 --turbo-value-bits 4": ({"turbo_key_bits": 6, "turbo_value_bits": 4}, {}),
    "--turbo-key-bits 5 --turbo-value-bits 5": ({"turbo_key_bits": 5, "turbo_value_bits": 5}, {}),
}


def fp16_bytes(cache) -> int:
    """Bytes the held keys and values would take in float16."""
    return sum(x.size * 2 for c in cache for _, x in tree_flatten(c.state))


def held_bytes(cache) -> int:
    """Bytes of the context a cache holds (its `state`: no preallocated slots). Plain and
    affine caches are counted as on a float16 model (16 bits; bits + 32 / group)."""
    total = 0
    for c in cache:
        if isinstance(c, TurboQuantCodec):
            total += sum(x.nbytes for x in c.state)
        elif isinstance(c, QuantizedKVCache):
            keys, values = c.state
            n = (keys[0].size + values[0].size) * 32 // c.bits  # uint32 words -> values
            total += n * (c.bits + 32 / c.group_size) / 8
        else:
            total += fp16_bytes([c])
    return int(total)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="model paths (.gguf or dirs)")
    parser.add_argument("--data", help="a UTF-8 text file (default: prose_text())")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seed", type=int, default=0, help="TurboQuant rotation seed")
    parser.add_argument("--output", help="also write the markdown tables here")
    args = parser.parse_args()

    text = open(args.data, encoding="utf-8").read() if args.data else prose_text()
    out = []
    for path in args.models:
        model, tokenizer = load(path, dequantize=True)
        tokens = mx.array(tokenizer.encode(text)[: args.context + 1])
        if tokens.size < args.context + 1:
            sys.exit(f"The text has only {tokens.size} tokens; lower --context.")
        ref_cache = make_prompt_cache(model)
        ref = teacher_forced_logprobs(model, tokens, ref_cache, args.chunk_size)
        fp16 = fp16_bytes(ref_cache)
        rows = [
            f"### {os.path.basename(path)}: {args.context} tokens, chunks of {args.chunk_size}",
            "",
            "KV bytes: what the cache holds after the text (codes, norms, key means and "
            "scales, float16 window); bits/value = 16 x KV bytes / FP16 bytes.",
            "",
            "| KV config | bits/value | KV bytes | perplexity | Δ | mean KL | top-1 vs FP16 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in args.configs:
            cache_kw, step_kw = CONFIGS[name]
            if any(k.startswith("turbo") for k in cache_kw):
                cache_kw = {**cache_kw, "turbo_seed": args.seed}
            tic = time.perf_counter()
            try:
                cache = make_prompt_cache(model, **cache_kw)
                logprobs = teacher_forced_logprobs(model, tokens, cache, args.chunk_size, **step_kw)
            except ValueError as e:  # e.g. a cache kind a config cannot handle
                rows.append(f"| {name} | error: {e} | | | | | |")
                print(rows[-1], file=sys.stderr, flush=True)
                continue
            f = compare(ref, logprobs, tokens[1:])
            delta = 100 * (f["ppl"] / f["ref_ppl"] - 1)
            if not any(r.startswith("| FP16") for r in rows):
                rows.insert(6, f"| FP16 | 16.00 | {fp16:,} | {f['ref_ppl']:.2f} | | | |")
            held = held_bytes(cache)
            rows.append(
                f"| {name} | {16 * held / fp16:.2f} | {held:,} | {f['ppl']:.2f} | {delta:+.1f}% "
                f"| {f['kl']:.4f} | {f['top1']:.3f} |"
            )
            print(rows[-1], f"({time.perf_counter() - tic:.0f} s)", file=sys.stderr, flush=True)
        out.append("\n".join(rows))
    table = "\n\n".join(out)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
