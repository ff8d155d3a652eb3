"""RotatingTurboQuantKVCache: TurboQuant for sliding-window layers and --max-kv-size."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_tiny_model
from test_cache import continue_from, greedy, tokens

from mlx_lm.generate import generate_step
from mlx_lm.models.cache import (
    KVCache,
    RotatingKVCache,
    load_prompt_cache,
    make_prompt_cache,
    save_prompt_cache,
)
from mlx_lm.models.turboquant_cache import RotatingTurboQuantKVCache, TurboQuantKVCache


@pytest.mark.parametrize("prefill", [5, 9])
def test_ring_matches_windowed_unbounded_turbo_cache(prefill):
    """A TurboQuant ring of size W equals an unbounded TurboQuant cache under a W-window
    mask (Mistral's sliding window), before and after the window fills: the same codes,
    only the dropped tokens differ."""
    W = 8
    windowed = make_tiny_model("mistral", sliding_window=W)
    ring = make_tiny_model("llama")
    ring.update(windowed.parameters())
    seq = tokens(24, seed=2)
    # A window of 8 opens no key-mean segment (see max_segment): compare with a plain one.
    full_cache = [TurboQuantKVCache(3, 3, 0, i, key_centering=False) for i in range(2)]
    ring_cache = [RotatingTurboQuantKVCache(W, 0, 256, 3, 3, 0, i) for i in range(2)]
    assert ring_cache[0].max_segment == 0
    a = windowed(seq[None, :prefill], cache=full_cache)
    b = ring(seq[None, :prefill], cache=ring_cache)
    if prefill <= W:
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)
    for t in range(prefill, 24):
        a = windowed(seq[None, t : t + 1], cache=full_cache)
        b = ring(seq[None, t : t + 1], cache=ring_cache)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, err_msg=f"step {t}")
    assert ring_cache[0].size() == W and ring_cache[0].offset == 24


def test_keep_tokens_are_preserved_and_memory_is_flat():
    max_size, keep, d = 6, 2, 64
    # Token t is a vector pointing along its own direction: recognizable after decoding.
    basis = mx.array(np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0].T)
    c = RotatingTurboQuantKVCache(max_size, keep, key_bits=4, value_bits=4)
    sizes = []
    for t in range(20):
        x = (10.0 * basis[t])[None, None, None]
        c.update_and_fetch(x, x)
        k, _ = c.dequantized()
        sizes.append(c.nbytes)
    held = np.argmax(np.array(k[0, 0] @ basis.T), axis=-1)
    assert sorted(held.tolist()) == [0, 1] + list(range(20 - (max_size - keep), 20))
    assert c.size() == max_size and not c.is_trimmable()
    assert len(set(sizes[max_size:])) == 1


def test_generation_save_load_deepcopy_trim(tmp_path):
    model = make_tiny_model("llama")
    prompt = tokens(12, seed=5)

    def new_cache():
        return make_prompt_cache(model, max_kv_size=48, turbo_kv_bits=3)

    full = greedy(model, prompt, 30, new_cache())
    cache = new_cache()
    first = greedy(model, prompt, 10, cache)
    assert first == full[:10] and cache[0].is_trimmable()
    path = str(tmp_path / "ring.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert type(loaded[0]) is RotatingTurboQuantKVCache and loaded[0].max_size == 48
    clone = copy.deepcopy(cache)
    # Trim and re-feed (continue_from) while nothing was dropped; past the window too.
    for c in (loaded, clone, cache):
        assert first + continue_from(model, c, first, 20) == full
    # After the window filled: save, load and continue give the same logits.
    seq = tokens(70, seed=6)
    a, b = new_cache(), None
    model(seq[None, :60], cache=a)
    save_prompt_cache(path, a)
    b = load_prompt_cache(path)
    for t in range(60, 70):
        la = model(seq[None, t : t + 1], cache=a)
        lb = model(seq[None, t : t + 1], cache=b)
        np.testing.assert_array_equal(np.array(la), np.array(lb))


def test_conversion_of_a_filled_ring():
    k = mx.random.normal((1, 2, 20, 64))
    ring = RotatingKVCache(max_size=32, keep=4)
    ring.update_and_fetch(k, k)
    turbo = ring.to_turbo_quantized(4, 4, seed=1, layer_idx=2)
    direct = RotatingTurboQuantKVCache(32, 4, 256, 4, 4, 1, 2)
    direct.update_and_fetch(k, k)
    for x, y in zip(turbo.state, direct.state):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    for _ in range(2):
        x = mx.random.normal((1, 2, 20, 64))
        ring.update_and_fetch(x, x)
    with pytest.raises(ValueError, match="dropped tokens"):
        ring.to_turbo_quantized(3, 3)


def test_gemma3_inside_window_matches_unbounded_turbo_cache():
    """Gemma 3 with TurboQuant: sliding layers get TurboQuant rings; inside the window
    the model equals the same model with unbounded TurboQuant caches everywhere (key
    scaling on, as by default; no float16 window, which rings do not have)."""
    W = 64
    model = make_tiny_model("gemma3_text", head_dim=64, sliding_window=W, sliding_window_pattern=2)
    cache = make_prompt_cache(model, turbo_kv_bits=4, turbo_fp16_window=0)
    kinds = [type(c).__name__ for c in cache]
    assert "RotatingTurboQuantKVCache" in kinds and "TurboQuantKVCache" in kinds
    unbounded = [TurboQuantKVCache(4, 4, 0, i, key_scaling=True) for i in range(len(model.layers))]
    seq = tokens(60, seed=7)
    np.testing.assert_allclose(
        np.array(model(seq[None, :40], cache=cache)),
        np.array(model(seq[None, :40], cache=unbounded)),
        atol=1e-4,
    )
    for t in range(40, 60):
        a = model(seq[None, t : t + 1], cache=cache)
        b = model(seq[None, t : t + 1], cache=unbounded)
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, err_msg=f"step {t}")
    # Past the window it keeps generating from its bounded caches.
    out = [t for t, _ in generate_step(seq, model, max_tokens=80, prompt_cache=cache)]
    assert len(out) == 80
    assert all(c.size() <= W for c in cache if isinstance(c, RotatingTurboQuantKVCache))


@pytest.mark.slow
def test_long_generation_memory_stays_flat():
    """3K generated tokens with max_kv_size=512: cache bytes and MLX active memory stop
    growing once the window is full (benchmarks/kv_bench.py measures 64K tokens)."""
    model = make_tiny_model("llama")
    cache = make_prompt_cache(model, max_kv_size=512, turbo_kv_bits=3)
    nbytes, active = {}, {}
    steps = generate_step(tokens(16), model, max_tokens=3072, prompt_cache=cache)
    for i, _ in enumerate(steps, 1):
        if i % 1024 == 0:
            mx.eval([c.state for c in cache])
            nbytes[i] = sum(c.nbytes for c in cache)
            active[i] = mx.get_active_memory()
    assert nbytes[1024] == nbytes[2048] == nbytes[3072]
    assert active[3072] <= active[1024] * 1.05 + (1 << 20), active


def test_deepcopy_of_an_empty_ring():
    clone = copy.deepcopy(RotatingTurboQuantKVCache(8, 2))
    assert clone.keys is None and (clone.max_size, clone.keep, clone.offset) == (8, 2, 0)
