"""Needle in a haystack: can the model still find a fact after its KV cache is compressed?

A sentence with a random 5-digit passkey is hidden at several depths (0% = start,
100% = end) of natural filler text (`mlx_lm.perplexity.prose_text()`, from its first paragraph of
running prose) cut to several
lengths. The model gets the text in its chat template with the question "What is the
passkey?", answers greedily, and succeeds when the digits appear in its answer. The
accuracy grid (depth x length) of each cache configuration is written as a markdown
table and a PNG heatmap.

    python benchmarks/niah.py --model M.gguf --dequantize --lengths 512 1024 2048 \
        --configs fp16 tq3 tq4 kv4 kv8 --output niah.md --plot niah.png

Configurations: fp16 (uncompressed), tqN (TurboQuant N bits, keys and values, with the
defaults), tqKaVb (TurboQuant a-bit keys, b-bit values), either followed by -wN (a
float16 window of N tokens; -w0: none), -noscale (no key scaling) or -plain (TurboQuant_mse
alone: no centering, scaling or window), kvN (upstream's affine N-bit, group 64, from the
first token). Set LD_PRELOAD to OpenBLAS on the Linux CPU backend (see the README).
"""

import argparse
import random
import re
import sys
import time

from mlx_lm.generate import _encode_prompt, generate
from mlx_lm.perplexity import prose_text
from mlx_lm.utils import load

INTRO = (
    "There is an important passkey hidden inside the following text. Find it and "
    "memorize it; you will be asked for it.\n\n"
)
QUESTION = "\n\nWhat is the passkey?"
NEEDLE = " The passkey is {key}. Remember it: {key} is the passkey. "


def parse_config(name: str) -> dict:
    """Generation keyword arguments of a configuration name (see the module doc)."""
    if name == "fp16":
        return {}
    m = re.fullmatch(r"tq(?:(\d)|k(\d)v(\d))(-w\d+)?(-noscale)?(-plain)?", name.lower())
    if m:
        bits, kb, vb, window, noscale, plain = m.groups()
        kw = dict(turbo_kv_bits=int(bits)) if bits else {}
        if kb:
            kw.update(turbo_key_bits=int(kb), turbo_value_bits=int(vb))
        if window:
            kw["turbo_fp16_window"] = int(window[2:])
        if noscale:
            kw["turbo_key_scaling"] = False
        if plain:
            kw.update(turbo_key_centering=False, turbo_key_scaling=False, turbo_fp16_window=0)
        return kw
    m = re.fullmatch(r"kv(\d)", name)
    if m:
        return dict(kv_bits=int(m.group(1)), kv_group_size=64, quantized_kv_start=0)
    raise ValueError(
        f"Unknown cache configuration '{name}': use fp16, tqN, tqKaVb (e.g. tqK8V3), "
        "optionally with -wN (float16 window), -noscale or -plain, or kvN."
    )


def build_prompt(tokenizer, filler_ids, length: int, depth: float, key: str) -> list:
    """Chat-templated prompt token ids, about `length` tokens long, with the needle at
    `depth` (0-1) of the filler, moved back to the nearest sentence end."""
    overhead = len(_prompt_ids(tokenizer, NEEDLE.format(key=key)))
    n = max(length - overhead, 1)
    if n > len(filler_ids):
        raise ValueError(
            f"The filler text has {len(filler_ids)} tokens; length {length} needs about {n}. "
            "Use shorter --lengths."
        )
    filler = tokenizer.decode(filler_ids[:n])
    cut = int(depth * len(filler))
    if 0 < cut < len(filler):
        # Hide the needle between sentences, not inside a word.
        end = filler.rfind(". ", 0, cut)
        cut = end + 1 if end >= 0 else 0
    return _prompt_ids(tokenizer, filler[:cut] + NEEDLE.format(key=key) + filler[cut:])


def _prompt_ids(tokenizer, haystack: str) -> list:
    messages = [{"role": "user", "content": INTRO + haystack + QUESTION}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _encode_prompt(tokenizer, text).tolist()


def haystack_text() -> str:
    """`prose_text()` from its first paragraph of running prose on (at least two
    sentences): the GNU Coding Standards open with a table of contents, where a needle
    could not be placed between sentences."""
    paragraphs = prose_text().split("\n\n")
    first = next((i for i, p in enumerate(paragraphs) if p.count(". ") >= 2), 0)
    return "\n\n".join(paragraphs[first:])


def run_grid(model, tokenizer, configs, lengths, depths, trials=1, max_tokens=12, seed=0):
    """{config: {(length, depth): accuracy}} and the prompt lengths actually used."""
    filler_ids = tokenizer.encode(haystack_text())
    results = {c: {} for c in configs}
    rng = random.Random(seed)
    cases = [
        (length, depth, str(rng.randint(10000, 99999)))
        for length in lengths
        for depth in depths
        for _ in range(trials)
    ]
    prompts = [build_prompt(tokenizer, filler_ids, l, d / 100, k) for l, d, k in cases]
    for config in configs:
        kwargs = parse_config(config)
        tic = time.perf_counter()
        for (length, depth, key), prompt in zip(cases, prompts):
            answer = generate(
                model, tokenizer, prompt, max_tokens=max_tokens, prefill_step_size=512, **kwargs
            )
            hits = results[config].setdefault((length, depth), [])
            hits.append(key in answer)
        print(
            f"[niah] {config}: {sum(sum(h) for h in results[config].values())}/{len(cases)} "
            f"found ({time.perf_counter() - tic:.0f} s)",
            file=sys.stderr,
        )
    grid = {c: {cell: sum(h) / len(h) for cell, h in cells.items()} for c, cells in results.items()}
    return grid


def markdown(grid, lengths, depths) -> str:
    """One table per configuration (depth rows x length columns) and a summary row."""
    lines = ["| config | " + " | ".join(f"{n} tok" for n in lengths) + " | all |"]
    lines.append("|---" * (len(lengths) + 2) + "|")
    for config, cells in grid.items():
        per_length = [sum(cells[(n, d)] for d in depths) / len(depths) for n in lengths]
        overall = sum(cells.values()) / len(cells)
        lines.append(
            f"| {config} | " + " | ".join(f"{a:.0%}" for a in per_length) + f" | {overall:.0%} |"
        )
    for config, cells in grid.items():
        lines += ["", f"**{config}** (rows: needle depth, columns: context tokens)", ""]
        lines.append("| depth | " + " | ".join(str(n) for n in lengths) + " |")
        lines.append("|---" * (len(lengths) + 1) + "|")
        for d in depths:
            lines.append(f"| {d}% | " + " | ".join(f"{cells[(n, d)]:.0%}" for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def heatmap(grid, lengths, depths, path: str):
    """A depth x length accuracy heatmap per configuration, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(grid), figsize=(1.2 + 1.1 * len(lengths) * len(grid), 3.2), squeeze=False
    )
    for ax, (config, cells) in zip(axes[0], grid.items()):
        data = [[cells[(n, d)] for n in lengths] for d in depths]
        im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d}%" for d in depths])
        ax.set_xlabel("context tokens")
        ax.set_title(config)
        for i, row in enumerate(data):
            for j, a in enumerate(row):
                ax.text(j, i, f"{a:.0%}", ha="center", va="center", fontsize=8)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="passkey found")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Model directory or .gguf file.")
    parser.add_argument("--dequantize", action="store_true", help="float32 weights (CPU).")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 25, 50, 75, 100])
    parser.add_argument("--configs", nargs="+", default=["fp16", "tq3", "tq4", "kv4", "kv8"])
    parser.add_argument("--trials", type=int, default=1, help="Passkeys per grid cell.")
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="Write the markdown table here.")
    parser.add_argument("--plot", default=None, help="Write the PNG heatmap here.")
    args = parser.parse_args(argv)
    for config in args.configs:
        try:
            parse_config(config)
        except ValueError as e:
            parser.error(str(e))
    if any(not 0 <= d <= 100 for d in args.depths):
        parser.error("--depths are percentages between 0 and 100.")

    model, tokenizer = load(args.model, dequantize=args.dequantize)
    grid = run_grid(
        model,
        tokenizer,
        args.configs,
        args.lengths,
        args.depths,
        trials=args.trials,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    table = markdown(grid, args.lengths, args.depths)
    print(table)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table)
    if args.plot:
        heatmap(grid, args.lengths, args.depths, args.plot)


if __name__ == "__main__":
    main()
