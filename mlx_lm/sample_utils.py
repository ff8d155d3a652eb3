"""Samplers and logits processors for generation.

A *sampler* maps log-probabilities ``[B, V]`` (or ``[V]``) to token ids ``[B]``.
A *logits processor* maps ``(tokens, logits) -> logits`` before sampling; ``tokens``
is the history (prompt plus generated tokens) the processor may look at.

The filters (``apply_top_k``, ``apply_top_p``, ``apply_min_p``, ``apply_xtc``)
replace the log-probabilities of removed tokens with ``-inf`` and leave the others
unchanged, so they can be chained. They work on the untempered distribution;
the temperature is applied last, in ``categorical_sampling``. Inputs do not need
to be normalized: every filter only compares values within a row or renormalizes.
"""

import math
from functools import partial, wraps
from typing import Callable, Dict, List, Optional

import mlx.core as mx

__all__ = [
    "make_sampler",
    "make_logits_processors",
    "make_repetition_penalty",
    "apply_top_k",
    "apply_top_p",
    "apply_min_p",
    "apply_xtc",
    "categorical_sampling",
]


def _check_range(name: str, value: float, low: float, high: float, hint: str):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}; {hint}")


def _check_int(name: str, value, low: int, hint: str):
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}.")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}; {hint}")


def make_sampler(
    temp: float = 0.0,
    top_p: float = 0.0,
    min_p: float = 0.0,
    min_tokens_to_keep: int = 1,
    top_k: int = 0,
    xtc_probability: float = 0.0,
    xtc_threshold: float = 0.0,
    xtc_special_tokens: List[int] = [],
) -> Callable[[mx.array], mx.array]:
    """Make a sampler function for ``generate_step``.

    Args:
        temp: temperature; ``0`` means greedy (argmax) and disables every filter.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose
            probabilities add up to at least ``top_p``. ``0`` or ``1`` disables it.
        min_p: keep tokens whose probability is at least ``min_p`` times that of the
            most likely token. ``0`` disables it.
        min_tokens_to_keep: the min-p filter always keeps at least this many tokens.
        top_k: keep only the ``top_k`` most likely tokens. ``0`` disables it.
        xtc_probability: probability of applying XTC ("exclude top choices") at a step.
        xtc_threshold: XTC removes every token more likely than this threshold
            except the least likely of them. Must be in [0, 0.5].
        xtc_special_tokens: token ids XTC never removes (EOS, newline).

    Filters run in this order: top-k, top-p, min-p, XTC; then
    ``categorical(logprobs / temp)``.

    Returns:
        ``sampler(logprobs: mx.array, key=None) -> mx.array`` of token ids (last axis
        reduced); ``key`` is an optional PRNG key for the categorical draw (per-request
        seeds in a batch), else MLX's global random state is used.
    """
    _check_range("temp", temp, 0.0, math.inf, "use 0 for greedy decoding.")
    _check_range("top_p", top_p, 0.0, 1.0, "use 0 (or 1) to disable nucleus sampling.")
    _check_range("min_p", min_p, 0.0, 1.0, "use 0 to disable min-p sampling.")
    _check_int("top_k", top_k, 0, "use 0 to disable top-k sampling.")
    _check_int("min_tokens_to_keep", min_tokens_to_keep, 1, "at least one token must survive.")
    _check_range("xtc_probability", xtc_probability, 0.0, 1.0, "use 0 to disable XTC.")
    _check_range("xtc_threshold", xtc_threshold, 0.0, 0.5, "XTC needs a threshold <= 0.5.")
    xtc_special_tokens = list(xtc_special_tokens or [])
    for t in xtc_special_tokens:
        _check_int("xtc_special_tokens entries", t, 0, "token ids are non-negative.")

    if temp == 0:
        return lambda logprobs, key=None: mx.argmax(logprobs, axis=-1)

    filters = []
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    if 0.0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p > 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, min_tokens_to_keep))
    if xtc_probability > 0.0:
        filters.append(lambda x: apply_xtc(x, xtc_probability, xtc_threshold, xtc_special_tokens))

    def sampler(logprobs: mx.array, key: Optional[mx.array] = None) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        if key is not None:  # an explicit key: the global random state is left alone
            return mx.random.categorical(logprobs * (1 / temp), key=key)
        return categorical_sampling(logprobs, temp)

    return sampler


def _compile_on_gpu(fun=None, **kwargs):
    """`mx.compile` used only when the default device is a GPU.

    Fusing the sort/cumsum/softmax chains into fewer kernels pays off on a GPU. On the
    CPU backend compiling gains nothing measurable (categorical over 49k logits: 1.9 ms
    either way) while each new input shape costs about 2 s of code generation.
    """
    if fun is None:
        return partial(_compile_on_gpu, **kwargs)
    compiled = mx.compile(fun, **kwargs)

    @wraps(fun)
    def dispatch(*args):
        return (compiled if mx.default_device() == mx.gpu else fun)(*args)

    return dispatch


# The random state is an implicit input and output of the sampling kernel: passing it
# to mx.compile makes every call draw fresh numbers (and stay reproducible under
# mx.random.seed) instead of replaying the key captured at trace time.
@_compile_on_gpu(inputs=mx.random.state, outputs=mx.random.state)
def categorical_sampling(logits: mx.array, temp: float) -> mx.array:
    """Sample token ids from ``softmax(logits / temp)`` along the last axis."""
    return mx.random.categorical(logits * (1 / temp))


def apply_top_k(logprobs: mx.array, top_k: int) -> mx.array:
    """Keep the ``top_k`` largest entries of each row, set the others to ``-inf``.

    Ties at the boundary are broken arbitrarily, so exactly ``top_k`` entries survive.
    """
    vocab_size = logprobs.shape[-1]
    if not isinstance(top_k, int) or not 0 < top_k:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}.")
    if top_k >= vocab_size:
        return logprobs
    # argpartition puts the (V - k) smallest first: those are the ones to drop.
    drop = mx.argpartition(-logprobs, kth=top_k - 1, axis=-1)[..., top_k:]
    return mx.put_along_axis(logprobs, drop, mx.array(-float("inf"), logprobs.dtype), axis=-1)


@_compile_on_gpu
def _top_p_mask(logprobs: mx.array, top_p: mx.array) -> mx.array:
    probs = mx.softmax(logprobs.astype(mx.float32), axis=-1)
    order = mx.argsort(probs, axis=-1)  # ascending
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    # A token survives if the mass of the tokens sorted below it (itself included)
    # exceeds 1 - top_p: exactly the smallest top set with mass >= top_p.
    keep_sorted = mx.cumsum(sorted_probs, axis=-1) > 1 - top_p
    # The most likely token always survives, whatever rounding does to the cumsum.
    keep_sorted = keep_sorted | (mx.arange(probs.shape[-1]) == probs.shape[-1] - 1)
    return mx.put_along_axis(mx.zeros(probs.shape, mx.bool_), order, keep_sorted, axis=-1)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Nucleus filter: keep the smallest set of most likely tokens whose total
    probability is at least ``top_p``; set the others to ``-inf``."""
    _check_range("top_p", top_p, 0.0, 1.0, "use 1 to keep every token.")
    keep = _top_p_mask(logprobs, mx.array(top_p, mx.float32))
    return mx.where(keep, logprobs, mx.array(-float("inf"), logprobs.dtype))


@_compile_on_gpu
def _min_p_mask(logprobs: mx.array, log_min_p: mx.array, rank_keep: mx.array) -> mx.array:
    logprobs = logprobs.astype(mx.float32)
    top = mx.max(logprobs, axis=-1, keepdims=True)
    keep = logprobs >= top + log_min_p
    # Also keep the `min_tokens_to_keep` most likely tokens (rank < rank_keep).
    order = mx.argsort(-logprobs, axis=-1)
    ranks = mx.broadcast_to(mx.arange(logprobs.shape[-1]), logprobs.shape)
    by_rank = mx.put_along_axis(mx.zeros(logprobs.shape, mx.int32), order, ranks, axis=-1)
    return keep | (by_rank < rank_keep)


def apply_min_p(logprobs: mx.array, min_p: float, min_tokens_to_keep: int = 1) -> mx.array:
    """Keep tokens with ``p >= min_p * p_max`` (and at least the ``min_tokens_to_keep``
    most likely ones); set the others to ``-inf``."""
    _check_range("min_p", min_p, 0.0, 1.0, "use 0 to keep every token.")
    _check_int("min_tokens_to_keep", min_tokens_to_keep, 1, "at least one token must survive.")
    if min_p == 0:
        return logprobs
    keep = _min_p_mask(
        logprobs, mx.array(math.log(min_p), mx.float32), mx.array(min_tokens_to_keep)
    )
    return mx.where(keep, logprobs, mx.array(-float("inf"), logprobs.dtype))


def apply_xtc(
    logprobs: mx.array,
    xtc_probability: float,
    xtc_threshold: float,
    xtc_special_tokens: List[int],
) -> mx.array:
    """XTC ("exclude top choices"): with probability ``xtc_probability``, remove every
    token whose probability exceeds ``xtc_threshold`` except the least likely of them,
    never removing ``xtc_special_tokens``. Nothing changes when fewer than two tokens
    are above the threshold."""
    _check_range("xtc_probability", xtc_probability, 0.0, 1.0, "use 0 to disable XTC.")
    _check_range("xtc_threshold", xtc_threshold, 0.0, 0.5, "XTC needs a threshold <= 0.5.")
    probs = mx.softmax(logprobs.astype(mx.float32), axis=-1)
    above = probs > xtc_threshold
    # The least likely token above the threshold is the one XTC keeps.
    lowest_above = mx.min(mx.where(above, probs, mx.inf), axis=-1, keepdims=True)
    remove = above & (probs > lowest_above)
    if xtc_special_tokens:
        special = mx.zeros((probs.shape[-1],), mx.bool_)
        special[mx.array(xtc_special_tokens)] = True
        remove = remove & ~special
    apply = mx.random.uniform(shape=probs.shape[:-1] + (1,)) < xtc_probability
    return mx.where(apply & remove, mx.array(-float("inf"), logprobs.dtype), logprobs)


def make_repetition_penalty(
    penalty: float, context_size: int = 20
) -> Callable[[mx.array, mx.array], mx.array]:
    """CTRL-style repetition penalty (https://arxiv.org/abs/1909.05858).

    For each token id among the last ``context_size`` tokens of the history, a
    positive logit is divided by ``penalty`` and a negative one multiplied by it, so
    ``penalty > 1`` makes repeats less likely whatever the sign. ``tokens`` may be
    ``[L]`` (one history shared by every row) or ``[B, L]`` (one per row).
    """
    if not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not penalty > 0:
        raise ValueError(
            f"repetition_penalty must be a positive number, got {penalty!r}; "
            "use 1.0 (or None) for no penalty."
        )
    _check_int("repetition_context_size", context_size, 1, "the penalty needs some context.")

    def repetition_penalty_processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens is None or tokens.size == 0:
            return logits
        tokens = tokens[..., -context_size:]
        vocab_size = logits.shape[-1]
        # A mask of the penalized ids (rather than a scatter of penalized values) makes
        # repeated ids in the context count once, as in CTRL.
        if tokens.ndim == 1:
            mask = mx.zeros((vocab_size,), mx.bool_)
            mask[tokens] = True
        else:
            if logits.ndim != 2 or logits.shape[0] != tokens.shape[0]:
                raise ValueError(
                    f"tokens {tokens.shape} and logits {logits.shape} disagree: per-row "
                    "histories need logits of shape [B, V] with the same B."
                )
            mask = mx.zeros(logits.shape, mx.bool_)
            mask = mx.put_along_axis(mask, tokens, mx.array(True), axis=-1)
        penalized = mx.where(logits < 0, logits * penalty, logits / penalty)
        return mx.where(mask, penalized.astype(logits.dtype), logits)

    return repetition_penalty_processor


def _make_logit_bias(logit_bias: Dict[int, float]) -> Callable[[mx.array, mx.array], mx.array]:
    if not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict {{token_id: bias}}, got {type(logit_bias)}.")
    for k, v in logit_bias.items():
        _check_int("logit_bias keys", k, 0, "keys are token ids.")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
            raise ValueError(f"logit_bias[{k}] must be a number, got {v!r}.")
    ids = list(logit_bias.keys())
    max_id = max(ids)
    indices = mx.array(ids)
    values = mx.array(list(logit_bias.values()), mx.float32)

    def logit_bias_processor(_tokens: mx.array, logits: mx.array) -> mx.array:
        if max_id >= logits.shape[-1]:
            raise ValueError(
                f"logit_bias names token {max_id} but the vocabulary has "
                f"{logits.shape[-1]} tokens; remove that entry."
            )
        return logits.at[..., indices].add(values.astype(logits.dtype))

    return logit_bias_processor


def make_logits_processors(
    logit_bias: Optional[Dict[int, float]] = None,
    repetition_penalty: Optional[float] = None,
    repetition_context_size: Optional[int] = 20,
) -> List[Callable[[mx.array, mx.array], mx.array]]:
    """Make the logits processors for ``generate_step``.

    Args:
        logit_bias: ``{token_id: bias}`` added to the logits at every step.
        repetition_penalty: CTRL-style penalty (> 0; 1 is neutral) on the tokens of
            the last ``repetition_context_size`` history positions.
        repetition_context_size: how many recent tokens the penalty looks at.

    Returns:
        A list of ``processor(tokens, logits) -> logits``, bias first.
    """
    processors = []
    if logit_bias:
        processors.append(_make_logit_bias(logit_bias))
    if repetition_penalty is not None and repetition_penalty != 1.0:
        processors.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return processors
