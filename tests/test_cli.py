"""The command-line tools, run as a user runs them (subprocesses)."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest
import test_models_mla
import test_models_ssm
from conftest import save_model_dir, save_tiny_model_dir


def run(command, *args, stdin=None, timeout=300):
    """`mlx_lm <command> ...` (the same entry point as the mlx_lm.<command> scripts)."""
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, "-m", "mlx_lm.cli", command, *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        timeout=timeout,
    )


def assert_clean_error(result, *needles):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_bad_flags_give_one_line_errors(tiny_model_dir):
    assert_clean_error(
        run("generate", "--model", tiny_model_dir, "--max-tokens", "-1"), "--max-tokens"
    )
    assert_clean_error(
        run("generate", "--model", tiny_model_dir, "--kv-bits", "4", "--max-kv-size", "64"),
        "--kv-bits cannot be combined with --max-kv-size",
    )
    assert_clean_error(run("generate", "--model", tiny_model_dir, "--kv-bits", "7"), "--kv-bits")
    assert_clean_error(run("generate", "--prompt", "hi"), "--model is required")


def test_missing_and_unknown_models(tmp_path):
    assert_clean_error(run("generate", "--model", str(tmp_path / "missing")), "does not exist")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"model_type": "transformer9000"}')
    (bad / "model.safetensors").write_bytes(b"")
    assert_clean_error(run("generate", "--model", str(bad)), "transformer9000", "Supported")


def test_unsupported_gguf_architecture(tmp_path):
    import gguf
    import numpy as np

    path = str(tmp_path / "mamba.gguf")
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_clean_error(run("generate", "--model", path), "mamba", "llama")


def test_stdin_prompt_and_quiet_output(tiny_model_dir):
    a = run(
        "generate",
        "--model",
        tiny_model_dir,
        "--prompt",
        "-",
        "-m",
        "5",
        "--verbose",
        "False",
        stdin="hello world",
    )
    b = run(
        "generate",
        "--model",
        tiny_model_dir,
        "--prompt",
        "hello world",
        "-m",
        "5",
        "--verbose",
        "False",
    )
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_prompt_cache_file_roundtrip_and_wrong_model(tiny_model_dir, tmp_path):
    cache_file = str(tmp_path / "prefix.safetensors")
    r = run(
        "cache_prompt",
        "--model",
        tiny_model_dir,
        "--prompt",
        "The capital of France",
        "--prompt-cache-file",
        cache_file,
    )
    assert r.returncode == 0, r.stderr
    with_cache = run(
        "generate",
        "--prompt-cache-file",
        cache_file,
        "--prompt",
        " is",
        "-m",
        "8",
        "--verbose",
        "False",
    )
    direct = run(
        "generate",
        "--model",
        tiny_model_dir,
        "--prompt",
        "The capital of France is",
        "-m",
        "8",
        "--verbose",
        "False",
    )
    assert with_cache.returncode == 0, with_cache.stderr
    assert with_cache.stdout == direct.stdout

    other = str(tmp_path / "other")
    save_tiny_model_dir(other, seed=1, num_hidden_layers=3)
    assert_clean_error(
        run("generate", "--model", other, "--prompt-cache-file", cache_file, "--prompt", "x"),
        "made for another model",
    )
    assert_clean_error(
        run(
            "generate",
            "--model",
            tiny_model_dir,
            "--prompt-cache-file",
            cache_file,
            "--max-kv-size",
            "10",
        ),
        "--max-kv-size",
    )


def test_mlx_lm_subcommands(tiny_model_dir):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_lm.cli",
            "generate",
            "--model",
            tiny_model_dir,
            "-m",
            "3",
            "--verbose",
            "False",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "mlx_lm.cli", "nope"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 2 and "unknown command" in r.stdout


@pytest.mark.slow
def test_cli_answers_paris(smollm2_gguf):
    r = run(
        "generate",
        "--model",
        smollm2_gguf,
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "20",
        "--temp",
        "0",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_keeps_cache_across_turns(tiny_model_dir):
    r = run(
        "chat",
        "--model",
        tiny_model_dir,
        "-m",
        "4",
        "--turbo-kv-bits",
        "3",
        stdin="hello\nagain\nr\nq\n",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(">> ") == 4


# --------------------------------------------------------------------------------------
# TurboQuant refuses caches it cannot compress - MLA latents, pure SSM state - with one
# clear line from every entry point.

LATENT = test_models_mla.TINY["kv_lora_rank"]
REFUSALS = {
    "deepseek_v3": (
        "multi-head latent attention",
        f"latent width {LATENT}",
        "per-head keys and values",
        "--kv-bits",
    ),
    "glm4_moe_lite": ("multi-head latent attention", f"latent width {LATENT}", "--kv-bits"),
    "mamba2": ("no attention KV cache",),
}


def save_refused_model(path, name):
    """A tiny random model directory of an architecture without per-head K/V caches."""
    if name == "mamba2":
        config = test_models_ssm.MAMBA2
        model = test_models_ssm._model(name)
    else:
        # max_position_embeddings = factor x original, so YaRN's config is consistent.
        config = {
            **test_models_mla.TINY,
            **test_models_mla.ARCHS[name][1],
            "max_position_embeddings": 128,
        }
        model = test_models_mla._tiny(name, **config)
    return save_model_dir(str(path), model, config)


def assert_refused(result, name):
    """Exit 2 and exactly one line on stderr: no traceback, no other noise. It names the
    model type, what is missing and what to do instead."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in (f"'{name}'", *REFUSALS[name], "Run without --turbo-kv-bits"):
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("name", ["deepseek_v3", "mamba2"])
def test_turbo_refusal_through_every_entry_point(name, tmp_path):
    from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache
    from mlx_lm.utils import load

    model_dir = save_refused_model(tmp_path / name, name)
    turbo = ("--turbo-kv-bits", "3")
    prompt = ("--prompt", "t5 t6 t7")

    assert_refused(run("generate", "--model", model_dir, *prompt, *turbo), name)

    cache_file = str(tmp_path / "prefix.safetensors")
    r = run(
        "cache_prompt", "--model", model_dir, *prompt, "--prompt-cache-file", cache_file, *turbo
    )
    assert_refused(r, name)
    assert not os.path.exists(cache_file)

    # The server refuses at start-up (a server that started would hit the timeout).
    assert_refused(run("server", "--model", model_dir, "--port", "0", *turbo, timeout=120), name)

    # A cache file made without the flag, then generate --turbo-kv-bits on it: the
    # conversion of a filled cache (to_turbo_quantized_cache) refuses it the same way.
    model, _ = load(model_dir)
    cache = make_prompt_cache(model)
    model(mx.array([[5, 6, 7]]), cache=cache)
    save_prompt_cache(cache_file, cache, {"model": model_dir})
    r = run("generate", "--prompt-cache-file", cache_file, "--prompt", " t8", *turbo)
    assert_refused(r, name)


def test_turbo_refusal_glm4_moe_lite_cli(tmp_path):
    """GLM-4.7-Flash's family takes deepseek_v3's paths; its own model type is named."""
    model_dir = save_refused_model(tmp_path / "glm", "glm4_moe_lite")
    r = run(
        "generate",
        "--model",
        model_dir,
        "--prompt",
        "t5",
        "--turbo-key-bits",
        "4",
        "--turbo-value-bits",
        "3",
    )
    assert_refused(r, "glm4_moe_lite")
