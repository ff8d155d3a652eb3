"""TurboQuantKVCache: bytes, attention, cache life cycle, wiring and bad input."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_tiny_model
from test_cache import continue_from

from mlx_lm.generate import generate_step
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import (
    ArraysCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)
from mlx_lm.models.turboquant_cache import TurboQuantKVCache, to_turbo_quantized_cache


def tokens(n, seed=0, vocab=128):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, n), dtype=mx.uint32)


def greedy(model, prompt, n, cache):
    return [t for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)]


@pytest.mark.parametrize("head_dim,bits,min_ratio", [(128, 3, 5.0), (64, 3, 4.9), (128, 4, 3.85)])
def test_nbytes_vs_fp16(head_dim, bits, min_ratio):
    T, H = 2048, 4
    x = mx.random.normal((1, H, T, head_dim)).astype(mx.float16)
    fp16, turbo = KVCache(), TurboQuantKVCache(bits, bits)
    centered = TurboQuantKVCache(bits, bits, key_centering=True)
    for c in (fp16, turbo, centered):
        c.update_and_fetch(x, x)
    ratio = fp16.nbytes / turbo.nbytes
    assert ratio >= min_ratio, ratio
    # What is held is exactly the packed codes and one float16 norm per vector (plus
    # one float32 key mean per head with key centering).
    words = -(-head_dim * bits // 32)
    assert turbo.nbytes == 2 * H * T * (4 * words + 2)
    assert centered.nbytes == turbo.nbytes + H * head_dim * 4


def test_returned_keys_values_work_with_plain_sdpa_and_match_dispatch():
    """update_and_fetch's dequantized K/V serve a model that calls mx.fast SDPA itself,
    and the rotated-domain attention gives the same result."""
    B, H, Hq, T, D = 2, 2, 4, 37, 64
    k = mx.random.normal((B, H, T, D))
    v = mx.random.normal((B, H, T, D))
    q = mx.random.normal((B, Hq, 5, D))
    cache = TurboQuantKVCache(3, 3)
    kd, vd = cache.update_and_fetch(k, v)
    plain = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=D**-0.5, mask="causal")
    ours = scaled_dot_product_attention(q, kd, vd, cache=cache, scale=D**-0.5, mask="causal")
    np.testing.assert_allclose(np.array(plain), np.array(ours), atol=1e-4, rtol=1e-4)
    cos = mx.sum(kd * k, -1) / (mx.linalg.norm(kd, axis=-1) * mx.linalg.norm(k, axis=-1))
    assert float(mx.mean(cos)) > 0.97


def test_model_error_shrinks_with_bits():
    """Through a whole (tiny, random) model, logit error falls as bits grow and 8-bit
    keys/values keep the greedy tokens. Real-model quality is tested on SmolLM2."""
    model = make_tiny_model(
        "llama",
        weight_scale=1.0,
        head_dim=64,
        hidden_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    seq = tokens(64, seed=1)
    ref = np.array(model(seq[None], cache=make_prompt_cache(model)))
    errors = []
    for bits in (2, 3, 4, 8):
        cache = make_prompt_cache(model, turbo_key_bits=bits, turbo_value_bits=bits)
        out = np.array(model(seq[None], cache=cache))
        errors.append(np.abs(out - ref).max())
    assert errors == sorted(errors, reverse=True), errors
    assert np.mean(out.argmax(-1) == ref.argmax(-1)) >= 0.95


def test_save_load_continue_trim_deepcopy_token_identical(tmp_path):
    model = make_tiny_model("llama")
    prompt = tokens(40, seed=2)
    full = greedy(model, prompt, 16, make_prompt_cache(model, turbo_kv_bits=3))

    cache = make_prompt_cache(model, turbo_kv_bits=3)
    first = greedy(model, prompt, 8, cache)
    assert first == full[:8]
    path = str(tmp_path / "tq.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert all(isinstance(c, TurboQuantKVCache) for c in loaded)
    assert loaded[1].layer_idx == 1 and loaded[0].key_bits == 3
    clone = copy.deepcopy(cache)
    assert first + continue_from(model, loaded, first, 8) == full
    assert first + continue_from(model, clone, first, 8) == full
    assert first + continue_from(model, cache, first, 8) == full
    # The original is untouched by its clone's progress; trim and re-feed.
    seq = tokens(30, seed=3)
    c = make_prompt_cache(model, turbo_kv_bits=3)
    model(seq[None, :24], cache=c)
    ref = model(seq[None, 24:], cache=c)
    assert trim_prompt_cache(c, 6) == 6
    again = model(seq[None, 24:], cache=c)
    np.testing.assert_array_equal(np.array(again), np.array(ref))


def test_key_centering_roundtrip_and_softmax_invariance(tmp_path):
    model = make_tiny_model("llama")
    seq = tokens(40, seed=4)
    cache = make_prompt_cache(model, turbo_kv_bits=4, turbo_key_centering=True)
    assert cache[0].key_centering
    model(seq[None, :30], cache=cache)
    path = str(tmp_path / "centered.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert loaded[0].key_centering and loaded[0].key_mean.shape == (1, 2, 1, 16)
    a = model(seq[None, 30:], cache=cache)
    b = model(seq[None, 30:], cache=loaded)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    # The mean is never added back in attention: scores shift equally per query.
    k = mx.random.normal((1, 2, 20, 64)) + 5.0
    q = mx.random.normal((1, 4, 3, 64))
    c = TurboQuantKVCache(8, 8, key_centering=True)
    kd, vd = c.update_and_fetch(k, k)
    plain = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=None)
    ours = scaled_dot_product_attention(q, kd, vd, cache=c, scale=0.125, mask=None)
    np.testing.assert_allclose(np.array(plain), np.array(ours), atol=1e-4)


def test_kvcache_to_turbo_quantized_equals_direct():
    k = mx.random.normal((1, 2, 20, 64))
    fp = KVCache()
    fp.update_and_fetch(k, k)
    a = fp.to_turbo_quantized(key_bits=4, value_bits=2, seed=5, layer_idx=3)
    b = TurboQuantKVCache(4, 2, seed=5, layer_idx=3)
    b.update_and_fetch(k, k)
    assert a.offset == 20
    for x, y in zip(a.state, b.state):
        np.testing.assert_array_equal(np.array(x), np.array(y))


def test_fp16_layers_and_separate_bits():
    model = make_tiny_model("llama", num_hidden_layers=6)
    cache = make_prompt_cache(model, turbo_kv_bits=3, turbo_fp16_layers=1, turbo_key_bits=4)
    kinds = [type(c).__name__ for c in cache]
    assert kinds == ["KVCache"] + ["TurboQuantKVCache"] * 4 + ["KVCache"]
    assert (cache[1].key_bits, cache[1].value_bits) == (4, 3)
    assert cache[2].layer_idx == 2


@pytest.mark.parametrize("bits", [0, 1, 5, 3.7, "x", True])
def test_bad_bits(bits):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="2, 3 or 4"):
        make_prompt_cache(model, turbo_kv_bits=bits)


@pytest.mark.parametrize("n", [-1, 1, 5, 1.5])
def test_bad_fp16_layers(n):
    model = make_tiny_model("llama")  # 2 attention layers: only 0 is valid
    with pytest.raises(ValueError, match="turbo_fp16_layers must be an integer from 0 to 0"):
        make_prompt_cache(model, turbo_kv_bits=3, turbo_fp16_layers=n)


def test_turbo_with_kv_bits_is_an_error():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="not both"):
        list(generate_step(tokens(4), model, max_tokens=1, kv_bits=4, turbo_kv_bits=3))
    with pytest.raises(ValueError, match="QuantizedKVCache.*--kv-bits or --turbo-kv-bits"):
        to_turbo_quantized_cache([QuantizedKVCache(), KVCache()], model, turbo_kv_bits=3)


class _StandInModel:
    def __init__(self, model_type, caches, **args):
        self.model_type = model_type
        self.layers = caches
        self._caches = caches

        class Args:
            pass

        self.args = Args()
        for k, v in args.items():
            setattr(self.args, k, v)

    def make_cache(self):
        return list(self._caches)


def test_mla_ssm_unknown_and_hybrid_rules():
    mla = _StandInModel("deepseek_v3", [KVCache(), KVCache()], kv_lora_rank=512)
    with pytest.raises(ValueError, match=r"deepseek_v3.*latent attention.*512.*--kv-bits"):
        make_prompt_cache(mla, turbo_kv_bits=3)

    ssm = _StandInModel("mamba", [ArraysCache(2), ArraysCache(2)])
    with pytest.raises(ValueError, match="mamba.*no attention KV cache"):
        make_prompt_cache(ssm, turbo_kv_bits=3)

    class LatentCache(KVCache):
        pass

    odd = _StandInModel("custom", [KVCache(), LatentCache()])
    with pytest.raises(ValueError, match="Layer 1 of model type 'custom' uses a LatentCache"):
        make_prompt_cache(odd, turbo_kv_bits=3)

    ssm_state = ArraysCache(2)
    hybrid = _StandInModel(
        "qwen3_next", [ssm_state, KVCache(), ArraysCache(2), KVCache(), KVCache()]
    )
    cache = make_prompt_cache(hybrid, turbo_kv_bits=4, turbo_fp16_layers=1)
    assert [type(c).__name__ for c in cache] == [
        "ArraysCache",
        "KVCache",
        "ArraysCache",
        "TurboQuantKVCache",
        "KVCache",
    ]
    assert cache[0] is ssm_state


def test_failed_conversion_leaves_callers_cache_untouched():
    model = make_tiny_model("llama")
    cache = make_prompt_cache(model)
    model(tokens(5)[None], cache=cache)
    before = list(cache)
    with pytest.raises(ValueError):
        list(generate_step(tokens(3), model, max_tokens=1, prompt_cache=cache, turbo_kv_bits=7))
    assert cache == before and all(type(c) is KVCache for c in cache)
    # A valid request converts the caller's cache in place, keeping its tokens.
    list(generate_step(tokens(3), model, max_tokens=1, prompt_cache=cache, turbo_kv_bits=3))
    assert all(isinstance(c, TurboQuantKVCache) for c in cache) and cache[0].offset == 5 + 3 + 1


def test_rotating_layers_stay_and_all_rotating_is_an_error():
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="rotating"):
        make_prompt_cache(model, max_kv_size=64, turbo_kv_bits=3)
    mixed = _StandInModel("gemma3_text", [RotatingKVCache(max_size=8), KVCache()])
    cache = make_prompt_cache(mixed, turbo_kv_bits=3)
    assert [type(c).__name__ for c in cache] == ["RotatingKVCache", "TurboQuantKVCache"]
