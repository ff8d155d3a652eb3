"""`mlx_lm.cache_prompt`: run a long prompt once and save its KV cache to a file, so that
`mlx_lm.generate --prompt-cache-file` can answer many questions about it cheaply."""

import argparse
import sys
import time

import mlx.core as mx

from .generate import (
    add_kv_args,
    add_model_args,
    apply_chat_template,
    build_messages,
    check_kv_flags,
    fail,
    generate_step,
    load_cli_model,
    model_fingerprint,
    turbo_kwargs,
)
from .models.cache import make_prompt_cache, save_prompt_cache

# The user's question goes where this marker sits in the chat template; everything
# before it is the cached prefix.
QUERY_MARKER = "<query>"


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="Cache the KV state of a prompt.")
    add_model_args(parser)
    parser.add_argument(
        "--prompt", "-p", required=True, help="Prompt to cache ('-' reads it from stdin)."
    )
    parser.add_argument("--prompt-cache-file", required=True, help="File to write the cache to.")
    parser.add_argument(
        "--system-prompt", default=None, help="System prompt for the chat template."
    )
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Cache the prompt as it is, without the chat template.",
    )
    parser.add_argument("--prefill-step-size", type=int, default=2048, help="Prefill chunk size.")
    add_kv_args(parser)
    return parser


def cached_prefix(tokenizer, prompt: str, system_prompt, use_template: bool, template_config=None):
    """The text to cache: the templated conversation up to where the question goes."""
    if not use_template:
        return prompt
    full = apply_chat_template(
        tokenizer, build_messages(prompt + QUERY_MARKER, system_prompt), template_config
    )
    return full[: full.index(QUERY_MARKER)]


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (a model directory, a .gguf file or a hub id).")
    check_kv_flags(parser, args)

    model, tokenizer, config = load_cli_model(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    use_template = not args.ignore_chat_template and tokenizer.has_chat_template
    text = cached_prefix(tokenizer, prompt, args.system_prompt, use_template)
    bos = getattr(tokenizer, "bos_token", None)
    tokens = tokenizer.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
    if not tokens:
        fail("The prompt is empty: nothing to cache.")

    try:
        cache = make_prompt_cache(model, max_kv_size=args.max_kv_size, **turbo_kwargs(args))
    except ValueError as e:
        fail(str(e))
    tic = time.perf_counter()

    shown = []

    def progress(done, total):
        print(f"\rProcessed {done}/{total} tokens", end="", file=sys.stderr, flush=True)
        shown.append(done)

    # The same prefill as generation (chunks, --kv-bits conversion), with no new token.
    try:
        for _ in generate_step(
            mx.array(tokens),
            model,
            max_tokens=0,
            prompt_cache=cache,
            prefill_step_size=args.prefill_step_size,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
            prompt_progress_callback=progress,
        ):
            pass
    except ValueError as e:  # e.g. --kv-group-size not dividing the cache's widths
        if shown:
            print(file=sys.stderr)
        fail(str(e))
    print(file=sys.stderr)
    elapsed = time.perf_counter() - tic
    metadata = {
        "model": str(config.get("model_path", args.model)),
        "model_fingerprint": model_fingerprint(config, model),
        "prompt_text": text,
        # generate puts the question after this text, inside the same user message.
        "user_prefix": prompt,
        "system_prompt": args.system_prompt or "",
    }
    save_prompt_cache(args.prompt_cache_file, cache, metadata)
    print(
        f"Cached {len(tokens)} tokens ({len(tokens) / elapsed:.1f} tok/s); "
        f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB; saved {args.prompt_cache_file}"
    )


if __name__ == "__main__":
    main()
