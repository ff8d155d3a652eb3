"""mlx_lm.perplexity: teacher-forced log-probs through a prompt cache, the FP-vs-compressed
comparison, and the command line."""

import json
import os
import subprocess
import sys

import mlx.core as mx
import pytest
from conftest import make_tiny_model

from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
from mlx_lm.perplexity import compare, load_tokens, prose_text, teacher_forced_logprobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = (
    "The capital of France is Paris. Paris is a large city on the river Seine, and many "
    "people visit it every year to see its museums, its churches and its old streets. "
) * 6


@pytest.fixture(scope="module")
def model_and_tokens():
    mx.random.seed(1)
    model = make_tiny_model("llama", head_dim=32)
    tokens = mx.random.randint(0, 128, (97,))
    return model, tokens


class NoisyKVCache(KVCache):
    """A KVCache that corrupts every key it stores: a cache that a test must catch."""

    def update_and_fetch(self, keys, values):
        noise = 0.5 * mx.random.normal(keys.shape, key=mx.random.key(self.offset))
        return super().update_and_fetch(keys + noise * mx.abs(keys).mean(), values)


def test_logprobs_shape_and_chunking_is_exact(model_and_tokens):
    model, tokens = model_and_tokens
    whole = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), chunk_size=1000)
    chunked = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), chunk_size=16)
    assert whole.shape == (tokens.size - 1, 128)
    assert whole.dtype == mx.float32
    # Rows are normalized distributions.
    assert mx.allclose(mx.logsumexp(whole, axis=-1), mx.zeros(tokens.size - 1), atol=1e-4)
    # An uncompressed cache makes chunked feeding the same computation as one pass.
    assert mx.allclose(whole, chunked, atol=1e-4).item()


def test_fp_against_itself_is_exact(model_and_tokens):
    model, tokens = model_and_tokens
    ref = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), chunk_size=16)
    again = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), chunk_size=16)
    figures = compare(ref, again, tokens[1:])
    assert figures["kl"] == 0.0
    assert figures["top1"] == 1.0
    assert figures["ppl"] == figures["ref_ppl"]
    # Perplexity is exp of the mean negative log-likelihood of the actual next tokens.
    nll = -mx.take_along_axis(ref, tokens[1:, None].astype(mx.int32), axis=-1).mean().item()
    assert figures["ppl"] == pytest.approx(mx.exp(mx.array(nll)).item(), rel=1e-5)


def test_perturbed_cache_is_caught(model_and_tokens):
    model, tokens = model_and_tokens
    ref = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), chunk_size=16)
    noisy_cache = [NoisyKVCache() for _ in model.layers]
    noisy = teacher_forced_logprobs(model, tokens, noisy_cache, chunk_size=16)
    figures = compare(ref, noisy, tokens[1:])
    assert figures["kl"] > 0.01
    assert figures["top1"] < 1.0
    assert figures["ppl"] != figures["ref_ppl"]


def test_kv_bits_quantizes_the_cache_after_each_chunk(model_and_tokens):
    model, tokens = model_and_tokens
    ref = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), chunk_size=16)
    cache = make_prompt_cache(model)
    low = teacher_forced_logprobs(model, tokens, cache, chunk_size=16, kv_bits=2, kv_group_size=32)
    assert all(isinstance(c, QuantizedKVCache) for c in cache)
    assert compare(ref, low, tokens[1:])["kl"] > 0.0


def test_bad_inputs(model_and_tokens):
    model, tokens = model_and_tokens
    with pytest.raises(ValueError, match="chunk_size"):
        teacher_forced_logprobs(model, tokens, make_prompt_cache(model), chunk_size=0)
    a = mx.zeros((4, 8))
    with pytest.raises(ValueError, match="shape"):
        compare(a, mx.zeros((3, 8)), mx.zeros((4,), dtype=mx.int32))
    with pytest.raises(ValueError, match="targets"):
        compare(a, a, mx.zeros((3,), dtype=mx.int32))


def test_too_short_text_names_the_counts():
    class Tok:
        def encode(self, text):
            return list(range(len(text.split())))

    with pytest.raises(ValueError, match=r"has 3 tokens but --context 8 needs 9"):
        load_tokens(Tok(), "one two three", 8, "notes.txt")
    assert load_tokens(Tok(), "a b c d", 3, "x").tolist() == [0, 1, 2, 3]


def test_prose_text_is_long_english():
    text = prose_text()
    assert len(text.split()) > 5000
    assert " the " in text


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "mlx_lm.cli", "perplexity", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def test_cli_end_to_end(tiny_model_dir, tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    out = tmp_path / "figures.jsonl"
    common = ["--model", tiny_model_dir, "--data", str(data), "--context", "64"]
    r = run_cli(*common, "--chunk-size", "16", "--turbo-kv-bits", "4", "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert "ppl" in r.stdout and "KL" in r.stdout and "top1" in r.stdout
    assert "| turbo K4/V4 | 64 |" in r.stdout
    r = run_cli(*common, "--output", str(out))
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [rec["config"] for rec in records] == ["turbo K4/V4", "fp16"]
    assert records[0]["tokens"] == 64 and records[0]["turbo_kv_bits"] == 4
    assert records[0]["kl"] > 0 and 0 <= records[0]["top1"] <= 1
    assert records[0]["ref_ppl"] == pytest.approx(records[1]["ppl"], rel=1e-4)
    assert records[1]["kl"] == 0 and records[1]["top1"] == 1


def test_cli_too_short_and_bad_flags(tiny_model_dir, tmp_path):
    data = tmp_path / "short.txt"
    data.write_text("Too short.")
    r = run_cli("--model", tiny_model_dir, "--data", str(data), "--context", "2048")
    assert r.returncode != 0
    assert "--context 2048 needs 2049" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("--model", tiny_model_dir, "--kv-bits", "4", "--turbo-kv-bits", "4")
    assert r.returncode != 0 and "use one of them" in r.stderr
    r = run_cli("--model", tiny_model_dir, "--turbo-fp16-window", "64")
    assert r.returncode != 0 and "--turbo-fp16-window needs --turbo-kv-bits" in r.stderr


@pytest.mark.slow
def test_smollm2_turbo4_beats_affine4(smollm2):
    """On real weights and prose, TurboQuant 4-bit disturbs the next-token distribution
    less than upstream's affine 4-bit (the issue's table: KL 0.065 vs 0.140)."""
    model, tokenizer = smollm2
    tokens = mx.array(tokenizer.encode(prose_text())[:513])
    ref = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), 128)
    tq4 = teacher_forced_logprobs(model, tokens, make_prompt_cache(model, turbo_kv_bits=4), 128)
    kv4 = teacher_forced_logprobs(model, tokens, make_prompt_cache(model), 128, kv_bits=4)
    tq, kv = compare(ref, tq4, tokens[1:]), compare(ref, kv4, tokens[1:])
    print(f"\nturbo4 {tq}\naffine4 {kv}")
    assert 0 < tq["kl"] < kv["kl"]
    assert tq["top1"] > kv["top1"]
