#!/usr/bin/env bash
# Install mlx-lm-turbo on a fresh machine. Linux: MLX's CPU backend plus OpenBLAS
# (MLX's bundled BLAS is ~75x slower; scripts/env.sh preloads OpenBLAS).
#   bash scripts/setup.sh          # the package
#   bash scripts/setup.sh --test   # the package and what the tests need (torch CPU, openai, ...)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ]; then
  if ! dpkg -L libopenblas0-pthread >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    SUDO=""; [ "$(id -u)" = "0" ] || SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq libopenblas0-pthread >/dev/null
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then EXTRA="cuda13"; else EXTRA="cpu"; fi
else
  EXTRA="mac"
fi

if [ "${1:-}" = "--test" ]; then
  # torch is only the reference for parity tests; 2.13.0 is the CPU build.
  $PY -m pip install -q "torch==2.13.0"
  EXTRA="$EXTRA,test,dev"
fi
$PY -m pip install -q -e ".[$EXTRA]"
