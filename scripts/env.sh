# Source this (". scripts/env.sh") to run MLX's CPU backend on OpenBLAS (Linux).
_openblas=$(dpkg -L libopenblas0-pthread 2>/dev/null | grep 'libblas\.so\.3$' | head -n 1)
if [ -n "$_openblas" ] && [ -e "$_openblas" ]; then
  export LD_PRELOAD="$_openblas${LD_PRELOAD:+:$LD_PRELOAD}"
fi
unset _openblas
