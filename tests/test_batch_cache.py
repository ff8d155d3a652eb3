"""Continuous batching: batch KV caches (FP16 and TurboQuant) and `BatchGenerator`.

Every check compares a batch with the same sequences run one at a time: logits, tokens
and the per-request caches handed back must match."""

import mlx.core as mx
import pytest
from conftest import make_tiny_model

from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import (
    BatchKVCache,
    KVCache,
    RotatingKVCache,
    can_batch,
    make_prompt_cache,
    merge_caches,
)
from mlx_lm.models.turboquant_cache import BatchTurboQuantKVCache, TurboQuantKVCache
from mlx_lm.sample_utils import make_sampler

CONFIGS = {
    "fp16": {},
    "tq3": dict(turbo_kv_bits=3),  # the defaults: key scaling, a 64-token FP16 window
    # Small windows, so that tokens slide out (and open segment 1) while batched.
    "tq3-window8": dict(turbo_kv_bits=3, turbo_fp16_window=8),
    "tq3-window-only": dict(turbo_kv_bits=3, turbo_key_scaling=False, turbo_fp16_window=4),
    "tq3-scaling-only": dict(turbo_kv_bits=3, turbo_fp16_window=0),
    "tq3-fp16-edge-layers": dict(turbo_kv_bits=3, turbo_fp16_layers=1),
    "tq2-no-centering": dict(turbo_kv_bits=2, turbo_key_centering=False),
}


@pytest.fixture(scope="module")
def model():
    # Three layers so that --turbo-fp16-layers 1 leaves one TurboQuant layer.
    return make_tiny_model("llama", head_dim=32, num_hidden_layers=3)


def _tokens(seed, n):
    return mx.random.randint(0, 128, (n,), key=mx.random.key(seed)).tolist()


def _prefilled(model, tokens, kw):
    cache = make_prompt_cache(model, **kw)
    model(mx.array(tokens)[None], cache=cache)
    return cache


def _same_state(a, b, tol=1e-4):
    assert type(a) is type(b) and a.offset == b.offset
    assert len(a.state) == len(b.state)
    for x, y in zip(a.state, b.state):
        assert x.shape == y.shape
        if x.size == 0:  # an absent array (no codes yet, no window tokens)
            continue
        if not mx.issubdtype(x.dtype, mx.floating):  # codes, segment ids: exactly
            assert mx.array_equal(x, y)
            continue
        # Float16 window tokens: batched matmuls give the model's keys a few 1e-4 apart
        # from a batch of one (one float16 ulp, or a few for small values).
        x, y = x.astype(mx.float32), y.astype(mx.float32)
        diff = (mx.abs(x - y) - 2e-3 * mx.abs(y)).max().item()
        assert diff <= tol, diff


@pytest.mark.parametrize("config", list(CONFIGS))
def test_batch_cache_matches_each_sequence_alone(model, config):
    """Unequal lengths (30 and 40 cross the key-mean segment start at 32 while
    decoding), a sequence filtered out mid-way and a new one extended in: every logit and
    every extracted cache (codes, key means and scales, float16 window) equals the
    sequence's own run, fed the same tokens one at a time (a prefill of them could
    differ from it by float16 rounding of the model's keys)."""
    kw = CONFIGS[config]
    prompts = [_tokens(1, 30), _tokens(2, 5), _tokens(3, 40)]
    late = _tokens(4, 20)
    forced = [_tokens(10 + i, 8) for i in range(4)]

    def solo(prompt, feed):
        cache = _prefilled(model, prompt, kw)
        logits = [model(mx.array([[t]]), cache=cache)[0, -1] for t in feed]
        return mx.stack(logits), cache

    expected = [solo(p, f) for p, f in zip(prompts + [late], forced)]

    batch = merge_caches([_prefilled(model, p, kw) for p in prompts])
    kinds = {type(c) for c in batch}
    assert kinds <= {BatchKVCache, BatchTurboQuantKVCache}
    assert (BatchTurboQuantKVCache in kinds) == bool(kw)
    rows = {0: 0, 1: 1, 2: 2}  # sequence -> row in the batch
    got = {i: [] for i in range(4)}
    fed = {0: 0, 1: 0, 2: 0}
    for step in range(8):
        if step == 3:
            # Sequence 1 leaves (after 3 tokens), sequence 3 joins.
            short = [c.extract(rows[1]) for c in batch]
            ref = solo(prompts[1], forced[1][:3])[1]
            for a, b in zip(short, ref):
                _same_state(a, b)
            for c in batch:
                c.filter([rows[0], rows[2]])
            new = merge_caches([_prefilled(model, late, kw)])
            for c, n in zip(batch, new):
                c.extend(n)
            rows = {0: 0, 2: 1, 3: 2}
            fed[3] = 0
            del fed[1]
        order = sorted(rows, key=rows.get)
        assert batch[0].offset.tolist() == [len((prompts + [late])[i]) + fed[i] for i in order]
        inputs = mx.array([[forced[i][fed[i]]] for i in order])
        logits = model(inputs, cache=batch)[:, -1]
        for i in order:
            got[i].append(logits[rows[i]])
            fed[i] += 1
    for i in (0, 2, 3):
        n = len(got[i])
        diff = mx.abs(mx.stack(got[i]) - expected[i][0][:n]).max().item()
        assert diff < 5e-4, (i, diff)  # (float16 window rounding, see `_same_state`)
        out = [c.extract(rows[i]) for c in batch]
        ref = solo((prompts + [late])[i], forced[i][:n])[1]
        for a, b in zip(out, ref):
            _same_state(a, b)


@pytest.mark.parametrize("config", ["tq3-window8", "tq3-window-only"])
def test_batch_window_after_trim_and_multi_token_steps(model, config):
    """Caches trimmed before they join (prompt-cache reuse: fewer float16 tokens than
    the window) and steps of several tokens per sequence (queries reading float16
    from where their update began): each row still matches its sequence alone."""
    kw = CONFIGS[config]

    def start(seed, n, trim):
        cache = _prefilled(model, _tokens(seed, n), kw)
        for layer in cache:
            layer.trim(trim)
        return cache

    specs = [(50, 30, 3), (51, 12, 0), (52, 45, 6)]
    feeds = [[_tokens(60 + i, 3), _tokens(70 + i, 1), _tokens(80 + i, 2)] for i in range(3)]
    alone = [start(*s) for s in specs]
    batch = merge_caches([start(*s) for s in specs])
    for step in range(3):
        got = model(mx.array([f[step] for f in feeds]), cache=batch)
        for i, cache in enumerate(alone):
            want = model(mx.array([feeds[i][step]]), cache=cache)[0]
            # Up to float16 rounding of the window keys, which batched matmuls may
            # round apart (a batch of one gives these logits exactly).
            assert mx.abs(got[i] - want).max().item() < 2e-3, (step, i)
    for i, cache in enumerate(alone):
        for a, b in zip([c.extract(i) for c in batch], cache):
            _same_state(a, b, tol=1e-3)  # codes still exactly


def test_batch_mask_hides_padding_and_rope_takes_offsets():
    cache = BatchKVCache.merge([_fp16_cache(3), _fp16_cache(1)])
    assert cache.left_padding.tolist() == [0, 2] and cache.offset.tolist() == [3, 1]
    mask = cache.make_mask(1)
    assert mask.shape == (2, 1, 1, 4)
    assert mask[:, 0, 0].tolist() == [[True] * 4, [False, False, True, True]]
    # Two new tokens: causal within each row, padding still hidden.
    mask = cache.make_mask(2)[1, 0]
    assert mask.tolist() == [[False, False, True, True, False], [False, False, True, True, True]]
    # RoPE with one offset per sequence (what the models pass as cache.offset).
    x = mx.random.normal((2, 2, 1, 8), key=mx.random.key(0))
    both = mx.fast.rope(x, 8, traditional=False, base=1e4, scale=1.0, offset=cache.offset)
    for b, off in enumerate((3, 1)):
        one = mx.fast.rope(x[b : b + 1], 8, traditional=False, base=1e4, scale=1.0, offset=off)
        assert mx.allclose(both[b : b + 1], one, atol=1e-6)


def _fp16_cache(n):
    c = KVCache()
    c.update_and_fetch(mx.ones((1, 2, n, 8)), mx.ones((1, 2, n, 8)))
    return c


def test_batch_cache_errors_name_the_problem():
    with pytest.raises(ValueError, match="RotatingKVCache"):
        merge_caches([[RotatingKVCache(16)], [RotatingKVCache(16)]])
    assert not can_batch([RotatingKVCache(16)]) and can_batch([KVCache(), TurboQuantKVCache()])
    cache = BatchKVCache.merge([_fp16_cache(2), _fp16_cache(3)])
    with pytest.raises(ValueError, match="distinct sequence indices"):
        cache.filter([0, 0])
    with pytest.raises(ValueError, match="distinct sequence indices"):
        cache.filter([])
    a, b = TurboQuantKVCache(3, 3), TurboQuantKVCache(4, 4)
    for c in (a, b):
        c.update_and_fetch(mx.ones((1, 2, 2, 32)), mx.ones((1, 2, 2, 32)))
    with pytest.raises(ValueError, match="different settings"):
        BatchTurboQuantKVCache.merge([a, b])
    # Key scaling and the FP16 window are settings too.
    a, b, c = (
        TurboQuantKVCache(3, 3, key_scaling=scaling, fp16_window=w)
        for scaling, w in ((True, 4), (True, 8), (False, 4))
    )
    for x in (a, b, c):
        x.update_and_fetch(mx.ones((1, 2, 6, 32)), mx.ones((1, 2, 6, 32)))
    for other in (b, c):
        with pytest.raises(ValueError, match="different settings"):
            BatchTurboQuantKVCache.merge([a, other])


@pytest.mark.parametrize("config", ["fp16", "tq3"])
def test_batch_generator_matches_generate_step(model, config):
    """Sequences that join at different steps and leave when done generate exactly the
    tokens of `generate_step` run on each alone (greedy)."""
    kw = CONFIGS[config]
    prompts = [_tokens(20, 30), _tokens(21, 5), _tokens(22, 40), _tokens(23, 12)]
    n_tokens = [12, 6, 10, 12]
    expected = [
        [t for t, _ in generate_step(mx.array(p), model, max_tokens=n, **kw)]
        for p, n in zip(prompts, n_tokens)
    ]
    gen = BatchGenerator(model, max_batch_size=3)
    which, got = {}, {}

    def insert(i):
        r = gen.insert(prompts[i], make_prompt_cache(model, **kw))
        which[r.uid], got[i] = i, [r.token]

    insert(0)
    insert(1)
    step = 0
    while gen.uids or len(got) < 4:
        if step == 2:
            insert(2)
            with pytest.raises(ValueError, match="batch is full"):
                gen.insert(prompts[3])
        if step >= 5 and 3 not in got and len(gen) < 3:
            insert(3)
        for r in gen.step():
            got[which[r.uid]].append(r.token)
        for uid in gen.uids:
            i = which[uid]
            if len(got[i]) >= n_tokens[i]:
                cache = gen.remove(uid)
                # Handed back: the prompt plus every token fed (all but the last).
                assert cache[0].offset == len(prompts[i]) + n_tokens[i] - 1
        step += 1
    assert [got[i] for i in range(4)] == expected


def test_batch_generator_seeded_sampling_ignores_neighbours(model):
    """A seeded request samples the same tokens alone and in a batch with others."""
    sampler = make_sampler(1.0)
    prompt = _tokens(30, 9)

    alone = BatchGenerator(model)
    r = alone.insert(prompt, sampler=sampler, seed=7)
    a = [r.token] + [alone.step()[0].token for _ in range(10)]

    gen = BatchGenerator(model)
    gen.insert(_tokens(31, 20), sampler=sampler, seed=3)
    r = gen.insert(prompt, sampler=sampler, seed=7)
    gen.insert(_tokens(32, 4), sampler=sampler)
    b = [r.token]
    for _ in range(10):
        b += [x.token for x in gen.step() if x.uid == r.uid]
    assert a == b
    other = BatchGenerator(model)
    r = other.insert(prompt, sampler=sampler, seed=8)
    assert [r.token] + [other.step()[0].token for _ in range(10)] != a


@pytest.mark.parametrize("arch", ["qwen3", "deepseek_v3"])
def test_batch_generator_other_architectures(arch):
    """Per-sequence RoPE offsets and padding masks reach every attention: QK-norm
    (qwen3) and multi-head latent attention, whose KVCache holds latents (deepseek_v3)."""
    if arch == "deepseek_v3":
        from test_models_mla import _tiny

        model = _tiny("deepseek_v3")
    else:
        model = make_tiny_model(arch, head_dim=32)
    prompts = [_tokens(40 + n, n) for n in (7, 19, 3)]
    expected = [[t for t, _ in generate_step(mx.array(p), model, max_tokens=6)] for p in prompts]
    gen = BatchGenerator(model)
    got = {}
    for p in prompts:
        r = gen.insert(p)
        got[r.uid] = [r.token]
    for _ in range(5):
        for r in gen.step():
            got[r.uid].append(r.token)
    assert [got[u] for u in sorted(got)] == expected
