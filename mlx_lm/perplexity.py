"""Measure what a KV-cache compression costs: `mlx_lm.perplexity`.

The text is fed through the prompt cache the way generation feeds a prompt, in chunks,
so that every token after the first chunk attends to keys and values that the cache has
already compressed (with TurboQuant's FP16 window, a chunk's own tokens and the window's
are read in FP16: chunks of at most the window's 64 tokens measure what decoding costs).
The command reports the perplexity of that run and compares its next-token distributions with a run through an uncompressed cache on the same text:
mean KL(FP || compressed) and top-1 agreement. A perplexity alone hides compensating
errors; KL and top-1 do not.

    mlx_lm.perplexity --model M --data FILE --turbo-kv-bits 4
    mlx_lm.perplexity --model M --kv-bits 4 --output results.jsonl

Without `--data` the text is `prose_text()`: English prose from a Debian package.
"""

import argparse
import gzip
import json
import math
import os
import sys
import time
from typing import Callable, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .models import cache as cache_module

DEFAULT_CONTEXT = 2048
DEFAULT_CHUNK_SIZE = 512

# Natural English prose installable here. Debian's `gnu-standards` package (no
# dependencies, ~1.9 MB) ships the GNU Coding Standards as plain text: about 34,000 words
# of running essay prose (GFDL), varied enough for perplexity and long enough for 2K-8K
# token contexts. The fallback is the GNU GPL v3 text from `base-files`, on every Debian
# machine, but legal prose and only about 5,600 words.
PROSE_PACKAGE = "gnu-standards"
PROSE_FILE = "/usr/share/doc/gnu-standards/standards.text.gz"
FALLBACK_PROSE_FILE = "/usr/share/common-licenses/GPL-3"


def prose_text() -> str:
    """English prose for quality measurements.

    Returns the GNU Coding Standards from Debian's `gnu-standards` package when it is
    installed (`apt-get install gnu-standards`), else the GPL v3 text that Debian's
    base-files ships.

    Raises:
        FileNotFoundError: neither text is on this machine.
    """
    if os.path.exists(PROSE_FILE):
        with gzip.open(PROSE_FILE, "rt", encoding="utf-8") as f:
            return f.read()
    if os.path.exists(FALLBACK_PROSE_FILE):
        with open(FALLBACK_PROSE_FILE, encoding="utf-8") as f:
            return f.read()
    raise FileNotFoundError(
        f"No prose text found: install Debian's {PROSE_PACKAGE} package "
        f"(apt-get install {PROSE_PACKAGE}) or give a text file with --data."
    )


def teacher_forced_logprobs(
    model: nn.Module,
    tokens: Union[mx.array, List[int]],
    cache: list,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    progress: Optional[Callable[[int], None]] = None,
) -> mx.array:
    """Log-probabilities of every next token, the text fed through `cache` in chunks.

    Args:
        model: the model.
        tokens: T token ids.
        cache: a prompt cache (`make_prompt_cache`), filled in place. With `kv_bits` its
            plain KVCache layers are swapped for affine-quantized ones after each chunk,
            as `generate_step` does, so the list itself changes.
        chunk_size: tokens per forward pass.
        kv_bits, kv_group_size, quantized_kv_start: upstream's affine KV quantization.
        progress: called with the number of tokens of each finished chunk.

    Returns:
        [T-1, V] float32 log-probabilities: row t is the distribution over token t+1.
    """
    from .generate import maybe_quantize_kv_cache

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive (got {chunk_size}).")
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.ndim != 1 or tokens.size < 2:
        raise ValueError(f"tokens must be a 1-D sequence of at least 2 ids (got {tokens.shape}).")
    out = []
    for start in range(0, tokens.size, chunk_size):
        chunk = tokens[start : start + chunk_size]
        logits = model(chunk[None], cache=cache)[0].astype(mx.float32)
        out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        maybe_quantize_kv_cache(cache, quantized_kv_start, kv_group_size, kv_bits)
        # Evaluate per chunk: the next chunk must see the cache as it is now, and one
        # lazy graph over the whole text would hold every intermediate in memory.
        mx.eval(out[-1], [c.state for c in cache])
        if progress is not None:
            progress(chunk.size)
    # The last position predicts a token past the text.
    return mx.concatenate(out, axis=0)[:-1]


def compare(ref_logprobs: mx.array, logprobs: mx.array, targets: mx.array) -> dict:
    """Perplexities of both runs, mean KL(ref || run) and top-1 agreement.

    Args:
        ref_logprobs: [N, V] log-probabilities of the reference (uncompressed) run.
        logprobs: [N, V] log-probabilities of the run under test.
        targets: [N] the tokens that actually follow.

    Returns:
        dict(ppl, ref_ppl, kl, top1) as Python floats.
    """
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"The two runs differ in shape: {ref_logprobs.shape} vs {logprobs.shape}.")
    if targets.shape != ref_logprobs.shape[:1]:
        raise ValueError(
            f"targets must have one id per row ({ref_logprobs.shape[0]}), got {targets.shape}."
        )
    targets = targets.astype(mx.int32)[:, None]

    def ppl(lp):
        return math.exp(-mx.mean(mx.take_along_axis(lp, targets, axis=-1)).item())

    ref_p = mx.exp(ref_logprobs)
    kl = mx.sum(ref_p * (ref_logprobs - logprobs), axis=-1)
    top1 = mx.argmax(ref_logprobs, axis=-1) == mx.argmax(logprobs, axis=-1)
    return dict(
        ppl=ppl(logprobs),
        ref_ppl=ppl(ref_logprobs),
        # Clamp rounding noise (KL >= 0); exact zero when the runs agree.
        kl=max(mx.mean(kl).item(), 0.0),
        top1=mx.mean(top1.astype(mx.float32)).item(),
    )


def describe_config(args) -> str:
    """A short name of the cache configuration the flags select."""
    parts = []
    if args.kv_bits is not None:
        parts.append(f"affine kv{args.kv_bits} g{args.kv_group_size}")
        if args.quantized_kv_start:
            parts.append(f"from {args.quantized_kv_start}")
    elif args.turbo_kv_bits or args.turbo_key_bits or args.turbo_value_bits:
        k = args.turbo_key_bits or args.turbo_kv_bits
        v = args.turbo_value_bits or args.turbo_kv_bits
        parts.append(f"turbo K{k}/V{v}")
        if args.turbo_fp16_layers:
            parts.append(f"fp16-layers {args.turbo_fp16_layers}")
        if not args.turbo_key_centering:
            parts.append("uncentered")
        if args.turbo_key_scaling is False and args.turbo_key_centering:
            parts.append("unscaled")
        if args.turbo_fp16_window is not None:
            parts.append(f"fp16-window {args.turbo_fp16_window}")
    else:
        parts.append("fp16")
    if args.max_kv_size is not None:
        parts.append(f"max-kv {args.max_kv_size}")
    return " ".join(parts)


def setup_arg_parser():
    from .generate import _positive_int, add_kv_args, add_model_args

    parser = argparse.ArgumentParser(
        description="Perplexity, KL and top-1 agreement of a compressed KV cache against "
        "an uncompressed one, on the same text."
    )
    add_model_args(parser)
    parser.add_argument(
        "--data",
        type=str,
        default=None,
        help="A UTF-8 text file (default: the GNU Coding Standards from Debian's "
        "gnu-standards package, else the GPL v3 text).",
    )
    parser.add_argument(
        "--context",
        type=_positive_int,
        default=DEFAULT_CONTEXT,
        help="Tokens to score: the first N+1 tokens of the text are used.",
    )
    parser.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=DEFAULT_CHUNK_SIZE,
        help="Tokens per forward pass through the cache (like a prefill step). With a "
        "TurboQuant FP16 window a chunk's queries read the chunk in FP16: a chunk no longer "
        "than the window (64) measures what decoding costs.",
    )
    add_kv_args(parser)
    # Here affine quantization starts at once, so that the text attends to it.
    parser.set_defaults(quantized_kv_start=0)
    parser.add_argument(
        "--output", type=str, default=None, help="Append the figures as one JSON line here."
    )
    return parser


def load_tokens(tokenizer, text: str, context: int, source: str) -> mx.array:
    """The first `context` + 1 tokens of `text`; ValueError when it is too short."""
    tokens = tokenizer.encode(text)
    if len(tokens) < context + 1:
        raise ValueError(
            f"{source} has {len(tokens)} tokens but --context {context} needs {context + 1}. "
            f"Give a longer text or --context {max(len(tokens) - 1, 1)} or less."
        )
    return mx.array(tokens[: context + 1])


def main(argv: Optional[List[str]] = None):
    from tqdm import tqdm

    from .generate import _check_kv_bits, check_kv_flags, fail, load_cli_model, turbo_kwargs

    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (a model directory, a .gguf file or a hub id).")
    check_kv_flags(parser, args)

    if args.data is None:
        try:
            text, source = prose_text(), "prose_text()"
        except FileNotFoundError as e:
            fail(str(e))
    else:
        try:
            with open(args.data, encoding="utf-8") as f:
                text, source = f.read(), args.data
        except (OSError, UnicodeDecodeError) as e:
            fail(f"Could not read --data '{args.data}': {e}")

    model, tokenizer, _ = load_cli_model(args)
    try:
        tokens = load_tokens(tokenizer, text, args.context, source)
    except ValueError as e:
        fail(str(e))
    targets = tokens[1:]

    config = describe_config(args)
    compressed = config != "fp16"
    try:
        cache = cache_module.make_prompt_cache(
            model, max_kv_size=args.max_kv_size, **turbo_kwargs(args)
        )
        _check_kv_bits(args.kv_bits, args.kv_group_size, cache)
    except ValueError as e:
        fail(str(e))

    def run(name, run_cache, **kv):
        with tqdm(total=tokens.size, desc=name, unit="tok", file=sys.stderr) as bar:
            return teacher_forced_logprobs(
                model, tokens, run_cache, args.chunk_size, progress=bar.update, **kv
            )

    tic = time.perf_counter()
    ref = run("fp16", cache_module.make_prompt_cache(model) if compressed else cache)
    if compressed:
        logprobs = run(
            config,
            cache,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
        )
    else:
        logprobs = ref
    figures = compare(ref, logprobs, targets)
    seconds = time.perf_counter() - tic

    delta = 100 * (figures["ppl"] / figures["ref_ppl"] - 1)
    print(
        f"{config}: ppl {figures['ppl']:.3f} (fp16 {figures['ref_ppl']:.3f}, {delta:+.1f}%), "
        f"KL {figures['kl']:.4f}, top1 {figures['top1']:.3f} over {targets.size} tokens"
    )
    print("| KV config | tokens | perplexity | Δ | mean KL | top-1 vs FP16 |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {config} | {targets.size} | {figures['ppl']:.2f} | {delta:+.1f}% | "
        f"{figures['kl']:.4f} | {figures['top1']:.3f} |"
    )
    if args.output is not None:
        record = dict(
            model=args.model,
            data=source,
            config=config,
            context=args.context,
            chunk_size=args.chunk_size,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size if args.kv_bits else None,
            max_kv_size=args.max_kv_size,
            **turbo_kwargs(args),
            tokens=targets.size,
            delta_ppl_percent=delta,
            seconds=seconds,
            **figures,
        )
        with open(args.output, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
