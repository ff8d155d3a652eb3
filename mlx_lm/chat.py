"""`mlx_lm.chat`: a small REPL that keeps one prompt cache across turns, so each turn
only prefills the new messages."""

import argparse

import mlx.core as mx

from .generate import (
    add_kv_args,
    add_model_args,
    check_kv_flags,
    fail,
    load_cli_model,
    stream_generate,
    turbo_kwargs,
)
from .models.cache import make_prompt_cache
from .sample_utils import make_sampler


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="Chat with an LLM.")
    add_model_args(parser)
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature.")
    parser.add_argument("--top-p", type=float, default=1.0, help="Nucleus sampling top-p.")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed.")
    parser.add_argument("--max-tokens", "-m", type=int, default=256, help="Tokens per reply.")
    parser.add_argument("--system-prompt", default=None, help="System prompt.")
    add_kv_args(parser)
    return parser


def main(argv=None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (a model directory, a .gguf file or a hub id).")
    check_kv_flags(parser, args)
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be positive (got {args.max_tokens}).")
    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer, _ = load_cli_model(args)

    def new_cache():
        try:
            return make_prompt_cache(model, max_kv_size=args.max_kv_size, **turbo_kwargs(args))
        except ValueError as e:
            fail(str(e))

    prompt_cache = new_cache()
    sampler = make_sampler(args.temp, args.top_p)
    print("[INFO] Starting chat session. Type 'q' to quit, 'r' to reset, 'h' for help.")
    first_turn = True
    while True:
        try:
            query = input(">> ")
        except EOFError:
            break
        if query == "q":
            break
        if query == "r":
            prompt_cache = new_cache()
            first_turn = True
            continue
        if query == "h":
            print("q: quit, r: reset the conversation, h: this help")
            continue
        messages = []
        if first_turn and args.system_prompt:
            messages.append({"role": "system", "content": args.system_prompt})
        messages.append({"role": "user", "content": query})
        # The cache already holds earlier turns; template only the new message.
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        bos = getattr(tokenizer, "bos_token", None)
        tokens = tokenizer.encode(
            prompt, add_special_tokens=first_turn and bos is not None and not prompt.startswith(bos)
        )
        first_turn = False
        for response in stream_generate(
            model,
            tokenizer,
            tokens,
            max_tokens=args.max_tokens,
            sampler=sampler,
            prompt_cache=prompt_cache,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
        ):
            print(response.text, flush=True, end="")
        print()


if __name__ == "__main__":
    main()
