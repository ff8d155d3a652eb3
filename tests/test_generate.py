"""Loading, generate_step, stream_generate and generate on tiny and real models."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import save_tiny_model_dir

from mlx_lm import generate, load, stream_generate
from mlx_lm.generate import GenerationResponse, generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from mlx_lm.utils import ModelNotFoundError


def test_load_directory_and_greedy_matches_manual_loop(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompt = mx.array(tokenizer.encode("hello world"), dtype=mx.uint32)
    got = [t for t, _ in generate_step(prompt, model, max_tokens=10)]
    # Reference: recompute the whole sequence without a cache at every step.
    seq = prompt.tolist()
    for _ in range(10):
        logits = model(mx.array(seq)[None])[0, -1]
        seq.append(int(mx.argmax(logits).item()))
    assert got == seq[len(prompt) :]


def test_chunked_prefill_equals_single_chunk(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompt = mx.array(np.random.default_rng(0).integers(0, 200, 50), dtype=mx.uint32)
    calls = []
    a = [
        t
        for t, _ in generate_step(
            prompt,
            model,
            max_tokens=6,
            prefill_step_size=7,
            prompt_progress_callback=lambda p, t: calls.append((p, t)),
        )
    ]
    b = [t for t, _ in generate_step(prompt, model, max_tokens=6, prefill_step_size=4096)]
    assert a == b
    assert calls[0] == (7, 50) and calls[-1] == (50, 50)
    assert [p for p, _ in calls] == sorted(p for p, _ in calls)


def test_one_forward_and_one_sampler_call_per_token(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    counts = {"forward": 0, "sampler": 0}

    class Counting:
        def __init__(self, m):
            self.m = m
            self.layers = m.layers

        def __call__(self, *a, **k):
            counts["forward"] += 1
            return self.m(*a, **k)

    def sampler(lp):
        counts["sampler"] += 1
        return mx.argmax(lp, axis=-1)

    prompt = mx.array([1, 2, 3], dtype=mx.uint32)
    n = 12
    out = list(generate_step(prompt, Counting(model), max_tokens=n, sampler=sampler))
    assert len(out) == n
    # A prefill chunk, the prompt's last token, then one call per generated token (the
    # last one is fed too, so the cache holds every emitted token, as upstream's does).
    assert counts["forward"] == 2 + n
    assert counts["sampler"] == 1 + n


def test_stream_generate_fields_and_finish_reason(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    responses = list(stream_generate(model, tokenizer, "hello", max_tokens=5))
    assert all(isinstance(r, GenerationResponse) for r in responses)
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.prompt_tokens == len(tokenizer.encode("hello"))
    assert last.generation_tokens == len(responses)
    assert last.peak_memory >= 0 and last.prompt_tps > 0
    assert all(r.finish_reason is None for r in responses[:-1])
    text = "".join(r.text for r in responses)
    assert text == generate(model, tokenizer, "hello", max_tokens=5)


def test_stream_generate_stops_on_eos(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompt = tokenizer.encode("hello")
    first = next(generate_step(mx.array(prompt), model, max_tokens=1))[0]
    tokenizer.add_eos_token(first)
    responses = list(stream_generate(model, tokenizer, prompt, max_tokens=5))
    assert len(responses) == 1
    assert responses[0].finish_reason == "stop" and responses[0].text == ""


def test_generate_verbose_prints_stats(tiny_model_dir, capsys):
    model, tokenizer = load(tiny_model_dir)
    generate(model, tokenizer, "hello", max_tokens=3, verbose=True)
    out = capsys.readouterr().out
    assert "Prompt:" in out and "tokens-per-sec" in out and "Peak memory:" in out


def test_sampling_seed_reproducible_and_processors_apply(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompt = mx.array([1, 2, 3], dtype=mx.uint32)
    sampler = make_sampler(temp=1.0, top_p=0.9)
    mx.random.seed(3)
    a = [t for t, _ in generate_step(prompt, model, max_tokens=8, sampler=sampler)]
    mx.random.seed(3)
    b = [t for t, _ in generate_step(prompt, model, max_tokens=8, sampler=sampler)]
    assert a == b
    forced = make_logits_processors(logit_bias={7: 1e4})
    c = [t for t, _ in generate_step(prompt, model, max_tokens=4, logits_processors=forced)]
    assert c == [7, 7, 7, 7]


def test_quantized_directory_with_per_layer_override(tmp_path):
    q = {"group_size": 32, "bits": 4, "model.layers.0.mlp.down_proj": {"group_size": 32, "bits": 8}}
    ref = save_tiny_model_dir(str(tmp_path), quantization=q)
    model, _ = load(str(tmp_path))
    assert model.layers[0].mlp.down_proj.bits == 8
    assert model.layers[1].mlp.down_proj.bits == 4
    x = mx.array([[1, 2, 3, 4]])
    np.testing.assert_array_equal(np.array(model(x)), np.array(ref(x)))
    deq, _ = load(str(tmp_path), dequantize=True)
    assert deq.layers[0].mlp.down_proj.weight.dtype == mx.float32
    np.testing.assert_allclose(np.array(deq(x)), np.array(ref(x)), atol=1e-3, rtol=1e-3)


def test_kv_bits_generation_runs_and_is_close(tiny_model_dir):
    model, tokenizer = load(tiny_model_dir)
    prompt = mx.array(np.random.default_rng(1).integers(0, 200, 30), dtype=mx.uint32)
    cache = make_prompt_cache(model)
    out = [
        t
        for t, _ in generate_step(
            prompt, model, max_tokens=4, prompt_cache=cache, kv_bits=8, kv_group_size=32
        )
    ]
    assert len(out) == 4
    assert type(cache[0]).__name__ == "QuantizedKVCache"
    with pytest.raises(ValueError, match="kv_bits"):
        list(generate_step(prompt, model, max_tokens=1, kv_bits=7))
    with pytest.raises(ValueError, match="max-kv-size"):
        list(generate_step(prompt, model, max_tokens=1, kv_bits=4, max_kv_size=16))


def test_bad_generate_arguments(tiny_model_dir):
    model, _ = load(tiny_model_dir)
    with pytest.raises(ValueError, match="max_tokens"):
        list(generate_step(mx.array([1]), model, max_tokens=-5))
    with pytest.raises(ValueError, match="empty"):
        list(generate_step(mx.array([], dtype=mx.uint32), model))
    with pytest.raises(ValueError, match="another model"):
        list(generate_step(mx.array([1]), model, prompt_cache=[]))


def test_load_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load(str(tmp_path / "nope"))
    with pytest.raises(ModelNotFoundError, match="local directory"):
        load("some-org/not-a-cached-model")
    (tmp_path / "config.json").write_text('{"model_type": "transformer9000"}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="transformer9000.*Supported model types"):
        load(str(tmp_path))


@pytest.mark.slow
def test_smollm2_gguf_answers_paris(smollm2_gguf):
    model, tokenizer = load(smollm2_gguf, dequantize=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    text = generate(model, tokenizer, prompt, max_tokens=20)
    assert "Paris" in text
