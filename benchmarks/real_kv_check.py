"""Fused decode kernel against the reference on real keys and values.

    python benchmarks/real_kv_check.py dump            # on a CPU: writes real_kv.npz
    python benchmarks/real_kv_check.py check [backend [layer ...]]  # on the GPU (or
                                                # "emulate"); layers e.g. smollm2_15

`dump` runs SmolLM2-135M and Gemma 3 270M (the sample GGUFs, dequantized) over 700
tokens of the GPL-3 text and keeps the queries of the last 4 positions and the keys and
values of a few full-attention layers; `check` fills TurboQuant caches with the defaults
(3 and 4 bits) from them and compares the kernel with the reference (computed on the CPU)
for 1 and 4 query tokens. The GPU machine cannot fetch the GGUFs: dump here, send the
file along.
"""

import os
import sys

import mlx.core as mx
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from test_turboquant_kernels import BACKEND, check_real_layer, real_attention_inputs  # noqa

DATA = "real_kv.npz"
TEXT = "/usr/share/common-licenses/GPL-3"


def dump():
    from mlx_lm import load
    from mlx_lm.sample_models import fetch

    text = open(TEXT).read()
    out = {}
    for name, layers in (("smollm2", [0, 15, 29]), ("gemma3", [5, 17])):
        model, tokenizer = load(str(fetch(name)), dequantize=True)
        tokens = tokenizer.encode(text)[:700]
        for i, (q, k, v, scale) in real_attention_inputs(model, tokens, layers).items():
            out[f"{name}_{i}_q"] = np.array(q[:, :, -4:].astype(mx.float32))
            out[f"{name}_{i}_k"] = np.array(k.astype(mx.float16))
            out[f"{name}_{i}_v"] = np.array(v.astype(mx.float16))
            out[f"{name}_{i}_scale"] = np.array(scale, dtype=np.float32)
    np.savez_compressed(DATA, **out)


def check(backend, only=()):
    if backend == "emulate":
        import kernel_emulator

        kernel_emulator.register()
    data = np.load(DATA)
    worst = 0.0
    for n in sorted({k.rsplit("_", 1)[0] for k in data.files}):
        if only and n not in only:
            continue
        q, k, v = (mx.array(data[f"{n}_{x}"]) for x in "qkv")
        scale = float(data[f"{n}_scale"])
        for bits in (3, 4):
            for L in (1, 4):
                err = check_real_layer(q, k, v, scale, backend, L=L, bits=bits)
                worst = max(worst, err)
                print(
                    f"{n} bits {bits} L {L}: max |fused - reference| / max |reference| = {err:.2e}",
                    flush=True,
                )
    print(f"worst {worst:.2e}")


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump()
    else:
        check(sys.argv[2] if len(sys.argv) > 2 else BACKEND, sys.argv[3:])
