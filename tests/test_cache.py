"""Prompt caches: save/load, trim, rotating windows, affine quantization."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_tiny_model

from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)


def tokens(n, seed=0, vocab=128):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, n), dtype=mx.uint32)


def greedy(model, prompt, n, cache):
    return [t for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)]


def continue_from(model, cache, emitted, n):
    """generate_step queues one step ahead, so after it stops the cache already holds
    every emitted token; drop the last and re-feed it to continue the generation."""
    assert trim_prompt_cache(cache, 1) == 1
    return greedy(model, mx.array([emitted[-1]], dtype=mx.uint32), n, cache)


def test_save_load_continue_is_token_identical(tiny_llama, tmp_path):
    prompt = tokens(40)
    full = greedy(tiny_llama, prompt, 16, make_prompt_cache(tiny_llama))

    cache = make_prompt_cache(tiny_llama)
    first = greedy(tiny_llama, prompt, 8, cache)
    assert cache[0].offset == 40 + 8
    path = str(tmp_path / "cache.safetensors")
    save_prompt_cache(path, cache, {"note": "x"})
    loaded, meta = load_prompt_cache(path, return_metadata=True)
    assert meta == {"note": "x"}
    assert [type(c) for c in loaded] == [type(c) for c in cache]
    assert loaded[0].offset == cache[0].offset
    assert first + continue_from(tiny_llama, loaded, first, 8) == full
    assert first + continue_from(tiny_llama, cache, first, 8) == full


def test_trim_then_refeed_gives_identical_logits(tiny_llama):
    seq = tokens(30, seed=1)
    cache = make_prompt_cache(tiny_llama)
    tiny_llama(seq[None, :23], cache=cache)
    ref = tiny_llama(seq[None, 23:], cache=cache)
    assert can_trim_prompt_cache(cache)
    assert trim_prompt_cache(cache, 7) == 7
    assert cache[0].offset == 23
    again = tiny_llama(seq[None, 23:], cache=cache)
    np.testing.assert_array_equal(np.array(again), np.array(ref))


def test_kv_cache_grows_past_step_and_trims_to_zero():
    c = KVCache()
    k = mx.random.normal((1, 2, 300, 8))
    out_k, _ = c.update_and_fetch(k, k)
    assert out_k.shape[2] == 300 and c.offset == 300
    out_k, _ = c.update_and_fetch(k[:, :, :5], k[:, :, :5])
    assert out_k.shape[2] == 305
    assert c.trim(1000) == 305 and c.offset == 0 and c.size() == 0


def test_rotating_cache_keeps_first_keep_and_last_tokens():
    keep, max_size = 2, 8
    c = RotatingKVCache(max_size=max_size, keep=keep)
    seq = mx.arange(20, dtype=mx.float32).reshape(1, 1, 20, 1)
    c.update_and_fetch(seq[:, :, :5], seq[:, :, :5])  # multi-token (concat) path
    for t in range(5, 20):  # single-token (ring) path
        k, _ = c.update_and_fetch(seq[:, :, t : t + 1], seq[:, :, t : t + 1])
    held = sorted(np.array(k).ravel().tolist())
    assert held == [0, 1] + list(range(20 - (max_size - keep), 20))
    assert c.offset == 20 and c.size() == max_size
    assert not c.is_trimmable()


@pytest.mark.parametrize("prefill", [5, 9])
def test_rotating_cache_matches_full_cache_inside_window(prefill):
    """A rotating cache of size W equals an unbounded cache whose mask is a W-window
    (Mistral's sliding window), before and after the window fills."""
    W = 8
    windowed = make_tiny_model("mistral", sliding_window=W)
    seq = tokens(24, seed=2)
    full_cache = [KVCache() for _ in windowed.layers]
    ring_cache = [RotatingKVCache(max_size=W) for _ in windowed.layers]
    # Same weights, but the ring model attends to everything it holds (no window mask).
    ring = make_tiny_model("llama")
    ring.update(windowed.parameters())
    a = windowed(seq[None, :prefill], cache=full_cache)
    b = ring(seq[None, :prefill], cache=ring_cache)
    if prefill <= W:
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    for t in range(prefill, 24):
        a = windowed(seq[None, t : t + 1], cache=full_cache)
        b = ring(seq[None, t : t + 1], cache=ring_cache)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, err_msg=f"step {t}")


def test_rotating_cache_multi_token_chunks_after_wrap():
    """Chunked prefill into a full ring (concat path with window mask) matches
    token-by-token updates."""
    W = 8
    model = make_tiny_model("llama")
    seq = tokens(30, seed=3)
    c1 = [RotatingKVCache(max_size=W) for _ in model.layers]
    c2 = [RotatingKVCache(max_size=W) for _ in model.layers]
    model(seq[None, :12], cache=c1)
    model(seq[None, :12], cache=c2)
    a = model(seq[None, 12:18], cache=c1)[:, -1]
    for t in range(12, 18):
        b = model(seq[None, t : t + 1], cache=c2)[:, -1]
    np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


def test_rotating_save_load_roundtrip(tmp_path):
    model = make_tiny_model("llama")
    seq = tokens(20, seed=4)
    cache = [RotatingKVCache(max_size=8, keep=2) for _ in model.layers]
    model(seq[None, :15], cache=cache)
    model(seq[None, 15:16], cache=cache)
    path = str(tmp_path / "rot.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    a = model(seq[None, 16:17], cache=cache)
    b = model(seq[None, 16:17], cache=loaded)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_quantized_cache_close_to_fp_and_saves(tmp_path):
    model = make_tiny_model("llama", weight_scale=1.0, head_dim=32)
    seq = tokens(40, seed=5)
    ref = model(seq[None], cache=make_prompt_cache(model))
    qcache = [QuantizedKVCache(group_size=32, bits=8) for _ in model.layers]
    out = model(seq[None], cache=qcache)
    assert np.abs(np.array(out) - np.array(ref)).max() < 0.05 * np.abs(np.array(ref)).max()
    kv_bytes = sum(c.nbytes for c in make_prompt_cache(model))
    assert all(c.nbytes > 0 for c in qcache) and kv_bytes == 0
    path = str(tmp_path / "q.safetensors")
    save_prompt_cache(path, qcache)
    loaded = load_prompt_cache(path)
    assert isinstance(loaded[0], QuantizedKVCache) and loaded[0].bits == 8
    a = model(seq[None, :1], cache=qcache)
    b = model(seq[None, :1], cache=loaded)
    np.testing.assert_array_equal(np.array(a), np.array(b))


def test_kv_to_quantized_matches_direct_quantized():
    c = KVCache()
    k = mx.random.normal((1, 2, 10, 64))
    c.update_and_fetch(k, k)
    q = c.to_quantized(group_size=64, bits=4)
    assert q.offset == 10 and q.bits == 4
    deq = mx.dequantize(*q.state[0], group_size=64, bits=4)
    assert np.abs(np.array(deq) - np.array(k)).max() < 0.5


def test_arrays_cache_and_cache_list_roundtrip(tmp_path):
    a = ArraysCache(2)
    a[0] = mx.ones((1, 3))
    a[1] = mx.zeros((1, 4))
    kv = KVCache()
    kv.update_and_fetch(mx.ones((1, 1, 3, 4)), mx.ones((1, 1, 3, 4)))
    cl = CacheList(KVCache(), RotatingKVCache(max_size=4))
    cl[0].update_and_fetch(mx.ones((1, 1, 2, 4)), mx.ones((1, 1, 2, 4)))
    cl[1].update_and_fetch(mx.ones((1, 1, 2, 4)), mx.ones((1, 1, 2, 4)))
    path = str(tmp_path / "mixed.safetensors")
    save_prompt_cache(path, [a, kv, cl])
    la, lkv, lcl = load_prompt_cache(path)
    assert isinstance(la, ArraysCache) and la[1].shape == (1, 4)
    assert lkv.offset == 3
    assert isinstance(lcl, CacheList) and isinstance(lcl[1], RotatingKVCache)
    assert lcl[0].offset == 2 and lcl[1].offset == 2
    assert not can_trim_prompt_cache([a, kv])
    assert trim_prompt_cache([a, kv], 1) == 0


def test_deepcopy_is_independent(tiny_llama):
    seq = tokens(12, seed=6)
    cache = make_prompt_cache(tiny_llama)
    tiny_llama(seq[None, :10], cache=cache)
    clone = copy.deepcopy(cache)
    a = tiny_llama(seq[None, 10:12], cache=cache)
    b = tiny_llama(seq[None, 10:12], cache=clone)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    assert cache[0].offset == clone[0].offset == 12


def test_make_prompt_cache_max_kv_size(tiny_llama):
    cache = make_prompt_cache(tiny_llama, max_kv_size=16)
    assert all(isinstance(c, RotatingKVCache) and c.max_size == 16 for c in cache)
    with pytest.raises(ValueError, match="max_kv_size"):
        make_prompt_cache(tiny_llama, max_kv_size=0)


def test_load_prompt_cache_unknown_class(tmp_path):
    path = str(tmp_path / "bad.safetensors")
    c = KVCache()
    c.update_and_fetch(mx.ones((1, 1, 2, 4)), mx.ones((1, 1, 2, 4)))
    save_prompt_cache(path, [c])
    arrays, meta = mx.load(path, return_metadata=True)
    assert meta["2.0"] == "KVCache"
    meta["2.0"] = "NoSuchCache"
    mx.save_safetensors(path, arrays, meta)
    with pytest.raises(ValueError, match="NoSuchCache"):
        load_prompt_cache(path)


def test_affine_attention_dequantize_fallback_matches_quantized_matmul():
    """The CUDA fallback (dequantize, then fused SDPA) equals the quantized_matmul path."""
    from mlx_lm.models.base import quantized_scaled_dot_product_attention

    mx.random.seed(0)
    k, v = mx.random.normal((1, 2, 40, 64)), mx.random.normal((1, 2, 40, 64))
    q = mx.random.normal((1, 4, 3, 64))
    qk, qv = mx.quantize(k, group_size=64, bits=4), mx.quantize(v, group_size=64, bits=4)
    for mask in (None, "causal"):
        a = quantized_scaled_dot_product_attention(q, qk, qv, 0.125, mask, 64, 4, dequantize=False)
        b = quantized_scaled_dot_product_attention(q, qk, qv, 0.125, mask, 64, 4, dequantize=True)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
