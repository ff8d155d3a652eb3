"""Registers, spills and shared memory of the fused decode kernels, as ptxas reports them.

MLX compiles `mx.fast.cuda_kernel` sources with NVRTC and says nothing of what the
compiler made of them. This script builds the same sources (the CUDA prelude, the shared
header, a kernel body with its template constants written in, as `_specialised` does),
compiles them for the GPU with `nvcc` (no GPU needed: this CPU machine has CUDA 13's nvcc
in /usr/local/cuda/bin), and prints ptxas' report for each: registers, spills, shared
memory. A kernel that spills to local memory, or holds so many registers that few thread
groups fit on an SM, is slow however few instructions it runs. (NVRTC on the GPU machine
need not agree with this nvcc: Nsight Compute found 164 registers in the partial kernel
that this script's nvcc 13.0 compiles to 128, hence its launch bounds for long calls.)
Where `cuobjdump` and `nvdisasm` are on the PATH (pip: nvidia-cuda-cuobjdump,
nvidia-cuda-nvdisasm) it also counts the SASS instructions of the tensor-core token loop
(one warp's 32 tokens), by kind.

    python benchmarks/kernel_resources.py [--arch sm_90] [--source-only]

The kernels are those of a decode step with Qwen2.5-7B shapes (28 query / 4 KV heads,
head_dim 128), TurboQuant 3 bits and the defaults, with and without tensor cores, and
Gemma 3's head_dim 256. `--source-only` prints the translation units (this runs anywhere).
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_turboquant_kernels import INPUT_TYPES  # noqa: E402 (the syntax check's table)

from mlx_lm.models import turboquant_kernels as kernels  # noqa: E402

# A decode call of the defaults: float16 queries, window and norms, uint8 ring segments.
CUDA_TYPES = {"HALF": "__half", "SEG": "uint8_t", "out_t": "__half"}

PREAMBLE = """
#include <cuda_fp16.h>
typedef unsigned int uint32_t;
typedef unsigned short uint16_t;
typedef unsigned char uint8_t;
typedef int int32_t;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
"""


def decode_plans():
    """(label, partial template) of the partial kernels a decode step of these shapes
    launches; `_decode_plan`'s own constants, so this follows the code."""
    plans = []
    for label, D, n_q, n_kv, mma in [
        ("qwen2.5-7b mma", 128, 28, 4, True),
        ("qwen2.5-7b per-lane", 128, 28, 4, False),
        ("gemma3 mma", 256, 4, 1, True),
    ]:
        kw = vw = D * 3 // 32
        flags = (1, 0, 1, 0)  # key scaling, no ring, a float16 window, one query token
        args = (D, n_q, n_kv, 1, 3, 3, kw, vw, 8, flags, mma)
        partial, _, _ = kernels._decode_plan(*args)
        plans.append((label, partial))
        if label == "qwen2.5-7b mma":  # calls of more than LONG_KERNEL_GROUPS groups
            plans.append(
                (label + ", long calls", partial + [("MINB", kernels.LONG_KERNEL_MIN_GROUPS)])
            )
    return plans


def translation_unit(template) -> str:
    header, partial, *_ = kernels.kernel_sources("cuda")
    name, inputs, outputs = kernels.KERNELS[0]
    consts = "".join(f"constexpr int {k} = {int(v)};\n" for k, v in template if k != "MINB")
    header += kernels.launch_bounds(template)  # as `_specialised` writes them
    args = [f"const {CUDA_TYPES.get(INPUT_TYPES[n], INPUT_TYPES[n])}* {n}" for n in inputs]
    args += [f"{CUDA_TYPES.get(INPUT_TYPES[n], INPUT_TYPES[n])}* {n}" for n in outputs]
    return (
        PREAMBLE
        + header
        + f'extern "C" __global__ void {name}({", ".join(args)}) {{\n{consts}{partial}}}\n'
    )


def find_nvcc() -> str:
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        raise SystemExit(
            "kernel_resources needs CUDA's nvcc (none on the PATH or in /usr/local/cuda/bin): "
            "install the CUDA toolkit, or run with --source-only."
        )
    return nvcc


def compile_report(source: str, arch: str) -> str:
    """ptxas' report from nvcc, and the SASS token-loop counts where cuobjdump runs."""
    nvcc = find_nvcc()
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "kernel.cu"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(source)
        flags = [f"-arch={arch}", "-cubin", "-std=c++17", "-Xptxas", "-v", "-o", cubin, src]
        r = subprocess.run([nvcc, *flags], capture_output=True, text=True)
        report = r.stdout + r.stderr
        if r.returncode or not shutil.which("cuobjdump"):
            return report
        sass = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True)
    code = []
    for line in sass.stdout.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).strip()))
    mma = [a for a, t in code if "HMMA" in t]
    loop = None  # the shortest backward branch around every tensor-core product
    for a, t in code:
        m = re.search(r"BRA\s+0x([0-9a-f]+)", t)
        if mma and m and int(m.group(1), 16) <= mma[0] and a >= mma[-1]:
            if loop is None or a - int(m.group(1), 16) < loop[1] - loop[0]:
                loop = (int(m.group(1), 16), a)
    if loop is None:
        return report + "no tensor-core loop in the SASS\n"
    kinds = collections.Counter(
        re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for a, t in code if loop[0] <= a <= loop[1]
    )
    top = ", ".join(f"{k} {n}" for k, n in kinds.most_common(10))
    return report + f"ptxas info    : token loop {sum(kinds.values())} SASS instructions: {top}\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90")
    parser.add_argument("--source-only", action="store_true")
    args = parser.parse_args()
    for label, template in decode_plans():
        source = translation_unit(template)
        print(f"== {label}: " + ", ".join(f"{k}={v}" for k, v in template), flush=True)
        if args.source_only:
            print(source)
            continue
        report = compile_report(source, args.arch)
        lines = [x for x in report.splitlines() if "ptxas" in x or "error" in x or "failed" in x]
        print("\n".join(lines[-12:] or report.splitlines()[-12:]), flush=True)


if __name__ == "__main__":
    main()
