"""Where a thread group of the partial decode kernel spends its time (CUDA GPUs).

CUPTI (`kernel_trace.py`) gives a kernel's duration, not what inside it takes the time.
This writes `clock64()` marks into the partial kernel's source at its phase boundaries
(thread 0 of each group, right after the barrier that ends each phase) and has thread 0
store them, with the group's `%globaltimer` start and end, over its first output row.
Then one layer's attention runs as `attention_bench.py` runs it (a cache filled with
random keys and values, `--calls` chained calls, `--rounds` rounds, the first untimed),
and the table gives each phase of the median group in µs, and the span of a call (first
group's start to last group's end), over the second half of each round's calls: the
first calls after the host's pause between rounds ran many times slower on the H200
(its clocks coming back up; one call alone at 16K spanned 395 µs against 12.5). The
marks cost registers, so the kernels measured are not quite the ones that run; compare
variants with one another, not with CUPTI.

    python benchmarks/kernel_phases.py --contexts 1024 16384 131072 --output phases.md
    python benchmarks/kernel_phases.py --contexts 32768 --batch 8
"""

import argparse
import os
import statistics
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import print_table  # noqa: E402

from mlx_lm.models import turboquant_kernels as kernels  # noqa: E402

PHASES = [
    "prologue",
    "query load",
    "rotation",
    "mean dot + fragments",
    "token loop",
    "warps' merge + write",
]
# Phase k ends at mark k + 1: (text of the body the mark follows, the mark). Marks 1-4
# are taken in the first pass over key-mean segments only.
MARKS = [
    ("    // rows).\n    TQ_SYNC();\n", "    if (s == s_first) tqc[1] = clock64();\n"),
    ("      qs[i] = x;\n    }\n    TQ_SYNC();\n", "    if (s == s_first) tqc[2] = clock64();\n"),
    (
        "        qs[i] *= 1.0f / sqrt((float)D);\n      }\n      TQ_SYNC();\n    }\n",
        "    if (s == s_first) tqc[3] = clock64();\n",
    ),
    ("    TQ_SYNC();\n\n    // (b, MMA)", None),  # before the token loop: mark 4
]
START = (
    "long long tqc[7] = {0, 0, 0, 0, 0, 0, 0};\n"
    "unsigned long long tq_start, tq_end;\n"
    'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(tq_start));\n'
    "tqc[0] = clock64();\n"
)
END = """
  TQ_SYNC();
  tqc[6] = clock64();
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(tq_end));
  if (tq_tid == 0) {  // over the group's first output row (the results are lost)
    float* o = partial_out + (out_base + r0) * D;
    for (int k = 1; k < 7; k++) {
      o[k - 1] = (float)(tqc[k] - tqc[0]);
    }
    const unsigned long long a = tq_start & ((1ull << 40) - 1);
    const unsigned long long b = tq_end & ((1ull << 40) - 1);
    o[6] = (float)(a >> 20);
    o[7] = (float)(a & 0xFFFFF);
    o[8] = (float)(b >> 20);
    o[9] = (float)(b & 0xFFFFF);
  }
"""


def with_marks(body: str) -> str:
    """The partial kernel's body with the phase marks written in; fails loudly where the
    body no longer has the text a mark follows (update MARKS with the kernel)."""
    for anchor, mark in MARKS:
        if body.count(anchor) != 1:
            raise ValueError(f"kernel_phases: the partial kernel no longer has {anchor!r}")
        if mark is None:
            mark_then = (
                "    TQ_SYNC();\n    if (s == s_first) tqc[4] = clock64();\n\n    // (b, MMA)"
            )
            body = body.replace(anchor, mark_then)
        else:
            body = body.replace(anchor, anchor + mark)
    merge = body.find("  // Merge the warps")
    if merge < 0:
        raise ValueError("kernel_phases: the partial kernel no longer merges its warps")
    at = body.index("  TQ_SYNC();\n", merge) + len("  TQ_SYNC();\n")
    body = body[:at] + "  tqc[5] = clock64();\n" + body[at:]
    return START + body + END


def group_marks(partial_out: np.ndarray, D: int) -> np.ndarray:
    """[groups, 8]: the six cumulative marks (cycles), start and end (ns, mod 2^40) of
    each thread group of one call, from the partial output [BH, splits, rows, D]."""
    rows = partial_out.reshape(-1, partial_out.shape[2], D)[:, 0, :10].astype(np.int64)
    start = (rows[:, 6] << 20) | rows[:, 7]
    end = (rows[:, 8] << 20) | rows[:, 9]
    return np.concatenate([rows[:, :6], start[:, None], end[:, None]], axis=1)


def summarize(calls: list) -> tuple:
    """(µs per phase of the median group, µs of the median group, median call span µs)
    from `group_marks` of several calls; the clock rate from cycles over ns."""
    marks = np.concatenate(calls)
    ns = np.maximum(marks[:, 7] - marks[:, 6], 1)
    ghz = float(np.median(marks[:, 5] / ns))
    cumulative = np.median(marks[:, :6], axis=0) / ghz / 1e3
    phases = np.diff(np.concatenate([[0.0], cumulative]))
    spans = [(c[:, 7].max() - c[:, 6].min()) / 1e3 for c in calls]
    return phases, cumulative[-1], statistics.median(spans)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--calls", type=int, default=28)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--output")
    args = p.parse_args()
    if kernels.fused_backend() != "cuda":
        raise SystemExit("kernel_phases needs MLX's CUDA backend on a CUDA GPU.")

    from attention_bench import filled_caches

    from mlx_lm.models.base import scaled_dot_product_attention

    kernels.PARTIAL_BODY = with_marks(kernels.PARTIAL_BODY)
    kernels.COMPILE_DECODE = False  # so that the partial outputs can be kept
    outputs = []
    attend = kernels._attend

    def keeping_partial(call, *arrays):
        def partial(**kw):
            out = call.partial(**kw)
            outputs.append(out[0])
            return out

        return attend(call._replace(partial=partial), *arrays)

    kernels._attend = keeping_partial
    B, D = args.batch, args.head_dim
    lines = [
        f"Partial decode kernel with phase marks on {mx.default_device()}: batch {B}, "
        f"{args.heads} query / {args.kv_heads} KV heads, head_dim {D}, TurboQuant "
        f"{args.bits} bits (defaults); {args.calls} chained calls, {args.rounds - 1} "
        "rounds; µs, median group.",
        "",
        "| context | " + " | ".join(PHASES) + " | group | call span |",
        "|---|" + "---|" * (len(PHASES) + 2),
    ]
    for context in args.contexts:
        _, tq, _ = filled_caches(B, args.kv_heads, D, context, args.bits)
        q = mx.random.normal((B, args.heads, 1, D)).astype(mx.float16)
        calls = []
        for r in range(args.rounds):
            outputs.clear()
            x = q
            for _ in range(args.calls):
                x = scaled_dot_product_attention(x, None, None, tq, D**-0.5, None)
            mx.eval(x, *outputs)
            if r:  # the round's second half: the GPU busy, its clocks up
                calls += [group_marks(np.array(o), D) for o in outputs[len(outputs) // 2 :]]
        phases, group, span = summarize(calls)
        cells = " | ".join(f"{x:.2f}" for x in phases)
        lines.append(f"| {B} x {context} | {cells} | {group:.2f} | {span:.1f} |")
        print(lines[-1], flush=True)
    print_table("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
