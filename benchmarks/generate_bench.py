"""Prefill and decode speed and peak memory of `generate_step`, per KV-cache config.

Speed: every config runs in this one process, interleaved round by round, and each
figure is the median over rounds (shared machines are noisy: compare ratios, not
absolute CPU times). Memory: each config also runs once in a fresh subprocess, which
reports MLX's peak memory and the process's peak RSS for a prompt of `context` tokens
followed by `gen` generated tokens.

    python benchmarks/generate_bench.py --model $(python -m mlx_lm.sample_models smollm2) \\
        --dequantize --contexts 512 2048 --configs fp16 tq3 --output bench_out/generate.md
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import mlx.core as mx
import numpy as np

from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import _get_classes, load, use_rows_kernel

# Random models of real shapes (speed does not depend on the weights' values), so a
# benchmark can run where the real weights cannot travel. 4-bit weights like the GGUFs.
RANDOM_MODELS = {
    "smollm2-135m": dict(
        model_type="llama",
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        rms_norm_eps=1e-5,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        model_type="qwen2",
        hidden_size=3584,
        num_hidden_layers=28,
        intermediate_size=18944,
        num_attention_heads=28,
        num_key_value_heads=4,
        rms_norm_eps=1e-6,
        vocab_size=152064,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
}


def print_table(table: str, output=None):
    """Print a benchmark's markdown table and, given a path, write it there too (making
    its folder): what every script's --output does."""
    print(table)
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w") as f:
            f.write(table + "\n")


def load_bench_model(name: str, dequantize: bool):
    """A real model (path) or `random:<shape>` from RANDOM_MODELS."""
    if not name.startswith("random:"):
        return load(name, dequantize=dequantize)[0]
    import mlx.nn as nn

    config = RANDOM_MODELS[name.split(":", 1)[1]]
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    dtype = mx.float32 if dequantize else mx.float16
    model.set_dtype(dtype)
    if not dequantize:
        nn.quantize(model, group_size=64, bits=4)
        use_rows_kernel(model)
    mx.eval(model.parameters())
    return model


# name -> make_prompt_cache / generate_step keyword arguments
CONFIGS = {
    "fp16": {},
    "kv8": {"kv_bits": 8},
    "kv4": {"kv_bits": 4},
    "tq4": {"turbo_kv_bits": 4},
    "tq3": {"turbo_kv_bits": 3},
    # The pure-MLX TurboQuant attention even where a fused kernel exists.
    "tq3-ref": {"turbo_kv_bits": 3, "reference": True},
    "tq2": {"turbo_kv_bits": 2},
    "tq-k3v4": {"turbo_key_bits": 3, "turbo_value_bits": 4},
    "tq-k2v3": {"turbo_key_bits": 2, "turbo_value_bits": 3},
    "tq3-fp16-1": {"turbo_kv_bits": 3, "turbo_fp16_layers": 1},
    # Key centering only (the defaults before issue 7): no FP16 window, no key scaling.
    "tq4-plain": {"turbo_kv_bits": 4, "turbo_fp16_window": 0, "turbo_key_scaling": False},
    "tq3-plain": {"turbo_kv_bits": 3, "turbo_fp16_window": 0, "turbo_key_scaling": False},
}
CACHE_KEYS = (
    "turbo_kv_bits",
    "turbo_fp16_layers",
    "turbo_key_bits",
    "turbo_value_bits",
    "turbo_fp16_window",
    "turbo_key_scaling",
)


def prompt_tokens(n: int, vocab: int, seed: int = 0) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(100, vocab - 100, n), dtype=mx.uint32)


def run_once(model, config: dict, context: int, gen: int, prefill_step: int):
    """(prefill tok/s, decode tok/s, KV bytes) for one prompt of `context` tokens."""
    config = dict(config)
    if config.pop("reference", False):
        os.environ["MLX_LM_TURBO_REFERENCE"] = "1"
    try:
        return _run_once(model, config, context, gen, prefill_step)
    finally:
        os.environ.pop("MLX_LM_TURBO_REFERENCE", None)


def _run_once(model, config: dict, context: int, gen: int, prefill_step: int):
    cache_args = {k: v for k, v in config.items() if k in CACHE_KEYS}
    step_args = {k: v for k, v in config.items() if k not in CACHE_KEYS}
    if "kv_bits" in step_args:
        step_args.setdefault("quantized_kv_start", 0)
    cache = make_prompt_cache(model, **cache_args)
    prompt = prompt_tokens(context, model.args.vocab_size)
    mx.synchronize()
    tic = time.perf_counter()
    steps = generate_step(
        prompt,
        model,
        max_tokens=gen,
        prompt_cache=cache,
        prefill_step_size=prefill_step,
        **step_args,
    )
    next(steps)  # prefill + the first token
    prefill_s = time.perf_counter() - tic
    tic = time.perf_counter()
    n = 0
    for _ in steps:
        n += 1
    decode_s = time.perf_counter() - tic
    kv_bytes = sum(c.nbytes for c in cache)
    return context / prefill_s, n / decode_s, kv_bytes


def memory_run(args, name: str, context: int) -> dict:
    """Run one config in a fresh process; returns its peak memory figures."""
    cmd = [
        sys.executable,
        __file__,
        "--model",
        args.model,
        "--contexts",
        str(context),
        "--gen",
        str(args.gen),
        "--configs",
        name,
        "--rounds",
        "1",
        "--memory-child",
    ] + (["--dequantize"] if args.dequantize else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def child(args):
    """--memory-child: one config, one context; print peak memory as JSON."""
    import resource

    model = load_bench_model(args.model, args.dequantize)
    mx.eval(model.parameters())
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    _, _, kv_bytes = run_once(model, CONFIGS[args.configs[0]], args.contexts[0], args.gen, 2048)
    peak = mx.get_peak_memory()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {"mlx_peak": peak, "mlx_peak_over_weights": peak - base, "rss": rss, "kv": kv_bytes}
        )
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        required=True,
        help=f"a model path, or random:<shape> with shape in {sorted(RANDOM_MODELS)}",
    )
    parser.add_argument("--dequantize", action="store_true", help="float32 weights (fast on CPU)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--gen", type=int, default=64, help="tokens generated per run")
    parser.add_argument("--configs", nargs="+", default=["fp16", "tq3"], choices=sorted(CONFIGS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory runs")
    parser.add_argument("--output", help="also write the markdown table here")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return child(args)

    model = load_bench_model(args.model, args.dequantize)
    mx.eval(model.parameters())
    device = str(mx.default_device())
    results = {}
    for context in args.contexts:
        run_once(
            model, CONFIGS[args.configs[0]], min(context, 64), 4, args.prefill_step_size
        )  # warm-up
        samples = {name: [] for name in args.configs}
        for _ in range(args.rounds):
            for name in args.configs:
                samples[name].append(
                    run_once(model, CONFIGS[name], context, args.gen, args.prefill_step_size)
                )
        for name in args.configs:
            prefill, decode, kv = zip(*samples[name])
            results[(name, context)] = {
                "prefill": statistics.median(prefill),
                "decode": statistics.median(decode),
                "kv": kv[0],
            }
            if not args.no_memory:
                results[(name, context)].update(memory_run(args, name, context))

    base_name = args.configs[0]
    lines = [
        f"Model: `{os.path.basename(args.model)}`{' (dequantized to float32)' if args.dequantize else ''}; "
        f"device: {device}; {args.gen} generated tokens; median of {args.rounds} interleaved rounds.",
        "",
        f"| config | context | prefill tok/s | decode tok/s | decode vs {base_name} | KV bytes | MLX peak (MB) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for context in args.contexts:
        base = results[(base_name, context)]
        for name in args.configs:
            r = results[(name, context)]
            lines.append(
                f"| {name} | {context} | {r['prefill']:.1f} | {r['decode']:.1f} | "
                f"{r['decode'] / base['decode']:.2f}x | {r['kv'] / 1e6:.2f} MB | "
                f"{r.get('mlx_peak', float('nan')) / 1e6:.1f} | {r.get('rss', float('nan')) / 1e6:.1f} |"
            )
    table = "\n".join(lines)
    print_table(table, args.output)


if __name__ == "__main__":
    main()
