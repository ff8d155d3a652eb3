import sys
from pathlib import Path

from setuptools import find_packages, setup

sys.path.insert(0, str(Path(__file__).parent / "mlx_lm"))
from _version import __version__  # noqa: E402

setup(
    name="mlx-lm-turbo",
    version=__version__,
    description="mlx-lm with TurboQuant KV-cache compression",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    packages=find_packages(include=["mlx_lm", "mlx_lm.*"]),
    python_requires=">=3.9",
    install_requires=[
        "numpy",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "huggingface_hub",
        "gguf>=0.10",
        "jinja2",
        "protobuf",
        "sentencepiece",
        "pyyaml",
    ],
    extras_require={
        # Linux CPU and NVIDIA need their MLX backend named; macOS gets Metal from plain mlx.
        "cpu": ["mlx[cpu]>=0.30"],
        "cuda13": ["mlx[cuda13]>=0.30"],
        "mac": ["mlx>=0.30"],
        "test": ["pytest", "openai", "matplotlib", "accelerate"],
        "dev": ["pre-commit", "black", "isort"],
    },
    entry_points={
        "console_scripts": [
            "mlx_lm = mlx_lm.cli:main",
            "mlx_lm.generate = mlx_lm.generate:main",
            "mlx_lm.chat = mlx_lm.chat:main",
            "mlx_lm.cache_prompt = mlx_lm.cache_prompt:main",
            "mlx_lm.server = mlx_lm.server:main",
            "mlx_lm.perplexity = mlx_lm.perplexity:main",
        ]
    },
)
