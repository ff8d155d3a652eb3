"""Decode speed against FP16 from alternating blocks of steps: paired ratios.

A decode step at batch 1 on a GPU is bound by the host, whose speed drifts between runs
(on the H200 machine FP16's tok/s ranged over 99-178 between runs of one process), so
kv_bench's ratios of whole runs, even interleaved, move by 0.1-0.2x. Here every config's
cache is filled first (kv_bench's synthetic fill; `--prefill`: a prompt of random
tokens, batch 1), then `--blocks` rounds each run `--block-steps` pipelined greedy steps
of every config, the order rotating per round; a config's ratio to FP16 is the median
over rounds of its block's tok/s over FP16's block of that round, blocks seconds apart.

    python benchmarks/paired_decode.py --model random:qwen2.5-7b \\
        --contexts 1024 4096 16384 32768 131072 --output paired.md
    python benchmarks/paired_decode.py --model random:qwen2.5-7b --contexts 32768 --batch 8
"""

import os
import statistics
import sys
import time

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import CONFIGS, load_bench_model, print_table  # noqa: E402
from step_split import (  # noqa: E402
    config_parser,
    decode_start,
    parse_against_fp16,
    pipelined,
)


def block_rates(steppers: dict, blocks: int, block_steps: int) -> dict:
    """tok/s of each block of `block_steps` pipelined steps, per config: `steppers` maps
    a config to [step, y] (y: the batch's last tokens), run in rounds with the order
    rotated each round."""
    names = list(steppers)
    rates = {name: [] for name in names}
    for b in range(blocks):
        shift = b % len(names)
        for name in names[shift:] + names[:shift]:
            step, y = steppers[name]
            mx.synchronize()
            tic = time.perf_counter()
            y = pipelined(step, y, block_steps)
            rates[name].append(block_steps * y.size / (time.perf_counter() - tic))
            steppers[name][1] = y
    return rates


def paired_ratios(rates: dict, base: str = "fp16") -> dict:
    """Per config, the quartiles (25%, median, 75%) of its blocks' tok/s over `base`'s
    of the same round."""
    out = {}
    for name, r in rates.items():
        ratios = sorted(a / b for a, b in zip(r, rates[base]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        out[name] = (q[0], statistics.median(ratios), q[2])
    return out


def main(argv=None):
    p = config_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", type=int, default=24, help="rounds of one block per config")
    p.add_argument("--block-steps", type=int, default=12, help="decode steps per block")
    p.add_argument("--prefill", action="store_true", help="prefill random prompts (batch 1)")
    args = parse_against_fp16(p, argv)
    if args.prefill and args.batch > 1:
        raise SystemExit("--prefill prompts one sequence: drop --batch or --prefill.")

    model = load_bench_model(args.model, args.dequantize)
    fill = "a prompt of random tokens" if args.prefill else "a synthetic fill"
    lines = [
        f"Model `{args.model}` on {mx.default_device()}; batch {args.batch} after {fill}; "
        f"{args.blocks} rounds of {args.block_steps} pipelined steps per config, order "
        "rotating; vs fp16: quartiles of the rounds' paired ratios.",
        "",
        "| context | config | tok/s | vs fp16 | 25% - 75% |",
        "|---|---|---|---|---|",
    ]
    for context in args.contexts:
        steppers = {}
        for name in args.configs:
            step, y = decode_start(model, CONFIGS[name], context, args.batch, not args.prefill)
            mx.eval(step(y))  # untimed: it may compile kernels for a new shape
            steppers[name] = [step, y]
        rates = block_rates(steppers, args.blocks, args.block_steps)
        ratios = paired_ratios(rates)
        for name in args.configs:
            lo, mid, hi = ratios[name]
            lines.append(
                f"| {context} | {name} | {statistics.median(rates[name]):.1f} | {mid:.3f}x | "
                f"{lo:.3f} - {hi:.3f} |"
            )
        print(lines[-1], flush=True)
        del steppers
    print_table("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
