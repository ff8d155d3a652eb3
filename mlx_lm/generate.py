"""Text generation: `generate_step` (tokens), `stream_generate` (text), `generate`, and
the `mlx_lm.generate` command line."""

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .models import cache as cache_module
from .sample_utils import make_logits_processors, make_sampler
from .tokenizer_utils import TokenizerWrapper

DEFAULT_PROMPT = "hello"
DEFAULT_MAX_TOKENS = 100
DEFAULT_TEMP = 0.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_TOP_K = 0
DEFAULT_SEED = None
DEFAULT_QUANTIZED_KV_START = 5000

# Model work runs on its own stream so the next step can be queued while Python
# hands the current token to the caller.
generation_stream = mx.new_stream(mx.default_device())


@contextlib.contextmanager
def wired_limit(model: nn.Module, streams: Optional[List[mx.Stream]] = None):
    """Upstream wires the model's memory on Metal; elsewhere there is nothing to do."""
    if not mx.metal.is_available():
        yield
        return
    model_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    max_rec = mx.metal.device_info()["max_recommended_working_set_size"]
    old_limit = mx.set_wired_limit(min(model_bytes, max_rec))
    try:
        yield
    finally:
        if streams is not None:
            for s in streams:
                mx.synchronize(s)
        else:
            mx.synchronize()
        mx.set_wired_limit(old_limit)


@dataclass
class GenerationResponse:
    """One step of `stream_generate`.

    Attributes:
        text: the text produced by this step (may be empty while a UTF-8 character or
            word is incomplete).
        token: the generated token id.
        logprobs: log-probabilities over the vocabulary for this step.
        from_draft: whether the token came from a draft model (always False here).
        prompt_tokens, prompt_tps: prompt length and prefill speed (tokens/s).
        generation_tokens, generation_tps: tokens generated so far and decode speed.
        peak_memory: peak memory in GB so far.
        finish_reason: "stop", "length" or None while generation continues.
    """

    text: str
    token: int
    logprobs: mx.array
    from_draft: bool
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory: float
    finish_reason: Optional[str] = None


def maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
    """Swap plain KV caches for affine-quantized ones once they pass `quantized_kv_start`."""
    if kv_bits is None:
        return
    for i, c in enumerate(prompt_cache):
        if type(c) is cache_module.KVCache and c.offset >= quantized_kv_start:
            widths = sorted({a.shape[-1] for a in c.state}) if c.keys is not None else []
            if any(w % kv_group_size for w in widths):
                fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
                raise ValueError(
                    f"--kv-bits cannot quantize layer {i}'s cache: its key/value widths "
                    f"{' and '.join(map(str, widths))} are not multiples of --kv-group-size "
                    f"{kv_group_size}. "
                    + (f"Use --kv-group-size {fits[-1]}." if fits else "Drop --kv-bits.")
                )
            prompt_cache[i] = c.to_quantized(group_size=kv_group_size, bits=kv_bits)


def _check_kv_bits(kv_bits, kv_group_size, prompt_cache):
    if kv_bits is None:
        return
    if kv_bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"kv_bits must be one of 2, 3, 4, 5, 6, 8 (got {kv_bits}).")
    if kv_group_size not in (32, 64, 128):
        raise ValueError(f"kv_group_size must be 32, 64 or 128 (got {kv_group_size}).")
    for i, c in enumerate(prompt_cache):
        if isinstance(c, cache_module.RotatingKVCache):
            raise ValueError(
                f"--kv-bits cannot quantize layer {i}'s RotatingKVCache (sliding window or "
                "--max-kv-size). Drop --kv-bits or --max-kv-size."
            )


def generate_step(
    prompt: mx.array,
    model: nn.Module,
    *,
    max_tokens: int = 256,
    sampler: Optional[Callable[[mx.array], mx.array]] = None,
    logits_processors: Optional[List[Callable[[mx.array, mx.array], mx.array]]] = None,
    max_kv_size: Optional[int] = None,
    prompt_cache: Optional[Any] = None,
    prefill_step_size: int = 2048,
    kv_bits: Optional[int] = None,
    kv_group_size: int = 64,
    quantized_kv_start: int = 0,
    prompt_progress_callback: Optional[Callable[[int, int], None]] = None,
    input_embeddings: Optional[mx.array] = None,
    turbo_kv_bits: Optional[int] = None,
    turbo_fp16_layers: int = 0,
    turbo_key_bits: Optional[int] = None,
    turbo_value_bits: Optional[int] = None,
    turbo_key_centering: bool = True,
    turbo_key_scaling: Optional[bool] = None,
    turbo_fp16_window: Optional[int] = None,
) -> Generator[Tuple[int, mx.array], None, None]:
    """Yield (token, logprobs) pairs generated from `prompt`.

    The prompt (all but its last token) is prefilled in chunks of `prefill_step_size`;
    decoding then runs one step ahead: step n+1 is queued with `mx.async_eval` before
    token n is handed to the caller, so Python's per-token work overlaps the device's.

    Args:
        prompt: 1-D array of prompt token ids.
        model: the model.
        max_tokens: number of tokens to generate; -1 for no limit.
        sampler: maps log-probabilities [1, V] to a token; default argmax.
        logits_processors: functions (tokens, logits) -> logits applied in order.
        max_kv_size: bound the cache (RotatingKVCache) to this many tokens.
        prompt_cache: caches from `make_prompt_cache`, updated in place (may already
            hold a prefix of the conversation).
        prefill_step_size: tokens per prefill chunk.
        kv_bits, kv_group_size, quantized_kv_start: upstream's affine KV quantization.
        prompt_progress_callback: called as (processed, total) during prefill.
        input_embeddings: optional embeddings used in place of the prompt's tokens.
        turbo_kv_bits, turbo_fp16_layers, turbo_key_bits, turbo_value_bits,
            turbo_key_centering, turbo_key_scaling, turbo_fp16_window: compress the KV cache with TurboQuant (see
            `make_prompt_cache`); a caller's own `prompt_cache` is converted layer by
            layer, in place.
    """
    if not isinstance(max_tokens, int) or max_tokens < -1:
        raise ValueError(f"max_tokens must be a non-negative integer or -1 (got {max_tokens}).")
    if prefill_step_size < 1:
        raise ValueError(f"prefill_step_size must be positive (got {prefill_step_size}).")
    if input_embeddings is not None and len(prompt) != len(input_embeddings):
        raise ValueError("input_embeddings must have one row per prompt token.")
    if len(prompt) == 0:
        raise ValueError("The prompt is empty: give at least one token.")

    turbo = dict(
        turbo_kv_bits=turbo_kv_bits,
        turbo_fp16_layers=turbo_fp16_layers,
        turbo_key_bits=turbo_key_bits,
        turbo_value_bits=turbo_value_bits,
        turbo_key_centering=turbo_key_centering,
        turbo_key_scaling=turbo_key_scaling,
        turbo_fp16_window=turbo_fp16_window,
    )
    use_turbo = any(
        turbo[k] is not None for k in ("turbo_kv_bits", "turbo_key_bits", "turbo_value_bits")
    )
    if use_turbo and kv_bits is not None:
        raise ValueError(
            "Use either kv_bits (--kv-bits) or turbo_kv_bits (--turbo-kv-bits), not both."
        )
    if prompt_cache is None:
        prompt_cache = cache_module.make_prompt_cache(model, max_kv_size=max_kv_size, **turbo)
    elif len(prompt_cache) != len(model.layers):
        raise ValueError(
            f"The prompt cache has {len(prompt_cache)} layers but the model has "
            f"{len(model.layers)}: it was made for another model."
        )
    elif use_turbo:
        from .models.turboquant_cache import to_turbo_quantized_cache

        prompt_cache[:] = to_turbo_quantized_cache(prompt_cache, model, **turbo)
    _check_kv_bits(kv_bits, kv_group_size, prompt_cache)

    sampler = sampler or (lambda x: mx.argmax(x, axis=-1))
    logits_processors = logits_processors or []
    prompt_progress_callback = prompt_progress_callback or (lambda *_: None)
    history = prompt if logits_processors else None

    def forward(tokens: mx.array, embeddings: Optional[mx.array]):
        if embeddings is not None:
            return model(tokens[None], cache=prompt_cache, input_embeddings=embeddings[None])
        return model(tokens[None], cache=prompt_cache)

    def step(tokens: mx.array, embeddings: Optional[mx.array] = None):
        nonlocal history
        with mx.stream(generation_stream):
            logits = forward(tokens, embeddings)[:, -1, :]
            if logits_processors:
                for processor in logits_processors:
                    logits = processor(history, logits)
            maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            token = sampler(logprobs)
            if logits_processors:
                history = mx.concatenate([history, token])
            return token, logprobs.squeeze(0)

    total = len(prompt)
    processed = 0
    with mx.stream(generation_stream):
        while total - processed > 1:
            n = min(prefill_step_size, total - processed - 1)
            chunk_embeddings = (
                input_embeddings[processed : processed + n]
                if input_embeddings is not None
                else None
            )
            forward(prompt[processed : processed + n], chunk_embeddings)
            maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits)
            mx.eval([c.state for c in prompt_cache])
            processed += n
            prompt_progress_callback(processed, total)
            mx.clear_cache()
    last_embeddings = input_embeddings[processed:] if input_embeddings is not None else None
    token, logprobs = step(prompt[processed:], last_embeddings)
    mx.async_eval(token, logprobs)

    n = 0
    while True:
        if n != max_tokens:
            next_token, next_logprobs = step(token)
            mx.async_eval(next_token, next_logprobs)
        if n == 0:
            mx.eval(token)
            prompt_progress_callback(total, total)
        if n == max_tokens:
            break
        yield token.item(), logprobs
        if n % 256 == 0:
            mx.clear_cache()
        token, logprobs = next_token, next_logprobs
        n += 1


def _encode_prompt(tokenizer, prompt: Union[str, List[int], mx.array]) -> mx.array:
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        add_special = bos is None or not prompt.startswith(bos)
        prompt = tokenizer.encode(prompt, add_special_tokens=add_special)
    return mx.array(prompt, dtype=mx.uint32)


def stream_generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, List[int], mx.array],
    max_tokens: int = 256,
    draft_model: Optional[nn.Module] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """Generate text from `prompt`, yielding a `GenerationResponse` per token.

    `kwargs` go to `generate_step` (sampler, logits_processors, prompt_cache,
    max_kv_size, kv_bits, prefill_step_size, prompt_progress_callback, ...).
    """
    if draft_model is not None:
        raise ValueError("Speculative decoding (draft_model) is not supported yet.")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _encode_prompt(tokenizer, prompt)
    detokenizer = tokenizer.detokenizer
    eos = tokenizer.eos_token_ids

    with wired_limit(model, [generation_stream]):
        tic = time.perf_counter()
        prompt_tps = 0.0
        n = 0
        token = None
        logprobs = None
        finish_reason = None
        for n, (token, logprobs) in enumerate(
            generate_step(prompt, model, max_tokens=max_tokens, **kwargs)
        ):
            if n == 0:
                prompt_time = time.perf_counter() - tic
                prompt_tps = prompt.size / prompt_time
                tic = time.perf_counter()
            if token in eos:
                finish_reason = "stop"
                break
            detokenizer.add_token(token)
            if n + 1 == max_tokens:
                finish_reason = "length"
                break
            yield GenerationResponse(
                text=detokenizer.last_segment,
                token=token,
                logprobs=logprobs,
                from_draft=False,
                prompt_tokens=prompt.size,
                prompt_tps=prompt_tps,
                generation_tokens=n + 1,
                generation_tps=(n + 1) / (time.perf_counter() - tic),
                peak_memory=mx.get_peak_memory() / 1e9,
            )
        if token is None:
            return
        detokenizer.finalize()
        yield GenerationResponse(
            text=detokenizer.last_segment,
            token=token,
            logprobs=logprobs,
            from_draft=False,
            prompt_tokens=prompt.size,
            prompt_tps=prompt_tps,
            generation_tokens=n + 1,
            generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9),
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=finish_reason or "length",
        )


def generate(
    model: nn.Module,
    tokenizer,
    prompt: Union[str, List[int]],
    verbose: bool = False,
    **kwargs,
) -> str:
    """Generate a complete response. With `verbose`, stream the text to stdout and
    print prompt/generation speed and peak memory at the end."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if response is None:
            print("No text generated for this prompt")
            return text
        print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
        print(
            f"Generation: {response.generation_tokens} tokens, "
            f"{response.generation_tps:.3f} tokens-per-sec"
        )
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    return text


# ----------------------------------------------------------------------------
# Continuous batching

DEFAULT_MAX_BATCH_SIZE = 8


@dataclass
class BatchResponse:
    """One token of one sequence of a `BatchGenerator`: its uid, the token and the
    log-probabilities [V] it was sampled from."""

    uid: int
    token: int
    logprobs: mx.array


@dataclass
class _Sequence:
    sampler: Optional[Callable]  # None: greedy
    processors: List[Callable]
    history: Optional[mx.array]
    key: Optional[mx.array]
    next_token: int = 0


class BatchGenerator:
    """Decode several sequences together, one batched forward pass per step, with
    sequences joining and leaving between steps (continuous batching).

    `insert` prefills a new sequence alone, in its own per-request cache (which may
    already hold a prefix of it, e.g. from a prompt-cache store), samples its first
    token and merges the cache into the running batch (`BatchKVCache` /
    `BatchTurboQuantKVCache` layers, left-padded, per-sequence offsets). `step` feeds
    every sequence's last token and returns the next one of each. `remove` takes a
    sequence out and returns its cache as a per-request cache holding its prompt and
    every token fed so far. Stop conditions are the caller's: it removes a sequence when
    done.

    Each sequence keeps its own sampler, logits processors (with its own token history,
    as in `generate_step`) and, with a `seed`, its own PRNG key: a seeded sequence
    samples the same tokens whatever else is in the batch. Every layer must be a plain
    `KVCache` or `TurboQuantKVCache` (`models.cache.can_batch`).

    Args:
        model: the model.
        max_batch_size: most sequences decoded together; `insert` refuses more.
        prefill_step_size: tokens per prefill chunk of a new sequence.
    """

    def __init__(
        self,
        model: nn.Module,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        prefill_step_size: int = 2048,
    ):
        for name, v in (
            ("max_batch_size", max_batch_size),
            ("prefill_step_size", prefill_step_size),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        self.model = model
        self.max_batch_size = max_batch_size
        self.prefill_step_size = prefill_step_size
        self._cache: Optional[List[Any]] = None
        self._uids: List[int] = []
        self._seqs = {}
        self._next_uid = 0
        self._steps = 0

    def __len__(self) -> int:
        return len(self._uids)

    @property
    def uids(self) -> List[int]:
        return list(self._uids)

    def insert(
        self,
        prompt: Union[List[int], mx.array],
        prompt_cache: Optional[List[Any]] = None,
        sampler: Optional[Callable] = None,
        logits_processors: Optional[List[Callable]] = None,
        seed: Optional[int] = None,
    ) -> BatchResponse:
        """Prefill `prompt` (the tokens not yet in `prompt_cache`, at least one) and add
        the sequence to the batch. Returns its first generated token (with its uid).

        `sampler` maps log-probabilities [1, V] to a token (`make_sampler`; None: greedy,
        and greedy sequences share one argmax per step); with `seed` it is called with
        a `key=` argument, the sequence's own PRNG key."""
        if len(self) >= self.max_batch_size:
            raise ValueError(
                f"The batch is full ({self.max_batch_size} sequences): remove one first or "
                "raise max_batch_size."
            )
        prompt = mx.array(prompt, dtype=mx.uint32) if not isinstance(prompt, mx.array) else prompt
        if prompt.ndim != 1 or prompt.size == 0:
            raise ValueError("The prompt must be a non-empty 1-D list of token ids.")
        if prompt_cache is None:
            prompt_cache = cache_module.make_prompt_cache(self.model)
        if len(prompt_cache) != len(self.model.layers):
            raise ValueError(
                f"The prompt cache has {len(prompt_cache)} layers but the model has "
                f"{len(self.model.layers)}: it was made for another model."
            )
        if not cache_module.can_batch(prompt_cache):
            kinds = sorted({type(c).__name__ for c in prompt_cache})
            raise ValueError(
                f"This cache ({', '.join(kinds)}) cannot be batched: continuous batching takes "
                "KVCache and TurboQuantKVCache layers only. Drop --max-kv-size / --kv-bits, "
                "or generate one request at a time (generate_step)."
            )
        seq = _Sequence(
            sampler=sampler,
            processors=list(logits_processors or []),
            history=prompt if logits_processors else None,
            key=None if seed is None else mx.random.key(seed),
        )
        with mx.stream(generation_stream):
            processed, total = 0, prompt.size
            while total - processed > 1:
                n = min(self.prefill_step_size, total - processed - 1)
                self.model(prompt[processed : processed + n][None], cache=prompt_cache)
                mx.eval([c.state for c in prompt_cache])
                processed += n
                mx.clear_cache()
            logits = self.model(prompt[processed:][None], cache=prompt_cache)[:, -1, :]
            token, logprobs = self._sample(seq, logits)
            merged = cache_module.merge_caches([prompt_cache])
            if self._cache is None:
                self._cache = merged
            else:
                for running, new in zip(self._cache, merged):
                    running.extend(new)
            mx.eval(token, logprobs, [c.state for c in self._cache])
        uid = self._next_uid
        self._next_uid += 1
        seq.next_token = token.item()
        self._seqs[uid] = seq
        self._uids.append(uid)
        return BatchResponse(uid, seq.next_token, logprobs[0])

    def _sample(self, seq: _Sequence, logits: mx.array):
        """(token [1], logprobs [1, V]) of one sequence's logits [1, V]."""
        for processor in seq.processors:
            logits = processor(seq.history, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if seq.sampler is None:
            token = mx.argmax(logprobs, axis=-1)
        elif seq.key is not None:
            seq.key, key = mx.random.split(seq.key)
            token = seq.sampler(logprobs, key=key)
        else:
            token = seq.sampler(logprobs)
        if seq.processors:
            seq.history = mx.concatenate([seq.history, token.reshape(-1)])
        return token.reshape(-1), logprobs

    def step(self) -> List[BatchResponse]:
        """One decode step of every sequence: the next token of each, in batch order."""
        if not self._uids:
            return []
        seqs = [self._seqs[u] for u in self._uids]
        with mx.stream(generation_stream):
            inputs = mx.array([[s.next_token] for s in seqs], dtype=mx.uint32)
            logits = self.model(inputs, cache=self._cache)[:, -1, :]
            # Greedy rows without logits processors share one argmax over the batch;
            # the others are sampled row by row (own sampler, processors, PRNG key).
            plain = [s.sampler is None and not s.processors for s in seqs]
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            greedy = mx.argmax(logprobs, axis=-1)
            if all(plain):
                tokens, rows = greedy, [logprobs[i : i + 1] for i in range(len(seqs))]
            else:
                pairs = [
                    (
                        (greedy[i : i + 1], logprobs[i : i + 1])
                        if plain[i]
                        else self._sample(s, logits[i : i + 1])
                    )
                    for i, s in enumerate(seqs)
                ]
                tokens = mx.concatenate([p[0] for p in pairs])
                rows = [p[1] for p in pairs]
            mx.eval(tokens, rows)
        self._steps += 1
        if self._steps % 256 == 0:
            mx.clear_cache()  # as generate_step: return freed buffers now and then
        out = []
        for uid, seq, token, row in zip(self._uids, seqs, tokens.tolist(), rows):
            seq.next_token = token
            out.append(BatchResponse(uid, token, row[0]))
        return out

    def remove(self, uid: int) -> List[Any]:
        """Take sequence `uid` out of the batch; returns its per-request cache (prompt and
        every token fed so far; the last sampled token is not in it yet)."""
        if uid not in self._seqs:
            raise ValueError(f"No sequence {uid} in this batch (have {self._uids}).")
        i = self._uids.index(uid)
        cache = [c.extract(i) for c in self._cache]
        keep = [j for j in range(len(self._uids)) if j != i]
        if keep:
            for c in self._cache:
                c.filter(keep)
        else:
            self._cache = None
        del self._seqs[uid]
        self._uids.pop(i)
        return cache


# ----------------------------------------------------------------------------
# Command line


def str2bool(value: str) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got '{value}'")


def _non_negative_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got '{value}'") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _positive_int(value: str) -> int:
    n = _non_negative_int(value)
    if n == 0:
        raise argparse.ArgumentTypeError("must be > 0, got 0")
    return n


def add_model_args(parser: argparse.ArgumentParser):
    """Flags shared by generate, chat and cache_prompt."""
    parser.add_argument(
        "--model",
        type=str,
        default=None,
        help="A model directory, a .gguf file or a Hugging Face repo id.",
    )
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="Dequantize weights to float32 at load time (much faster on the CPU backend).",
    )
    parser.add_argument(
        "--chat-template-config",
        type=str,
        default=None,
        help="JSON dict of extra arguments for the chat template.",
    )


def add_kv_args(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--max-kv-size",
        type=_positive_int,
        default=None,
        help="Bound the KV cache to this many tokens (a rotating cache).",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=[2, 3, 4, 5, 6, 8],
        default=None,
        help="Affine-quantize the KV cache to this many bits (upstream's method).",
    )
    parser.add_argument(
        "--kv-group-size",
        type=int,
        choices=[32, 64, 128],
        default=64,
        help="Group size for --kv-bits.",
    )
    parser.add_argument(
        "--quantized-kv-start",
        type=_non_negative_int,
        default=DEFAULT_QUANTIZED_KV_START,
        help="Start quantizing the KV cache (--kv-bits) after this many tokens.",
    )
    parser.add_argument(
        "--turbo-kv-bits",
        type=_turbo_bits("--turbo-kv-bits", (2, 3, 4)),
        default=None,
        help="Compress the KV cache with TurboQuant at this many bits (2, 3 or 4).",
    )
    parser.add_argument(
        "--turbo-fp16-layers",
        type=_non_negative_int,
        default=0,
        help="With TurboQuant, keep the first and last N attention layers in FP16.",
    )
    parser.add_argument(
        "--turbo-key-bits",
        type=_turbo_bits("--turbo-key-bits", tuple(range(1, 9))),
        default=None,
        help="TurboQuant bits for keys (1-8; overrides --turbo-kv-bits).",
    )
    parser.add_argument(
        "--turbo-value-bits",
        type=_turbo_bits("--turbo-value-bits", tuple(range(1, 9))),
        default=None,
        help="TurboQuant bits for values (1-8; overrides --turbo-kv-bits).",
    )
    parser.add_argument(
        "--turbo-no-key-centering",
        dest="turbo_key_centering",
        action="store_false",
        help="Quantize TurboQuant keys as they are, not as residuals from the causal "
        "running key mean (plain TurboQuant_mse; for comparisons).",
    )
    parser.add_argument(
        "--turbo-no-key-scaling",
        dest="turbo_key_scaling",
        action="store_false",
        default=None,
        help="Do not scale TurboQuant keys per channel before quantizing (on by default "
        "with key centering: scales from earlier keys' spread, folded into the query).",
    )
    parser.add_argument(
        "--turbo-fp16-window",
        type=_non_negative_int,
        default=None,
        help="Keep the newest N to 2N tokens' keys and values in FP16, coding all but the "
        "newest N once more than 2N are uncoded (KIVI-style; default 64, 0 turns it off).",
    )


def _turbo_bits(flag: str, choices):
    def parse(value: str) -> int:
        try:
            bits = int(value)
        except ValueError:
            bits = None
        if bits not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid value '{value}': choose one of {', '.join(map(str, choices))}"
            )
        return bits

    return parse


def check_kv_flags(parser, args):
    """Flag combinations that cannot work, as one-line usage errors."""
    turbo = any(
        getattr(args, k) is not None
        for k in ("turbo_kv_bits", "turbo_key_bits", "turbo_value_bits")
    )
    if args.kv_bits is not None and turbo:
        parser.error("--kv-bits and --turbo-kv-bits are two KV compressions; use one of them.")
    if args.kv_bits is not None and args.max_kv_size is not None:
        parser.error(
            "--kv-bits cannot be combined with --max-kv-size (a rotating cache cannot be "
            "affine-quantized). Use one of them."
        )
    if (
        turbo
        and args.turbo_kv_bits is None
        and None in (args.turbo_key_bits, args.turbo_value_bits)
    ):
        parser.error("Give --turbo-kv-bits, or both --turbo-key-bits and --turbo-value-bits.")
    if args.turbo_fp16_layers and not turbo:
        parser.error("--turbo-fp16-layers needs --turbo-kv-bits.")
    if args.turbo_fp16_window is not None and not turbo:
        parser.error("--turbo-fp16-window needs --turbo-kv-bits.")


def turbo_kwargs(args) -> dict:
    return dict(
        turbo_kv_bits=args.turbo_kv_bits,
        turbo_fp16_layers=args.turbo_fp16_layers,
        turbo_key_bits=args.turbo_key_bits,
        turbo_value_bits=args.turbo_value_bits,
        turbo_key_centering=args.turbo_key_centering,
        turbo_key_scaling=args.turbo_key_scaling,
        turbo_fp16_window=args.turbo_fp16_window,
    )


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="Generate text with an LLM.")
    add_model_args(parser)
    parser.add_argument(
        "--prompt",
        "-p",
        default=DEFAULT_PROMPT,
        help="Message for the model ('-' reads it from stdin).",
    )
    parser.add_argument(
        "--system-prompt", default=None, help="System prompt for the chat template."
    )
    parser.add_argument(
        "--max-tokens",
        "-m",
        type=_non_negative_int,
        default=DEFAULT_MAX_TOKENS,
        help="Maximum number of tokens to generate.",
    )
    parser.add_argument("--temp", type=float, default=DEFAULT_TEMP, help="Sampling temperature.")
    parser.add_argument(
        "--top-p", type=float, default=DEFAULT_TOP_P, help="Nucleus sampling top-p."
    )
    parser.add_argument("--min-p", type=float, default=DEFAULT_MIN_P, help="Min-p sampling.")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help="Top-k sampling.")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="PRNG seed.")
    parser.add_argument(
        "--ignore-chat-template",
        action="store_true",
        help="Feed the prompt to the model as it is, without the chat template.",
    )
    parser.add_argument(
        "--extra-eos-token",
        type=str,
        nargs="+",
        default=(),
        help="Additional tokens that end generation.",
    )
    add_kv_args(parser)
    parser.add_argument(
        "--prompt-cache-file",
        type=str,
        default=None,
        help="A prompt cache saved by mlx_lm.cache_prompt: its prompt is prepended to --prompt.",
    )
    parser.add_argument(
        "--prefill-step-size", type=_positive_int, default=2048, help="Prefill chunk size."
    )
    parser.add_argument(
        "--verbose",
        type=str2bool,
        default=True,
        help="Print the text as it streams and the timing stats (True/False).",
    )
    return parser


def apply_chat_template(tokenizer, messages, chat_template_config=None, **kwargs) -> str:
    return tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=True,
        **(chat_template_config or {}),
        **kwargs,
    )


def build_messages(prompt: str, system_prompt: Optional[str]) -> List[dict]:
    messages = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": prompt})
    return messages


def fail(message: str, code: int = 2):
    """End the command with a one-line error (no traceback)."""
    print(f"Error: {message}", file=sys.stderr)
    sys.exit(code)


def load_cli_model(args):
    from .utils import load

    try:
        return load(args.model, dequantize=args.dequantize, return_config=True)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))


def check_prompt_cache_compatible(metadata: dict, config: dict, prompt_cache, model, path: str):
    """A cache file names the model it was made for; refuse one made for another."""
    want = model_fingerprint(config, model)
    have = metadata.get("model_fingerprint")
    if len(prompt_cache) != len(model.layers) or (have is not None and have != want):
        fail(
            f"The prompt cache '{path}' was made for another model "
            f"({metadata.get('model', 'unknown')}, {have or len(prompt_cache)}) and cannot be used "
            f"with {config.get('model_path')} ({want}). Rebuild it with mlx_lm.cache_prompt."
        )


def model_fingerprint(config: dict, model) -> str:
    """What a prompt cache depends on: architecture and attention shapes."""
    layer = model.layers[0]
    attn = getattr(layer, "self_attn", None)
    n_kv = getattr(attn, "n_kv_heads", None)
    head_dim = getattr(attn, "head_dim", None)
    return (
        f"{config.get('model_type')}:layers={len(model.layers)}:"
        f"hidden={config.get('hidden_size')}:kv_heads={n_kv}:head_dim={head_dim}:"
        f"vocab={config.get('vocab_size')}"
    )


def report_cache(prompt_cache):
    """One line on what the KV cache is, when it is compressed."""
    from collections import Counter

    from .models.turboquant_cache import TurboQuantCodec

    turbo = [c for c in prompt_cache if isinstance(c, TurboQuantCodec)]
    if turbo:
        others = Counter(type(c).__name__ for c in prompt_cache if c not in turbo)
        rest = ", ".join(f"{n} {k}" for k, n in others.items())
        print(
            f"[turboquant] {len(turbo)} of {len(prompt_cache)} layers compressed "
            f"(keys {turbo[0].key_bits}-bit, values {turbo[0].value_bits}-bit)"
            + (f"; {rest}" if rest else ""),
            file=sys.stderr,
        )


def main(argv: Optional[List[str]] = None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)

    if args.model is None and args.prompt_cache_file is None:
        parser.error("--model is required (a model directory, a .gguf file or a hub id).")
    check_kv_flags(parser, args)
    if args.prompt_cache_file is not None and args.max_kv_size is not None:
        parser.error(
            "--max-kv-size cannot be combined with --prompt-cache-file: the cache file already "
            "fixes the cache type. Drop --max-kv-size."
        )
    if args.temp < 0:
        parser.error(f"--temp must be >= 0 (got {args.temp}).")
    if not 0.0 <= args.top_p <= 1.0:
        parser.error(f"--top-p must be in [0, 1] (got {args.top_p}).")
    if args.top_k < 0:
        parser.error(f"--top-k must be >= 0 (got {args.top_k}).")

    if args.seed is not None:
        mx.random.seed(args.seed)

    prompt_cache, metadata = None, {}
    if args.prompt_cache_file is not None:
        try:
            prompt_cache, metadata = cache_module.load_prompt_cache(
                args.prompt_cache_file, return_metadata=True
            )
        except (OSError, ValueError, RuntimeError) as e:
            fail(f"Could not read the prompt cache '{args.prompt_cache_file}': {e}")
        if args.model is None:
            args.model = metadata.get("model")

    model, tokenizer, config = load_cli_model(args)
    for token in args.extra_eos_token:
        tokenizer.add_eos_token(token)

    if prompt_cache is not None:
        check_prompt_cache_compatible(metadata, config, prompt_cache, model, args.prompt_cache_file)

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    template_config = None
    if args.chat_template_config is not None:
        import json

        template_config = json.loads(args.chat_template_config)

    use_template = not args.ignore_chat_template and tokenizer.has_chat_template
    cached_text = metadata.get("prompt_text", "")
    if use_template:
        user_prefix = metadata.get("user_prefix", "")
        system_prompt = metadata.get("system_prompt") or args.system_prompt
        messages = build_messages(user_prefix + prompt, system_prompt)
        full = apply_chat_template(tokenizer, messages, template_config)
    else:
        full = metadata.get("user_prefix", "") + prompt
    if prompt_cache is not None:
        if not full.startswith(cached_text):
            fail(
                "The prompt cache's text is not a prefix of this prompt (different chat "
                "template flags?). Rebuild it with the same --ignore-chat-template setting."
            )
        tokens = tokenizer.encode(full[len(cached_text) :], add_special_tokens=False)
    else:
        tokens = _encode_prompt(tokenizer, full).tolist()
    if len(tokens) == 0:
        fail("The prompt is empty after the cached prefix; give a --prompt.")

    sampler = make_sampler(args.temp, args.top_p, args.min_p, top_k=args.top_k)
    try:
        if prompt_cache is None:
            prompt_cache = cache_module.make_prompt_cache(
                model, max_kv_size=args.max_kv_size, **turbo_kwargs(args)
            )
        elif args.turbo_kv_bits or args.turbo_key_bits or args.turbo_value_bits:
            from .models.turboquant_cache import to_turbo_quantized_cache

            prompt_cache = to_turbo_quantized_cache(prompt_cache, model, **turbo_kwargs(args))
    except ValueError as e:
        fail(str(e))
    if args.verbose:
        report_cache(prompt_cache)
    try:
        text = generate(
            model,
            tokenizer,
            tokens,
            verbose=args.verbose,
            max_tokens=args.max_tokens,
            sampler=sampler,
            prompt_cache=prompt_cache,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
            prefill_step_size=args.prefill_step_size,
        )
    except ValueError as e:  # e.g. --kv-group-size not dividing the cache's widths
        fail(str(e))
    if not args.verbose:
        print(text)


if __name__ == "__main__":
    main()
