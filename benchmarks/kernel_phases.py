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

import os
import statistics
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention_bench import filled_caches, layer_parser  # noqa: E402
from generate_bench import print_table  # noqa: E402

from mlx_lm.models import turboquant_kernels as kernels  # noqa: E402
from mlx_lm.models.base import scaled_dot_product_attention  # noqa: E402

PHASES = [
    "prologue",
    "query load",
    "rotation",
    "mean dot + fragments",
    "token loop",
    "warps' merge + write",
]
# Mark k (phase k - 1 ends there) goes right before this text of the body, which follows
# the barrier that ends the phase. Marks 1-4 are taken in the first pass over key-mean
# segments only.
MARKS = [
    "    for (int i = tq_tid; i < RC * D; i += NT) {\n      const int e = i % D;",
    "    if (ROT) {\n      // Strides 1..16 (index bits 0-4) by shuffles",
    "    // (Π(q∘σ_s))·M̃_s, a warp per row.",
    "    // (b, MMA) 32 tokens",
    "  if (MMA && (lane & 3) == 0) {",  # after the barrier that starts the warps' merge
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
    body no longer has the text a mark goes before (update MARKS with the kernel)."""
    for k, anchor in enumerate(MARKS, start=1):
        if body.count(anchor) != 1:
            raise ValueError(f"kernel_phases: the partial kernel no longer has {anchor!r}")
        mark = f"tqc[{k}] = clock64();\n"
        if k < 5:
            mark = "if (s == s_first) " + mark
        body = body.replace(anchor, mark + anchor)
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


def main(argv=None):
    parser = layer_parser(__doc__.splitlines()[0], (1024, 16384), rounds=5)
    args = parser.parse_args(argv)
    if kernels.fused_backend() != "cuda":
        raise SystemExit("kernel_phases needs MLX's CUDA backend on a CUDA GPU.")
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
        f"{args.bits} bits (float16 window {args.fp16_window}, key scaling "
        f"{'off' if args.no_key_scaling else 'on'}); {args.calls} chained calls, {args.rounds - 1} "
        "rounds; µs, median group.",
        "",
        "| context | " + " | ".join(PHASES) + " | group | call span |",
        "|---|" + "---|" * (len(PHASES) + 2),
    ]
    for context in args.contexts:
        _, tq, _ = filled_caches(
            B, args.kv_heads, D, context, args.bits, args.fp16_window, not args.no_key_scaling
        )
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
