"""4-bit weight matmuls of a decode step: MLX's `mx.quantized_matmul` against the rows
kernel (`mlx_lm.models.quantized_matmul`), device µs a call (CUDA GPUs).

For each weight shape of a model (Qwen2.5-7B's by default) and each number of rows (batch
x new tokens), both run the same calls on `--copies` matrices of that shape in turn, so
that the weights come from memory, not from the L2 cache (the H200's holds 60 MB: one
matrix called again and again would read as faster than its memory allows), as a decode
step does. Device time from CUPTI (PyTorch's profiler, as `kernel_trace.py`), and the
bytes of weights, scales and biases over it.

    python benchmarks/matmul_bench.py --output matmul.md
    python benchmarks/matmul_bench.py --shapes 4096x4096 4096x14336 --rows 1 4 8
"""

import argparse
import os
import sys

import mlx.core as mx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_bench import print_table  # noqa: E402
from kernel_trace import summarize, traced  # noqa: E402

from mlx_lm.models import quantized_matmul as qm  # noqa: E402
from mlx_lm.models import turboquant_kernels as kernels  # noqa: E402

# Qwen2.5-7B's matrices as K x N: q and o, k and v, gate and up, down, lm_head.
QWEN_7B_SHAPES = ["3584x3584", "3584x512", "3584x18944", "18944x3584", "3584x152064"]


def weights(K: int, N: int, group_size: int, copies: int):
    out = []
    for i in range(copies):
        mx.random.seed(i)
        w = (0.02 * mx.random.normal((N, K))).astype(mx.float16)
        out.append(mx.quantize(w, group_size=group_size, bits=4))
    mx.eval(out)
    return out


def device_us(run, calls: int) -> float:
    """µs of device time a call of `run`'s `calls` calls, after an untimed run (it
    compiles the kernel)."""
    run()
    _, _, _, rows = summarize(traced(run), calls, 1)
    return rows[0][3]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=QWEN_7B_SHAPES, help="K x N of each matrix")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--copies", type=int, default=6, help="matrices of each shape, called in turn")
    p.add_argument("--calls", type=int, default=36)
    p.add_argument("--output", help="also write the table to this file")
    args = p.parse_args(argv)
    if not 1 <= min(args.rows) <= max(args.rows) <= qm.MAX_ROWS:
        raise SystemExit(f"--rows: the kernel takes 1 to {qm.MAX_ROWS} rows.")
    if kernels.fused_backend() != "cuda":
        raise SystemExit("matmul_bench.py needs MLX's CUDA backend (the rows kernel is CUDA's).")

    lines = [
        f"4-bit (group size {args.group_size}) float16 matmuls on {mx.default_device()}; "
        f"{args.calls} calls over {args.copies} matrices of each shape; device µs a call "
        "(CUPTI).",
        "",
        "| K x N | rows | mlx µs | rows kernel µs | speed-up | kernel TB/s |",
        "|---|---|---|---|---|---|",
    ]
    for shape in args.shapes:
        K, N = (int(v) for v in shape.lower().split("x"))
        mats = weights(K, N, args.group_size, args.copies)
        nbytes = sum(a.nbytes for a in mats[0])
        for m in args.rows:
            x = mx.random.normal((m, 1, K)).astype(mx.float16)
            mx.eval(x)

            def mlx_calls():
                for i in range(args.calls):
                    w, s, b = mats[i % args.copies]
                    mx.eval(mx.quantized_matmul(x, w, s, b, True, args.group_size, 4))

            def kernel_calls():
                for i in range(args.calls):
                    mx.eval(qm.rows_matmul(x, *mats[i % args.copies], args.group_size))

            ours, theirs = device_us(kernel_calls, args.calls), device_us(mlx_calls, args.calls)
            lines.append(
                f"| {K} x {N} | {m} | {theirs:.1f} | {ours:.1f} | {theirs / ours:.2f}x | "
                f"{nbytes / ours / 1e6:.2f} |"
            )
            print(lines[-1], flush=True)
    print_table("\n".join(lines), args.output)


if __name__ == "__main__":
    main()
