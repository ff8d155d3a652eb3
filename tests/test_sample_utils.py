"""Samplers, filters and logits processors (mlx_lm.sample_utils)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    apply_xtc,
    categorical_sampling,
    make_logits_processors,
    make_repetition_penalty,
    make_sampler,
)

# Probabilities far from every filter's boundary, shuffled over the vocabulary so that
# no test can pass by favouring low (or high) token ids.
PROBS = np.array([0.30, 0.22, 0.16, 0.12, 0.09, 0.06, 0.03, 0.02])
PERM = np.random.default_rng(0).permutation(len(PROBS))  # rank r lives at id PERM[r]
N = 4000  # draws per support test; the rarest kept token (p >= 0.09) is never missed


def logprobs_row(probs=PROBS, perm=PERM):
    row = np.empty(len(probs), np.float32)
    row[perm] = np.log(probs)
    return mx.array(row)


def top_ids(k, perm=PERM):
    """The ids of the k most likely tokens."""
    return set(int(i) for i in perm[:k])


def draw(sampler, row=None, n=N, seed=0):
    """n samples from one distribution, drawn as one [n, V] batch."""
    row = logprobs_row() if row is None else row
    mx.random.seed(seed)
    out = sampler(mx.broadcast_to(row, (n, row.shape[-1])))
    assert out.shape == (n,)
    return np.array(out)


def frequencies(tokens, vocab=len(PROBS)):
    return np.bincount(tokens, minlength=vocab) / len(tokens)


def test_greedy_is_argmax():
    x = mx.random.normal((5, 100))
    expected = np.argmax(np.array(x), axis=-1)
    assert (np.array(make_sampler()(x)) == expected).all()
    # Filters are irrelevant at temperature 0.
    assert (np.array(make_sampler(0.0, top_p=0.5, top_k=3, min_p=0.2)(x)) == expected).all()
    # A single row without a batch axis gives a scalar.
    assert make_sampler()(x[0]).item() == expected[0]


def test_top_k_1_is_greedy():
    x = mx.random.normal((64, 100)) * 3
    mx.random.seed(1)
    out = make_sampler(temp=1.0, top_k=1)(x)
    assert (np.array(out) == np.argmax(np.array(x), axis=-1)).all()


def test_unfiltered_frequencies_follow_softmax_of_scaled_logprobs():
    freq = frequencies(draw(make_sampler(temp=1.0)))
    expected = np.empty(len(PROBS))
    expected[PERM] = PROBS
    assert np.abs(freq - expected).max() < 0.03
    # temperature 0.5 squares the probabilities (then renormalizes)
    freq = frequencies(draw(make_sampler(temp=0.5)))
    sharp = expected**2 / (expected**2).sum()
    assert np.abs(freq - sharp).max() < 0.03


@pytest.mark.parametrize(
    "kwargs, kept",
    [
        (dict(top_k=3), 3),
        (dict(top_k=6), 6),
        # top_p=0.6: 0.30 + 0.22 = 0.52 < 0.6 <= 0.68 with the third.
        (dict(top_p=0.6), 3),
        (dict(top_p=0.9), 6),  # 0.89 < 0.9 <= 0.95
        # min_p=0.35: p >= 0.105 keeps 0.30, 0.22, 0.16, 0.12.
        (dict(min_p=0.35), 4),
        (dict(min_p=0.35, min_tokens_to_keep=6), 6),
        # top-k first: renormalized top 4 are 0.375, 0.275, 0.2, 0.15, so top_p=0.6 keeps
        # two tokens (three without top-k in front).
        (dict(top_k=4, top_p=0.6), 2),
        # then min-p on the untouched values: 0.7 * 0.30 = 0.21 drops 0.16 after top-p.
        (dict(top_p=0.6, min_p=0.7), 2),
    ],
)
@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_filters_keep_exactly_the_right_support(kwargs, kept, temp):
    # The filters see the untempered distribution: a high temperature flattens the
    # sampling but does not change which tokens survive.
    tokens = draw(make_sampler(temp=temp, **kwargs))
    assert set(tokens.tolist()) == top_ids(kept)


def test_masked_logprobs_directly():
    row = logprobs_row()
    x = mx.stack([row, row[::-1]])  # two rows with different orders
    perms = [PERM, len(PROBS) - 1 - PERM]
    for out, keep in [
        (apply_top_k(x, 3), 3),
        (apply_top_p(x, 0.6), 3),
        (apply_top_p(x, 0.95), 6),  # 0.95 within rounding of the 6-token mass: kept
        (apply_min_p(x, 0.35), 4),
        (apply_min_p(x, 0.99, min_tokens_to_keep=3), 3),
    ]:
        out, xs = np.array(out), np.array(x)
        for b in range(2):
            kept = top_ids(keep, perms[b])
            for i in range(len(PROBS)):
                if i in kept:
                    assert out[b, i] == xs[b, i]
                else:
                    assert out[b, i] == -np.inf
    # Filters that keep everything return the input unchanged.
    assert mx.array_equal(apply_top_k(x, 8), x)
    assert mx.array_equal(apply_top_p(x, 1.0), x)
    assert mx.array_equal(apply_min_p(x, 0.0), x)


def test_top_k_keeps_exactly_k_with_ties_and_top_p_keeps_the_best_token():
    x = mx.zeros((3, 10))
    out = np.array(apply_top_k(x, 4))
    assert ((out == 0).sum(axis=-1) == 4).all()
    # A single dominant token: any top_p keeps it (and only it when p > its mass).
    peaked = mx.log(mx.array([[0.97, 0.01, 0.01, 0.01]]))
    out = np.array(apply_top_p(peaked, 0.5))
    assert np.isfinite(out).tolist() == [[True, False, False, False]]


def test_filters_accept_unnormalized_logits_and_low_precision():
    row = logprobs_row() + 7.0  # logits: logprobs plus a constant
    assert mx.array_equal(
        apply_top_p(row, 0.6) - 7.0 == -np.inf, apply_top_p(row - 7.0, 0.6) == -np.inf
    )
    assert mx.array_equal(apply_min_p(row, 0.35) == -np.inf, apply_min_p(row - 7, 0.35) == -np.inf)
    half = logprobs_row().astype(mx.float16)
    for out in (apply_top_p(half, 0.6), apply_min_p(half, 0.35), apply_top_k(half, 3)):
        assert out.dtype == mx.float16
    assert set(draw(make_sampler(1.0, top_p=0.6), row=half).tolist()) == top_ids(3)


def test_xtc_removes_top_choices_but_the_least_likely_of_them():
    # Above 0.1: 0.30, 0.22, 0.16, 0.12 -> only 0.12 of those stays; the rest below stays.
    out = np.array(apply_xtc(logprobs_row()[None], 1.0, 0.1, []))[0]
    removed = {i for i in range(len(PROBS)) if out[i] == -np.inf}
    assert removed == top_ids(3)
    special = int(PERM[0])
    out = np.array(apply_xtc(logprobs_row()[None], 1.0, 0.1, [special]))[0]
    assert {i for i in range(len(PROBS)) if out[i] == -np.inf} == top_ids(3) - {special}
    # Probability 0: never applied. One token above the threshold: nothing removed.
    assert mx.array_equal(apply_xtc(logprobs_row()[None], 0.0, 0.1, []), logprobs_row()[None])
    assert mx.array_equal(apply_xtc(logprobs_row()[None], 1.0, 0.25, []), logprobs_row()[None])
    # Through the sampler, half of the rows get XTC.
    tokens = draw(make_sampler(1.0, xtc_probability=0.5, xtc_threshold=0.1))
    freq = frequencies(tokens)
    assert 0.1 < freq[PERM[0]] < 0.2  # 0.30 in half of the draws


def test_seed_reproducibility_and_fresh_draws():
    x = mx.random.normal((16, 1000))
    sampler = make_sampler(temp=1.0, top_p=0.9, top_k=200)
    mx.random.seed(42)
    first = [np.array(sampler(x)) for _ in range(3)]
    mx.random.seed(42)
    again = [np.array(sampler(x)) for _ in range(3)]
    for a, b in zip(first, again):
        assert (a == b).all()
    # Consecutive calls draw new numbers (the compiled kernel updates the random state).
    assert not (first[0] == first[1]).all()
    mx.random.seed(43)
    assert not (np.array(sampler(x)) == first[0]).all()


def test_categorical_sampling_temperature():
    mx.random.seed(0)
    x = mx.broadcast_to(mx.log(mx.array([0.5, 0.5, 1e-9])), (2000, 3))
    out = np.array(categorical_sampling(x, 1.0))
    assert set(out.tolist()) == {0, 1}


def test_batch_rows_are_independent():
    rows = [logprobs_row(perm=np.roll(PERM, s)) for s in range(4)]
    x = mx.concatenate([mx.broadcast_to(r, (1000, len(PROBS))) for r in rows])
    mx.random.seed(3)
    out = np.array(make_sampler(1.0, top_k=2)(x)).reshape(4, 1000)
    for s in range(4):
        assert set(out[s].tolist()) == top_ids(2, np.roll(PERM, s))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temp=-0.1), "temp"),
        (dict(temp=float("nan")), "temp"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(min_p=2.0), "min_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(min_tokens_to_keep=0), "min_tokens_to_keep"),
        (dict(xtc_probability=1.5), "xtc_probability"),
        (dict(xtc_threshold=0.7), "xtc_threshold"),
        (dict(xtc_special_tokens=[-1]), "xtc_special_tokens"),
    ],
)
def test_make_sampler_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_sampler(**{"temp": 1.0, **kwargs})


def test_logit_bias_forces_a_token():
    logits = mx.random.normal((3, 50))
    before = np.array(logits)
    (bias,) = make_logits_processors(logit_bias={7: 100.0, 3: -5.0})
    out = bias(mx.array([1, 2]), logits)
    assert (np.array(make_sampler()(out)) == 7).all()
    mx.random.seed(0)
    assert (np.array(make_sampler(1.0)(out)) == 7).all()
    expected = before.copy()
    expected[:, 7] += 100
    expected[:, 3] -= 5
    assert np.allclose(np.array(out), expected)
    assert (np.array(logits) == before).all()  # the input is not modified
    with pytest.raises(ValueError, match="vocabulary"):
        make_logits_processors(logit_bias={60: 1.0})[0](None, logits)
    with pytest.raises(ValueError, match="logit_bias"):
        make_logits_processors(logit_bias=[(1, 2.0)])


def test_repetition_penalty():
    logits = mx.array([[2.0, -2.0, 1.0, -1.0, 0.5]])
    (penalty,) = make_logits_processors(repetition_penalty=2.0)
    # Token 0 twice counts once; positive logits are divided, negative multiplied.
    out = penalty(mx.array([0, 1, 0, 3]), logits)
    assert np.array(out).tolist() == [[1.0, -4.0, 1.0, -2.0, 0.5]]
    # Only the last `context_size` tokens count.
    (penalty,) = make_logits_processors(repetition_penalty=2.0, repetition_context_size=2)
    out = penalty(mx.array([3, 0, 1]), logits)
    assert np.array(out).tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5]]
    # A penalty below 1 rewards repeats instead.
    out = make_repetition_penalty(0.5)(mx.array([0, 1]), logits)
    assert np.array(out).tolist() == [[4.0, -1.0, 1.0, -1.0, 0.5]]
    # No history: unchanged.
    assert mx.array_equal(make_repetition_penalty(2.0)(mx.array([], mx.int32), logits), logits)


def test_repetition_penalty_batch():
    logits = mx.array([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    shared = make_repetition_penalty(2.0)(mx.array([2]), logits)
    assert np.array(shared).tolist() == [[2.0, -2.0, 0.5], [2.0, -2.0, 0.5]]
    per_row = make_repetition_penalty(2.0)(mx.array([[0, 0], [1, 2]]), logits)
    assert np.array(per_row).tolist() == [[1.0, -2.0, 1.0], [2.0, -4.0, 0.5]]
    with pytest.raises(ValueError, match="disagree"):
        make_repetition_penalty(2.0)(mx.array([[0], [1], [2]]), logits)


def test_logits_processors_validation_and_defaults():
    assert make_logits_processors() == []
    assert make_logits_processors(repetition_penalty=1.0) == []
    assert len(make_logits_processors({1: 1.0}, 1.3)) == 2
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="repetition_penalty"):
            make_logits_processors(repetition_penalty=bad)
    with pytest.raises(ValueError, match="repetition_context_size"):
        make_logits_processors(repetition_penalty=1.2, repetition_context_size=0)


def test_sampler_with_processors_in_a_loop():
    """The way generate_step uses them: history grows by the sampled token."""
    processors = make_logits_processors({5: 3.0}, repetition_penalty=1.5)
    sampler = make_sampler(temp=0.8, top_p=0.95, min_p=0.05)
    history = mx.array([1, 2, 3])
    mx.random.seed(0)
    for _ in range(5):
        logits = mx.random.normal((1, 32))
        for p in processors:
            logits = p(history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        token = sampler(logprobs)
        assert token.shape == (1,) and 0 <= token.item() < 32
        history = mx.concatenate([history, token.astype(history.dtype)])
    assert history.shape == (8,)


@pytest.mark.slow
def test_compiled_path_matches(monkeypatch):
    """On a GPU the filters and the sampling kernel run through mx.compile; force that
    path here (compiling costs seconds per shape on the CPU backend) and compare."""
    x = mx.random.normal((4, 300)) * 2
    mx.random.seed(5)
    eager = [apply_top_p(x, 0.8), apply_min_p(x, 0.1, 3), make_sampler(0.7, top_p=0.9)(x)]
    eager_next = make_sampler(0.7, top_p=0.9)(x)
    monkeypatch.setattr(mx, "default_device", lambda: mx.gpu)
    mx.random.seed(5)
    compiled = [apply_top_p(x, 0.8), apply_min_p(x, 0.1, 3), make_sampler(0.7, top_p=0.9)(x)]
    compiled_next = make_sampler(0.7, top_p=0.9)(x)
    for a, b in zip(eager, compiled):
        assert mx.array_equal(a, b)
    # The compiled kernel advances the random state like the eager one does.
    assert mx.array_equal(eager_next, compiled_next)
    assert not mx.array_equal(compiled[2], compiled_next)
