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
from mlx_lm.models.turboquant_cache import (
    KEY_MEAN_MAX_SEGMENT,
    BatchTurboQuantKVCache,
    RotatingTurboQuantKVCache,
    TurboQuantKVCache,
    key_mean_segment,
    key_mean_segments,
    segment_start,
    to_turbo_quantized_cache,
)


def tokens(n, seed=0, vocab=128):
    return mx.array(np.random.default_rng(seed).integers(0, vocab, n), dtype=mx.uint32)


def greedy(model, prompt, n, cache):
    return [t for t, _ in generate_step(prompt, model, max_tokens=n, prompt_cache=cache)]


@pytest.mark.parametrize("head_dim,bits,min_ratio", [(128, 3, 5.0), (64, 3, 4.9), (128, 4, 3.85)])
def test_nbytes_vs_fp16(head_dim, bits, min_ratio):
    T, H = 2048, 4
    x = mx.random.normal((1, H, T, head_dim)).astype(mx.float16)
    fp16, turbo = KVCache(), TurboQuantKVCache(bits, bits)
    plain = TurboQuantKVCache(bits, bits, key_centering=False)
    for c in (fp16, turbo, plain):
        c.update_and_fetch(x, x)
    ratio = fp16.nbytes / turbo.nbytes
    assert ratio >= min_ratio, ratio
    # What is held is exactly the packed codes and one float16 norm per vector, plus
    # one float16 key mean per head for each segment opened (at 32, 128 and 512 tokens).
    words = -(-head_dim * bits // 32)
    assert plain.nbytes == 2 * H * T * (4 * words + 2)
    assert turbo.nbytes == plain.nbytes + 3 * H * head_dim * 2


def test_dequantized_keys_values_work_with_plain_sdpa_and_match_dispatch():
    """update_and_fetch's dequantized K/V serve a model that calls mx.fast SDPA itself,
    and the rotated-domain attention gives the same result."""
    B, H, Hq, T, D = 2, 2, 4, 37, 64
    k = mx.random.normal((B, H, T, D))
    v = mx.random.normal((B, H, T, D))
    q = mx.random.normal((B, Hq, 5, D))
    cache = TurboQuantKVCache(3, 3)
    cache.update_and_fetch(k, v)
    kd, vd = cache.dequantized()
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


def test_key_mean_segments():
    assert [segment_start(s) for s in range(5)] == [0, 32, 128, 512, 2048]
    positions = [0, 31, 32, 127, 128, 511, 512, 2047, 2048, 10**7]
    want = [0, 0, 1, 1, 2, 2, 3, 3, 4, KEY_MEAN_MAX_SEGMENT]
    assert [key_mean_segment(p) for p in positions] == want
    every = np.array(key_mean_segments(0, 9000))
    assert every.tolist() == [key_mean_segment(p) for p in range(9000)]
    assert np.array(key_mean_segments(100, 140)).tolist() == [1] * 28 + [2] * 12


def test_key_means_are_causal_and_chunking_invariant(tmp_path):
    """M_s is the mean of the reconstructed keys before 32·4^(s-1), whatever the chunks;
    keys far from zero (a large per-channel offset, as real keys have) are reconstructed
    much better than without centering."""
    k = mx.random.normal((1, 2, 600, 64)) + 3.0 * mx.random.normal((1, 2, 1, 64))
    one = TurboQuantKVCache(3, 3)
    one.update_and_fetch(k, k)
    assert one.segments_held == 4 and one.key_means.dtype == mx.float16
    chunked = TurboQuantKVCache(3, 3)
    for a, b in [(0, 5), (5, 6), (6, 200), (200, 511), (511, 512), (512, 513), (513, 600)]:
        chunked.update_and_fetch(k[:, :, a:b], k[:, :, a:b])
    for x, y in zip(one.state, chunked.state):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    # M_2 is the mean of the reconstructed keys of positions 0..127, held in float16
    # (half an ulp is 2^-11 of the value: 0.002 at 5).
    k_rot, _ = one.coded_keys_values()
    np.testing.assert_allclose(
        np.array(one.key_means[:, :, 1]),
        np.array(k_rot[:, :, :128].mean(axis=2)),
        atol=2e-3,
        rtol=2**-11,
    )
    plain = TurboQuantKVCache(3, 3, key_centering=False)
    plain.update_and_fetch(k, k)

    def error(c):
        kd, _ = c._fetch(mx.float32)
        return float(mx.mean(mx.sum((kd - k) ** 2, -1)) / mx.mean(mx.sum(k**2, -1)))

    assert error(one) < 0.5 * error(plain), (error(one), error(plain))


def test_key_centering_roundtrip_and_attention(tmp_path):
    model = make_tiny_model("llama")
    seq = tokens(200, seed=4)
    # No float16 window: trimming one drops float16 copies that cannot come back (see
    # test_fp16_window_trim_and_refeed_gives_the_same_cache).
    cache = make_prompt_cache(model, turbo_kv_bits=4, turbo_fp16_window=0)
    assert cache[0].key_centering and cache[0].key_scaling
    model(seq[None, :150], cache=cache)
    assert cache[0].segments_held == 3
    path = str(tmp_path / "centered.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert loaded[0].key_centering and loaded[0].key_means.shape == (1, 2, 2, 16)
    a = model(seq[None, 150:], cache=cache)
    b = model(seq[None, 150:], cache=loaded)
    np.testing.assert_array_equal(np.array(a), np.array(b))
    # Trim back past a segment start and re-feed: the same logits as a run that never
    # went past it (chunks of the same shapes).
    assert trim_prompt_cache(cache, 100) == 100 and cache[0].segments_held == 2
    fresh = make_prompt_cache(model, turbo_kv_bits=4, turbo_fp16_window=0)
    model(seq[None, :100], cache=fresh)
    last = [
        [model(seq[None, x:y], cache=c) for x, y in [(100, 150), (150, 200)]][-1]
        for c in (cache, fresh)
    ]
    np.testing.assert_array_equal(np.array(last[0]), np.array(last[1]))
    # Against the run that took positions 0..149 in one chunk: the same up to the
    # rounding of other query-block shapes (on OpenBLAS a layer's values can differ in
    # a last bit, and a float16 norm with them).
    np.testing.assert_allclose(np.array(last[0]), np.array(a), atol=1e-2)
    # The means are added back: rotated-domain attention equals plain attention over the
    # returned (dequantized) keys.
    k = mx.random.normal((1, 2, 300, 64)) + 5.0
    q = mx.random.normal((1, 4, 3, 64))
    c = TurboQuantKVCache(8, 8)
    c.update_and_fetch(k, k)
    kd, vd = c.dequantized()
    plain = mx.fast.scaled_dot_product_attention(q, kd, vd, scale=0.125, mask=None)
    ours = scaled_dot_product_attention(q, kd, vd, cache=c, scale=0.125, mask=None)
    np.testing.assert_allclose(np.array(plain), np.array(ours), atol=1e-4)
    np.testing.assert_allclose(np.array(kd[:, :, 32:]), np.array(k[:, :, 32:]), atol=0.1)


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


def test_rotating_layers_become_rotating_turbo_caches():
    model = make_tiny_model("llama")
    cache = make_prompt_cache(model, max_kv_size=64, turbo_kv_bits=3)
    assert all(type(c) is RotatingTurboQuantKVCache for c in cache)
    assert (cache[0].max_size, cache[0].keep) == (64, 4)
    mixed = _StandInModel("gemma3_text", [RotatingKVCache(max_size=8), KVCache()])
    cache = make_prompt_cache(mixed, turbo_kv_bits=3)
    assert [type(c).__name__ for c in cache] == ["RotatingTurboQuantKVCache", "TurboQuantKVCache"]
    assert cache[0].max_size == 8


def test_reconverting_with_other_settings_is_an_error():
    model = make_tiny_model("llama")
    cache = make_prompt_cache(model, turbo_kv_bits=3)
    assert to_turbo_quantized_cache(cache, model, turbo_kv_bits=3) == cache
    with pytest.raises(ValueError, match=r"\(3, 3, True, True, 64\), not the requested \(4, 4,"):
        to_turbo_quantized_cache(cache, model, turbo_kv_bits=4)
    with pytest.raises(ValueError, match=r"not the requested \(3, 3, False, False, 64\)"):
        to_turbo_quantized_cache(cache, model, turbo_kv_bits=3, turbo_key_centering=False)
    with pytest.raises(ValueError, match=r"not the requested \(3, 3, True, True, 0\)"):
        to_turbo_quantized_cache(cache, model, turbo_kv_bits=3, turbo_fp16_window=0)
    with pytest.raises(ValueError, match=r"not the requested \(3, 3, True, False, 64\)"):
        to_turbo_quantized_cache(cache, model, turbo_kv_bits=3, turbo_key_scaling=False)


def _windowed_reference(q, k, v, bits, updates, scale):
    """The definition `fp16_window` must meet: in an update of positions [a, b) that
    began with codes of [0, R), query p reads keys [0, R) as a window-less cache
    reconstructs them and [R, p] in float16. `updates`: (a, b, R) per update."""
    plain = TurboQuantKVCache(bits, bits)
    plain.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
    kd, vd = plain.dequantized(mx.float32)
    kf, vf = k.astype(mx.float16).astype(mx.float32), v.astype(mx.float16).astype(mx.float32)
    group = q.shape[1] // k.shape[1]
    out = []
    for a, b, coded in updates:
        for p in range(a, b):
            recent = (mx.arange(p + 1) >= coded)[None, None, :, None]
            kk = mx.where(recent, kf[:, :, : p + 1], kd[:, :, : p + 1])
            vv = mx.where(recent, vf[:, :, : p + 1], vd[:, :, : p + 1])
            kk, vv = mx.repeat(kk, group, axis=1), mx.repeat(vv, group, axis=1)
            out.append(
                mx.fast.scaled_dot_product_attention(q[:, :, p : p + 1], kk, vv, scale=scale)
            )
    return mx.concatenate(out, axis=2)


def _feed(cache, q, k, v, chunks):
    """Attention outputs of `chunks` fed as updates, and (a, b, R) of each update."""
    out, updates = [], []
    for a, b in chunks:
        updates.append((a, b, cache.n_coded))
        codes = cache.update_and_fetch(k[:, :, a:b], v[:, :, a:b])
        mask = "causal" if b - a > 1 else None
        out.append(scaled_dot_product_attention(q[:, :, a:b], *codes[:2], cache, 0.125, mask))
    return mx.concatenate(out, axis=2), updates


def test_fp16_window_attention_matches_its_definition(tmp_path):
    T, W = 300, 40
    k = mx.random.normal((1, 2, T, 64)) + 2.0 * mx.random.normal((1, 2, 1, 64))
    v, q = mx.random.normal((1, 2, T, 64)), mx.random.normal((1, 4, T, 64))
    one, chunked = TurboQuantKVCache(3, 3, fp16_window=W), TurboQuantKVCache(3, 3, fp16_window=W)
    chunks = [(0, 7), (7, 8), (8, 100), (100, 101), (101, 250), (250, 290)]
    chunks += [(p, p + 1) for p in range(290, T)]
    for cache, feed in ((one, [(0, T)]), (chunked, chunks)):
        got, updates = _feed(cache, q, k, v, feed)
        want = _windowed_reference(q, k, v, 3, updates, 0.125)
        np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5)
    # Coding happens a block at a time: all but the newest W once more than 2W are
    # uncoded (one chunk: 260 coded at once; chunked: 210 at position 250, then the
    # decode steps leave 40..80 uncoded, 81 at 291 -> 41 more coded).
    assert (one.coded, one.offset) == (T - W, T)
    assert (chunked.coded, chunked.offset) == (251, T)
    # Codes depend only on the tokens: the common prefix is identical, and equal to a
    # window-less cache's.
    plain = TurboQuantKVCache(3, 3)
    plain.update_and_fetch(k.astype(mx.float16), v.astype(mx.float16))
    for x, y, z in zip(one.state[:4], chunked.state[:4], plain.state[:4]):
        np.testing.assert_array_equal(np.array(x[:, :, :251]), np.array(y))
        np.testing.assert_array_equal(np.array(x), np.array(z[:, :, : T - W]))
    # Held: codes and the float16 tokens from `coded` on (saved: nothing more); a decode
    # step writes into float16 buffers of 2W + 64 slots, made anew at most once every 64 steps.
    one.update_and_fetch(k[:, :, :1], v[:, :, :1])
    coded = TurboQuantKVCache(3, 3)
    coded.update_and_fetch(k[:, :, : T - W], v[:, :, : T - W])
    assert one.nbytes == coded.nbytes + 2 * (2 * W + 64) * 2 * 64 * 2
    assert sum(x.nbytes for x in one.state[6:]) == 2 * 2 * (W + 1) * 64 * 2
    # Save / load / deepcopy keep the window; the next step's attention is identical.
    path = str(tmp_path / "window.safetensors")
    save_prompt_cache(path, [one])
    (loaded,) = load_prompt_cache(path)
    twin = copy.deepcopy(one)
    assert loaded.fp16_window == W and (loaded.coded, loaded.offset) == (one.coded, one.offset)
    outs = [
        _feed(c, q[:, :, :3], k[:, :, 5:8], v[:, :, 5:8], [(0, 3)])[0] for c in (one, loaded, twin)
    ]
    for o in outs[1:]:
        np.testing.assert_array_equal(np.array(outs[0]), np.array(o))


@pytest.mark.parametrize("n", [10, 100])
def test_fp16_window_trim_and_refeed_gives_the_same_cache(n):
    """Trimming within the window or past it, then feeding the same tokens again, gives
    the state of a cache that was never trimmed (codes depend only on the tokens)."""
    T, W = 300, 40
    k, v = mx.random.normal((1, 2, T, 64)), mx.random.normal((1, 2, T, 64))
    a, b = TurboQuantKVCache(4, 3, fp16_window=W), TurboQuantKVCache(4, 3, fp16_window=W)
    a.update_and_fetch(k, v)
    b.update_and_fetch(k, v)
    assert b.trim(n) == n and b.offset == T - n and b.coded == min(T - W, T - n)
    b.update_and_fetch(k[:, :, T - n :], v[:, :, T - n :])
    for x, y in zip(a.state, b.state):
        np.testing.assert_array_equal(np.array(x), np.array(y))


def test_codec_constants_are_made_once_per_layer_and_setting():
    """Each new cache (each request a server takes) asks every layer for its rotation
    signs and codebooks: they are made once per (head_dim, seed, layer, bits) and shared,
    and they are the ones the rotation and codebook functions give."""
    from mlx_lm.models import turboquant_cache
    from mlx_lm.models.turboquant_rotation import rotation_signs

    k = mx.random.normal((1, 2, 5, 64))
    a, b = TurboQuantKVCache(3, 4, layer_idx=3), TurboQuantKVCache(3, 4, layer_idx=3)
    a.update_and_fetch(k, k)
    misses = turboquant_cache._codec_constants.cache_info().misses
    b.update_and_fetch(k, k)
    assert turboquant_cache._codec_constants.cache_info().misses == misses
    assert a.key_signs is b.key_signs and a.value_centroids is b.value_centroids
    np.testing.assert_array_equal(np.array(a.key_signs), np.array(rotation_signs(64, 0, 3, "k")))
    np.testing.assert_array_equal(np.array(a.value_signs), np.array(rotation_signs(64, 0, 3, "v")))
    assert len(a.key_codebook) == 8 and len(a.value_codebook) == 16
    np.testing.assert_array_equal(np.array(a.key_centroids), np.array(a.key_codebook, np.float32))
    other = TurboQuantKVCache(3, 4, layer_idx=4)
    other.update_and_fetch(k, k)
    assert not np.array_equal(np.array(other.key_signs), np.array(a.key_signs))


def test_fp16_window_views_are_made_when_asked():
    """A decode step writes its token into the window buffers and makes no views of
    them (the fused kernel reads the buffers; two slices a layer were host time in every
    step). `recent_keys` / `recent_values`, made when asked, hold the float16 tokens of
    positions recent_start..offset-1 across steps, blocks coded, trims and new buffers."""
    W, T = 8, 40
    k = mx.random.normal((1, 2, 200, 64)).astype(mx.float16)
    v = mx.random.normal((1, 2, 200, 64)).astype(mx.float16)
    cache = TurboQuantKVCache(3, 3, fp16_window=W)
    cache.update_and_fetch(k[:, :, :T], v[:, :, :T])
    pos, bases, lazy = T, set(), 0
    for step in range(120):
        coded = cache.coded
        cache.update_and_fetch(k[:, :, pos : pos + 1], v[:, :, pos : pos + 1])
        pos += 1
        bases.add(id(cache._window_buffers))
        if cache.coded == coded:  # nothing coded: nothing sliced
            assert cache._window_end is not None
            lazy += 1
        if step % 5 == 4:
            cache.trim(2)
            pos -= 2
        a = cache.recent_start
        np.testing.assert_array_equal(np.array(cache.recent_keys), np.array(k[:, :, a:pos]))
        np.testing.assert_array_equal(np.array(cache.recent_values), np.array(v[:, :, a:pos]))
    assert len(bases) >= 2 and lazy > 100 and cache.offset == pos


def test_fp16_window_and_key_scaling_through_the_model(tmp_path):
    model = make_tiny_model("llama")
    seq = tokens(120, seed=2)
    kw = dict(turbo_kv_bits=3, turbo_fp16_window=16, turbo_key_scaling=True)
    cache = make_prompt_cache(model, **kw)
    assert (cache[0].fp16_window, cache[0].key_scaling) == (16, True)
    model(seq[None, :100], cache=cache)
    assert cache[0].key_scales.shape == (1, 2, 1, 16)  # segment 1 opened (position 32)
    path = str(tmp_path / "both.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    a = greedy(model, seq[100:], 5, cache)
    assert a == greedy(model, seq[100:], 5, loaded)
    # Chunked prefill codes the same positions here (100 at once: 84; 60 then 40: 44,
    # then 40 more). Its cache is not the same: a chunk's queries read the earlier
    # chunks' coded tokens through their codes, so later layers see other inputs (as
    # with any quantized cache); `test_fp16_window_attention_matches_its_definition`
    # checks each update's attention.
    chunked = make_prompt_cache(model, **kw)
    for lo, hi in ((0, 60), (60, 100)):
        model(seq[None, lo:hi], cache=chunked)
    assert [c.coded for c in chunked] == [84, 84]
    with pytest.raises(ValueError, match="non-negative integer"):
        make_prompt_cache(model, turbo_kv_bits=3, turbo_fp16_window=-1)
    with pytest.raises(ValueError, match="needs key centering"):
        make_prompt_cache(model, turbo_kv_bits=3, turbo_key_scaling=True, turbo_key_centering=False)


def test_model_domain_attention_matches_the_rotated_one(monkeypatch):
    """Where the fused dequantize kernel runs (a GPU), long query blocks attend in the
    model's domain; the CPU reference attends in the rotated one. The two agree, for
    every kind of cache and window layout (forced here on the CPU)."""
    from mlx_lm.models import turboquant_attention

    k = mx.random.normal((2, 2, 200, 64)) + 2.0 * mx.random.normal((2, 2, 1, 64))
    v, q = mx.random.normal((2, 2, 200, 64)), mx.random.normal((2, 4, 200, 64))

    def single(**kw):
        return TurboQuantKVCache(3, 3, key_scaling=True, **kw)

    def batch():
        rows = [single(fp16_window=16), single(fp16_window=16)]
        for i, n in enumerate((90, 40)):
            rows[i].update_and_fetch(k[i : i + 1, :, :n], v[i : i + 1, :, :n])
        return BatchTurboQuantKVCache.merge(rows)

    makers = {
        "window": lambda: single(fp16_window=16),
        "no window": lambda: single(),
        "ring": lambda: RotatingTurboQuantKVCache(128, 4, key_bits=3, value_bits=3),
        "batch": batch,
    }
    for name, make in makers.items():
        outs = []
        for rotated in (True, False):
            monkeypatch.setattr(turboquant_attention, "attends_rotated", lambda c: rotated)
            cache, B = make(), 2 if name == "batch" else 1
            got = []
            for a, b in ((100, 130), (130, 131), (131, 190)):
                codes = cache.update_and_fetch(k[:B, :, a:b], v[:B, :, a:b])
                mask = "causal" if b - a > 1 and name != "batch" else None
                got.append(
                    scaled_dot_product_attention(q[:B, :, a:b], *codes[:2], cache, 0.125, mask)
                )
            outs.append(mx.concatenate(got, axis=2))
        np.testing.assert_allclose(np.array(outs[0]), np.array(outs[1]), atol=2e-5, err_msg=name)


def test_key_scaling_is_causal_and_helps_keys_with_per_channel_scale():
    """σ_s is the per-channel spread of the reconstructed keys before segment s (RoPE
    pairs i, i + d/2 shared) to the power 1/2; scores of isotropic queries against keys
    whose channels differ in scale by 100x are much more accurate with it."""
    scales = mx.array(np.geomspace(0.1, 10.0, 32).astype(np.float32))
    scales = mx.concatenate([scales, scales])
    k = mx.random.normal((1, 2, 600, 64)) * scales
    one, chunked = TurboQuantKVCache(3, 3, key_scaling=True), TurboQuantKVCache(
        3, 3, key_scaling=True
    )
    one.update_and_fetch(k, k)
    for a, b in [(0, 5), (5, 6), (6, 200), (200, 511), (511, 512), (512, 600)]:
        chunked.update_and_fetch(k[:, :, a:b], k[:, :, a:b])
    for x, y in zip(one.state, chunked.state):
        np.testing.assert_array_equal(np.array(x), np.array(y))
    assert one.key_scales.shape == (1, 2, 3, 64)
    s = np.array(one.key_scales[0, 0, 0], dtype=np.float32)
    np.testing.assert_array_equal(s[:32], s[32:])
    # Follows the channels' spread: std^1/2 is 10x apart here, less in the estimate
    # because the first 32 keys are reconstructed from 3-bit codes whose error is
    # spread evenly over the channels.
    assert s[31] / s[0] > 3
    plain = TurboQuantKVCache(3, 3)
    plain.update_and_fetch(k, k)
    q = mx.random.normal((1, 2, 8, 64))
    exact = q @ k[:, :, 32:].swapaxes(-1, -2)

    def score_error(c):
        kd, _ = c._fetch(mx.float32)
        return float(mx.mean((q @ kd[:, :, 32:].swapaxes(-1, -2) - exact) ** 2))

    # Expected ratio (Σσ)² / (d Σσ²) = 0.43 for these channel scales.
    assert score_error(one) < 0.6 * score_error(plain), (score_error(one), score_error(plain))
