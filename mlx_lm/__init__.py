"""mlx-lm-turbo: the mlx-lm API with TurboQuant KV-cache compression."""

import os

from ._version import __version__

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from .generate import generate, stream_generate  # noqa: E402
from .utils import load  # noqa: E402

__all__ = ["__version__", "load", "generate", "stream_generate"]
