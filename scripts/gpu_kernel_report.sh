#!/usr/bin/env bash
# On the GPU machine, after .device/a/stash.sh and in the same call as .device/b/install.sh
# (a machine goes cold about 30 s after a call): the fused kernels' checks and the issue 5
# measurements, each under a time limit so that one slow step cannot eat the session's
# device time. Writes into $OUT (or ./gpu_out). Real-data checks need real_kv.npz
# (`python benchmarks/real_kv_check.py dump` on a CPU; send it with carry: ["real_kv.npz"]).
#
#   bash scripts/gpu_kernel_report.sh [STEP ...]   (default: all; one call allows 10 minutes)
#
# Steps: kernels (tests/test_turboquant_kernels.py; KERNEL_FROM=N starts at case N), real,
# attention (batch 1, 4K-128K), attention8 (8 x 32K), kv1 (batch 1, 4K-128K), kv8 (8 x 32K).
set -uo pipefail
out="${OUT:-gpu_out}"
mkdir -p "$out"
step() {  # step SECONDS FILE COMMAND...: run with a limit, keep the output, show its tail
  local limit=$1 file=$2
  shift 2
  timeout "$limit" "$@" >"$out/$file" 2>&1
  echo "== $* (rc $?)"
  grep -v "^ \|^$\|Mismatch\|First 5\|ACTUAL\|DESIRED\|Not equal" "$out/$file" | tail -25 | cut -c1-220
}
steps="${*:-kernels real attention attention8 kv1 kv8}"
has() { [[ " $steps " == *" $1 "* ]]; }
has kernels && step 200 kernel_tests.txt python3 tests/test_turboquant_kernels.py "${KERNEL_FROM:-0}"
has real && [ -f real_kv.npz ] && step 150 real_check.txt python3 benchmarks/real_kv_check.py check
# ATTENTION_ARGS: more attention_bench arguments, e.g. "--variant PREFETCH=0 --variant TARGET_GROUPS=384".
has attention && step 150 attention.md python3 benchmarks/attention_bench.py --contexts 4096 32768 131072 \
  --rounds 5 ${ATTENTION_ARGS:-} --output "$out/attention_table.md"
has attention8 && step 100 attention8.md python3 benchmarks/attention_bench.py --batch 8 --contexts 32768 \
  --rounds 3 ${ATTENTION_ARGS:-} --output "$out/attention8_table.md"
has kv1 && step 300 kv_b1.txt python3 benchmarks/kv_bench.py --model random:qwen2.5-7b \
  --contexts 4096 32768 131072 --batches 1 --gen 24 --rounds 3 \
  --configs fp16 tq3 tq4 --synthetic-from 65536 --output "$out/kv_b1"
has kv8 && step 150 kv_b8.txt python3 benchmarks/kv_bench.py --model random:qwen2.5-7b --contexts 32768 \
  --batches 8 --gen 16 --rounds 3 --configs fp16 tq3 --synthetic-from 32768 --output "$out/kv_b8"
