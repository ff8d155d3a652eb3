"""An OpenAI-compatible HTTP server: `mlx_lm.server --model M [--turbo-kv-bits 3]`.

Endpoints: POST /v1/chat/completions, POST /v1/completions (plain JSON or SSE streams
ending in `data: [DONE]`), GET /v1/models, GET /health.

Built on the standard library's `ThreadingHTTPServer` (no new dependency): one thread
per connection parses and validates requests and writes responses, while one generation
worker owns the model and the tokenizer. The worker is the main thread, the one that
loaded the model: MLX streams belong to a thread, and arrays made on one cannot be
evaluated on another. Requests wait in a FIFO queue for the worker.

Continuous batching (`--max-batch-size`, default 8): between decode steps the worker
takes queued requests, prefills each alone on its own prompt cache (so prompt-cache
reuse stays per request), merges that cache into the running batch (`BatchKVCache` /
`BatchTurboQuantKVCache`: left-padded, per-sequence offsets, TurboQuant key-mean
segments, key scales and FP16 windows) and decodes every request in one forward pass per token. A request leaves the
batch when it ends, fails or its client disconnects; its cache is extracted back into a
per-request cache for the store. Each request keeps its own sampler, stop strings,
logprobs and PRNG key (a seeded request samples the same tokens whatever it is batched
with). Caches that cannot be merged (`--max-kv-size` and sliding-window layers,
`--kv-bits`, recurrent layers) are served one request at a time, as with
`--max-batch-size 1`.

Prompt caches of recent conversations are kept in an LRU bounded by count and by the
caches' true `nbytes`; a request reuses the longest common token prefix of a stored
conversation on a deep copy of its cache, trimmed to that prefix, so two live requests
never share a mutable cache.
"""

import argparse
import copy
import json
import math
import queue
import re
import sys
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx

from .generate import (
    DEFAULT_MAX_BATCH_SIZE,
    BatchGenerator,
    _encode_prompt,
    add_kv_args,
    add_model_args,
    check_kv_flags,
    fail,
    load_cli_model,
    stream_generate,
    turbo_kwargs,
)
from .models import cache as cache_module
from .sample_utils import make_logits_processors, make_sampler

DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_CONTEXT = 8192
MAX_BODY_BYTES = 16 * 1024 * 1024
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
ROLES = {"system", "user", "assistant", "developer"}


class RequestError(Exception):
    """A request the server refuses: becomes an OpenAI-style error body."""

    def __init__(self, message, param=None, code=None, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = (
            message,
            param,
            code,
            status,
            kind,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def parse_bytes(value: str) -> int:
    """'256MB', '1.5GiB', '1000000' -> bytes (decimal units, binary with an 'i')."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(value).lower())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"invalid size '{value}': give bytes or a size such as 512MB or 2GiB"
        )
    base = 1024 if m.group(3) else 1000
    n = float(m.group(1)) * base ** " kmgt".index(m.group(2) or " ")
    return int(n)


# ----------------------------------------------------------------------------
# Prompt-cache store


@dataclass
class _CacheEntry:
    tokens: List[int]
    cache: List[Any]
    nbytes: int


def _common_prefix(a: List[int], b: List[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCacheStore:
    """LRU of (tokens, prompt cache) pairs bounded by count and by total `nbytes`.

    Only the generation worker touches it; the lock makes `stats()` safe from the HTTP
    threads.
    """

    def __init__(self, max_entries: int = 10, max_bytes: Optional[int] = None):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: "OrderedDict[int, _CacheEntry]" = OrderedDict()
        self._next_id = 0
        self._lock = threading.Lock()

    def __len__(self):
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict:
        with self._lock:
            return {
                "entries": len(self._entries),
                "bytes": self.nbytes,
                "tokens": [len(e.tokens) for e in self._entries.values()],
            }

    def fetch(self, tokens: List[int]) -> Tuple[Optional[List[Any]], int]:
        """A private copy of the cache sharing the longest prefix with `tokens`, trimmed
        to that prefix, and the prefix length. At least one token is always left to
        process (the model must see a token to produce logits).

        A cache's contents depend only on its tokens, not on how they were chunked
        (TurboQuant's key means are causal, see `TurboQuantCodec`), so a reused prefix
        answers exactly like a fresh computation."""
        with self._lock:
            best_id, best = None, 0
            for key, entry in self._entries.items():
                n = _common_prefix(entry.tokens, tokens)
                if n > best:
                    best_id, best = key, n
            if best_id is None:
                return None, 0
            entry = self._entries[best_id]
            reuse = min(best, len(tokens) - 1)
            if reuse <= 0:
                return None, 0
            extra = len(entry.tokens) - reuse
            if extra > 0 and not cache_module.can_trim_prompt_cache(entry.cache):
                return None, 0
            self._entries.move_to_end(best_id)
            cache = copy.deepcopy(entry.cache)
        if extra > 0:
            cache_module.trim_prompt_cache(cache, extra)
        return cache, reuse

    def insert(self, tokens: List[int], cache: List[Any]):
        nbytes = sum(c.nbytes for c in cache)
        with self._lock:
            # A stored conversation that this one extends is superseded by it.
            for key in [
                k
                for k, e in self._entries.items()
                if len(e.tokens) <= len(tokens) and tokens[: len(e.tokens)] == e.tokens
            ]:
                del self._entries[key]
            if self.max_entries <= 0 or (self.max_bytes is not None and nbytes > self.max_bytes):
                return
            self._entries[self._next_id] = _CacheEntry(list(tokens), cache, nbytes)
            self._next_id += 1
            while len(self._entries) > self.max_entries or (
                self.max_bytes is not None and self.nbytes > self.max_bytes
            ):
                self._entries.popitem(last=False)


# ----------------------------------------------------------------------------
# Request validation (HTTP threads)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _number(body, name, default, low, high):
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise RequestError(f"'{name}' must be a number, got {v!r}.", name, "invalid_type")
    if not low <= v <= high:
        raise RequestError(f"'{name}' must be in [{low}, {high}], got {v}.", name, "invalid_value")
    return float(v)


def _integer(body, name, default, low, high):
    v = body.get(name)
    if v is None:
        return default
    if not _is_int(v):
        raise RequestError(f"'{name}' must be an integer, got {v!r}.", name, "invalid_type")
    if not low <= v <= high:
        raise RequestError(f"'{name}' must be in [{low}, {high}], got {v}.", name, "invalid_value")
    return v


def _boolean(body, name, default=False):
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise RequestError(f"'{name}' must be true or false, got {v!r}.", name, "invalid_type")
    return v


def _message_text(content, i) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise RequestError(
                    f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}}; "
                    "only text is supported.",
                    f"messages[{i}].content",
                    "invalid_type",
                )
            if not isinstance(part.get("text"), str):
                raise RequestError(
                    f"messages[{i}].content[].text must be a string.",
                    f"messages[{i}].content",
                    "invalid_type",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(
        f"messages[{i}].content must be a string or a list of text parts, got {content!r}.",
        f"messages[{i}].content",
        "invalid_type",
    )


def validate_messages(messages) -> List[Dict[str, str]]:
    if messages is None:
        raise RequestError("'messages' is required.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise RequestError("'messages' must be a list of messages.", "messages", "invalid_type")
    if not messages:
        raise RequestError("'messages' is empty: give at least one message.", "messages", "empty")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(
                f"messages[{i}] must be an object.", f"messages[{i}]", "invalid_type"
            )
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(
                f"messages[{i}].role {role!r} is not supported; use system, user or assistant.",
                f"messages[{i}].role",
                "invalid_value",
            )
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        out.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _message_text(content, i),
            }
        )
    return out


def validate_prompt(prompt, vocab_size: int):
    """A completion prompt: a string, a list of token ids, or a one-string list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("'prompt' is empty.", "prompt", "empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        if any(not 0 <= t < vocab_size for t in prompt):
            raise RequestError(
                f"'prompt' token ids must be in [0, {vocab_size}).", "prompt", "invalid_value"
            )
        return list(prompt)
    if prompt is None:
        raise RequestError("'prompt' is required.", "prompt", "missing_required_parameter")
    raise RequestError(
        "'prompt' must be a non-empty string or a list of token ids (one prompt; batches of "
        "prompts are not supported).",
        "prompt",
        "invalid_type",
    )


@dataclass
class GenerationRequest:
    """A validated request, handed from an HTTP thread to the generation worker."""

    kind: str  # "chat" or "text"
    messages: Optional[List[Dict[str, str]]]
    prompt: Any
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: Optional[int]
    stop: List[str]
    repetition_penalty: Optional[float]
    logit_bias: Optional[Dict[int, float]]
    logprobs: bool
    top_logprobs: int
    stream: bool
    include_usage: bool
    events: "queue.Queue" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def parse_request(body: dict, kind: str, server: "ModelServer") -> GenerationRequest:
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.", None, "invalid_type")
    model = body.get("model")
    if model is not None and model not in server.model_names:
        raise RequestError(
            f"The model '{model}' does not exist; this server serves "
            f"{sorted(server.model_names)}.",
            "model",
            "model_not_found",
            status=404,
        )
    limit = server.max_context
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        max_tokens = _integer(body, "max_completion_tokens", DEFAULT_MAX_TOKENS, 1, limit)
    else:
        max_tokens = _integer(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, limit)
    n = _integer(body, "n", 1, 1, 1 << 30)
    if n != 1:
        raise RequestError("Only n=1 is supported.", "n", "invalid_value")

    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(
            "'stop' must be a non-empty string or a list of non-empty strings.",
            "stop",
            "invalid_type",
        )
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError(
            f"At most {MAX_STOP_STRINGS} stop strings are supported.", "stop", "invalid_value"
        )

    logit_bias = body.get("logit_bias")
    if logit_bias is not None:
        if not isinstance(logit_bias, dict):
            raise RequestError(
                "'logit_bias' must map token ids to biases.", "logit_bias", "invalid_type"
            )
        parsed = {}
        for k, v in logit_bias.items():
            try:
                tid = int(k)
            except ValueError:
                raise RequestError(
                    f"logit_bias key {k!r} is not a token id.", "logit_bias", "invalid_value"
                ) from None
            if not 0 <= tid < server.vocab_size:
                raise RequestError(
                    f"logit_bias token {tid} is outside the vocabulary [0, {server.vocab_size}).",
                    "logit_bias",
                    "invalid_value",
                )
            if not _is_number(v) or not -100 <= v <= 100:
                raise RequestError(
                    f"logit_bias[{k}] must be a number in [-100, 100], got {v!r}.",
                    "logit_bias",
                    "invalid_value",
                )
            parsed[tid] = float(v)
        logit_bias = parsed or None

    if kind == "chat":
        logprobs = _boolean(body, "logprobs")
        top_logprobs = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
        if top_logprobs and not logprobs:
            raise RequestError(
                "'top_logprobs' needs 'logprobs': true.", "top_logprobs", "invalid_value"
            )
        messages, prompt = validate_messages(body.get("messages")), None
    else:
        # The legacy completions API: logprobs is the number of top alternatives.
        top = _integer(body, "logprobs", None, 0, MAX_TOP_LOGPROBS)
        logprobs, top_logprobs = top is not None, top or 0
        messages, prompt = None, validate_prompt(body.get("prompt"), server.vocab_size)

    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object.", "stream_options", "invalid_type")
    include_usage = _boolean(options or {}, "include_usage")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise RequestError(f"'seed' must be an integer, got {seed!r}.", "seed", "invalid_type")
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    penalty = _number(body, "repetition_penalty", None, 0.0, 100.0)
    if penalty is not None and penalty <= 0:
        raise RequestError(
            "'repetition_penalty' must be > 0.", "repetition_penalty", "invalid_value"
        )
    return GenerationRequest(
        kind=kind,
        messages=messages,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 0.0, 2.0),
        top_p=top_p,
        top_k=_integer(body, "top_k", 0, 0, 1 << 30),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        seed=None if seed is None else seed % (1 << 63),
        stop=stop,
        repetition_penalty=penalty,
        logit_bias=logit_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        stream=stream,
        include_usage=include_usage,
    )


# ----------------------------------------------------------------------------
# Generation worker


def _stop_hold(text: str, stops: List[str]) -> int:
    """Length of the longest tail of `text` that could still grow into a stop string."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), hold, -1):
            if s.startswith(text[-k:]):
                hold = k
                break
    return hold


class _TextStream:
    """One request's output: text pieces in, deltas (stop strings cut, never emitted;
    text that may grow into a stop string held back) and logprob entries out."""

    def __init__(self, request: "GenerationRequest", server: "ModelServer"):
        self.request, self.server = request, server
        self.text, self.sent, self.pending = "", 0, []
        self.max_stop = max((len(s) for s in request.stop), default=0)
        self.finish_reason = None

    def push(self, piece: str, token: int, logprobs: mx.array, finish_reason=None):
        """Add one token's text (`finish_reason` "stop" for EOS, "length" for the last
        token); returns the finish reason once the request is done, else None."""
        request, stops = self.request, self.request.stop
        if request.logprobs and finish_reason != "stop":
            self.pending.append(self.server._token_logprobs(token, logprobs, request.top_logprobs))
        self.text += piece
        text, cut = self.text, len(self.text)
        if stops:
            since = max(0, self.sent - self.max_stop)
            hits = [p for p in (text.find(s, since) for s in stops) if p >= 0]
            if hits:
                cut, self.finish_reason = min(hits), "stop"
            elif finish_reason is None:
                cut = len(text) - _stop_hold(text, stops)
        if cut > self.sent or self.pending:
            request.events.put(("delta", text[self.sent : cut], self.pending))
            self.sent, self.pending = max(self.sent, cut), []
        if self.finish_reason is None:
            self.finish_reason = finish_reason
        return self.finish_reason


@dataclass
class _Slot:
    """A request being decoded in the continuous batch."""

    request: "GenerationRequest"
    tokens: List[int]
    cached: int
    max_tokens: int
    out: _TextStream
    detokenizer: Any
    generated: List[int] = field(default_factory=list)

    def feed(self, token: int, logprobs: mx.array, eos) -> Optional[str]:
        """One generated token, with `stream_generate`'s rules: EOS ends the request
        ("stop", its text not emitted), the max_tokens-th token ends it ("length")."""
        self.generated.append(token)
        finish = None
        if token in eos:
            finish = "stop"
        else:
            self.detokenizer.add_token(token)
            if len(self.generated) == self.max_tokens:
                finish = "length"
        if finish is not None:
            self.detokenizer.finalize()
        return self.out.push(self.detokenizer.last_segment, token, logprobs, finish)


class ModelServer:
    """The model, its tokenizer, the prompt-cache store and the worker that owns them."""

    def __init__(self, model, tokenizer, config: dict, args):
        self.model, self.tokenizer, self.args = model, tokenizer, args
        self.model_id = args.alias or args.model
        self.model_names = {args.model} | ({args.alias} if args.alias else set())
        self.vocab_size = int(config.get("vocab_size") or len(tokenizer))
        self.max_context = args.max_context or int(
            config.get("max_position_embeddings") or DEFAULT_MAX_CONTEXT
        )
        self.created = int(time.time())
        self.prompt_cache = PromptCacheStore(args.prompt_cache_size, args.prompt_cache_bytes)
        self.requests: "queue.Queue[Optional[GenerationRequest]]" = queue.Queue()
        self.active = 0  # requests queued or running
        self._active_lock = threading.Lock()
        # Continuous batching needs caches that can be merged: plain KVCache and
        # TurboQuantKVCache layers. Rotating (--max-kv-size, sliding windows), affine
        # (--kv-bits, quantized after --quantized-kv-start) and recurrent caches are
        # served one request at a time.
        max_batch = getattr(args, "max_batch_size", DEFAULT_MAX_BATCH_SIZE)
        self.max_batch_size = max_batch if self._batchable() else 1
        self.batching = self.max_batch_size > 1
        self.peak_batch = 0  # most requests decoded together so far

    def _batchable(self) -> bool:
        if self.args.kv_bits is not None or self.args.max_kv_size is not None:
            return False
        return cache_module.can_batch(self._new_cache())

    # -- called from HTTP threads --

    def submit(self, request: GenerationRequest):
        with self._active_lock:
            self.active += 1
        self.requests.put(request)

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": self.model_id,
            "active_requests": self.active,
            "max_batch_size": self.max_batch_size,
            "peak_batch": self.peak_batch,
            "prompt_cache": self.prompt_cache.stats(),
        }

    # -- the worker thread --

    def _done(self):
        with self._active_lock:
            self.active -= 1

    @staticmethod
    def _fail(request: "GenerationRequest", e: Exception):
        if not isinstance(e, RequestError):
            e = RequestError(f"Generation failed: {e}", None, None, 500, "server_error")
        request.events.put(("error", e))

    def run(self):
        """The generation loop. Run it on the thread that loaded the model: MLX streams
        belong to a thread, and arrays made on one cannot be evaluated on another."""
        if self.batching:
            return self._run_batched()
        while True:
            request = self.requests.get()
            if request is None:
                return
            try:
                if not request.cancelled.is_set():
                    self.peak_batch = 1
                    self._generate(request)
            except Exception as e:  # never let one request kill the worker
                self._fail(request, e)
            finally:
                self._done()

    def _run_batched(self):
        """Continuous batching: between decode steps, queued requests are prefilled (each
        alone, on its own prompt cache) and join the batch; finished, failed and
        disconnected ones leave it, their caches going to the prompt-cache store."""
        gen = BatchGenerator(self.model, self.max_batch_size, self.args.prefill_step_size)
        slots: Dict[int, _Slot] = {}
        eos = self.tokenizer.eos_token_ids
        while True:
            while len(gen) < self.max_batch_size:
                try:
                    request = self.requests.get(block=len(gen) == 0)
                except queue.Empty:
                    break
                if request is None:
                    return
                try:
                    if request.cancelled.is_set():
                        self._done()
                        continue
                    self._admit(gen, slots, request, eos)
                except Exception as e:
                    self._fail(request, e)
                    self._done()
            if len(gen) == 0:
                continue
            self.peak_batch = max(self.peak_batch, len(gen))
            try:
                responses = gen.step()
            except Exception as e:  # the batch is lost: fail every request in it
                for uid, slot in slots.items():
                    self._fail(slot.request, e)
                    self._done()
                slots.clear()
                gen = BatchGenerator(self.model, self.max_batch_size, self.args.prefill_step_size)
                continue
            for r in responses:
                slot = slots.get(r.uid)
                if slot is None or slot.out.finish_reason is not None:
                    continue
                if not slot.request.cancelled.is_set():
                    try:
                        slot.feed(r.token, r.logprobs, eos)
                    except Exception as e:  # this request fails; the others go on
                        slot.request.cancelled.set()
                        self._fail(slot.request, e)
            for uid in list(slots):
                slot = slots[uid]
                if slot.out.finish_reason is not None or slot.request.cancelled.is_set():
                    self._finish(gen, slots.pop(uid), uid)

    def _prepare(self, request: "GenerationRequest"):
        """(prompt tokens, cache, cached tokens, completion limit) of a request."""
        tokens = self._tokenize(request)
        if len(tokens) == 0:
            raise RequestError("The prompt is empty after tokenization.", "prompt", "empty")
        if len(tokens) >= self.max_context:
            raise RequestError(
                f"The prompt has {len(tokens)} tokens but the context limit is "
                f"{self.max_context} (--max-context); shorten it.",
                "messages" if request.kind == "chat" else "prompt",
                "context_length_exceeded",
            )
        max_tokens = min(request.max_tokens, self.max_context - len(tokens))
        cache, cached = self.prompt_cache.fetch(tokens)
        if cache is None:
            cache = self._new_cache()
        return tokens, cache, cached, max_tokens

    def _admit(self, gen: BatchGenerator, slots: dict, request, eos):
        tokens, cache, cached, max_tokens = self._prepare(request)
        sampler = None  # greedy: one argmax for every greedy request of the batch
        if request.temperature > 0:
            sampler = make_sampler(
                request.temperature, request.top_p, request.min_p, top_k=request.top_k
            )
        processors = make_logits_processors(request.logit_bias, request.repetition_penalty)
        request.events.put(("start", {"prompt_tokens": len(tokens), "cached_tokens": cached}))
        first = gen.insert(tokens[cached:], cache, sampler, processors, seed=request.seed)
        slot = _Slot(
            request,
            tokens,
            cached,
            max_tokens,
            _TextStream(request, self),
            self.tokenizer.detokenizer,
        )
        try:
            slot.feed(first.token, first.logprobs, eos)
        except Exception:
            gen.remove(first.uid)
            raise
        slots[first.uid] = slot
        if slot.out.finish_reason is not None:
            self._finish(gen, slots.pop(first.uid), first.uid)

    def _finish(self, gen: BatchGenerator, slot: _Slot, uid: int):
        """Take a request out of the batch, keep its cache, send its end."""
        try:
            cache = gen.remove(uid)
            self._store(slot.tokens + slot.generated, cache)
            if not slot.request.cancelled.is_set():
                self._send_done(slot.request, slot.tokens, slot.generated, slot.cached, slot.out)
        except Exception as e:
            self._fail(slot.request, e)
        finally:
            self._done()

    @staticmethod
    def _send_done(request, tokens, generated, cached, out: _TextStream):
        usage = {
            "prompt_tokens": len(tokens),
            "completion_tokens": len(generated),
            "total_tokens": len(tokens) + len(generated),
            "prompt_tokens_details": {"cached_tokens": cached},
        }
        request.events.put(("done", out.finish_reason or "length", usage))

    def _new_cache(self) -> List[Any]:
        return cache_module.make_prompt_cache(
            self.model, max_kv_size=self.args.max_kv_size, **turbo_kwargs(self.args)
        )

    def _tokenize(self, request: GenerationRequest) -> List[int]:
        tok = self.tokenizer
        if request.kind == "chat":
            if tok.has_chat_template:
                template_config = {}
                if self.args.chat_template_config:
                    template_config = json.loads(self.args.chat_template_config)
                text = tok.apply_chat_template(
                    request.messages, tokenize=False, add_generation_prompt=True, **template_config
                )
            else:
                text = "".join(f"{m['role']}: {m['content']}\n" for m in request.messages)
                text += "assistant: "
            return _encode_prompt(tok, text).tolist()
        if isinstance(request.prompt, list):
            return list(request.prompt)
        return _encode_prompt(tok, request.prompt).tolist()

    def _token_logprobs(self, token: int, logprobs: mx.array, top: int) -> dict:
        tok = self.tokenizer
        entry = {"token": tok.decode([token]), "id": token, "logprob": logprobs[token].item()}
        if top:
            ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
            values = logprobs[ids]
            order = mx.argsort(-values)
            ids, values = ids[order].tolist(), values[order].tolist()
            entry["top_logprobs"] = [
                {"token": tok.decode([i]), "id": i, "logprob": v} for i, v in zip(ids, values)
            ]
        return entry

    def _generate(self, request: GenerationRequest):
        """One request alone (caches that cannot be batched), through `stream_generate`."""
        args = self.args
        tokens, cache, cached, max_tokens = self._prepare(request)
        if request.seed is not None:
            mx.random.seed(request.seed)
        sampler = make_sampler(
            request.temperature, request.top_p, request.min_p, top_k=request.top_k
        )
        processors = make_logits_processors(request.logit_bias, request.repetition_penalty)
        request.events.put(("start", {"prompt_tokens": len(tokens), "cached_tokens": cached}))

        generated: List[int] = []
        out = _TextStream(request, self)
        steps = stream_generate(
            self.model,
            self.tokenizer,
            mx.array(tokens[cached:], dtype=mx.uint32),
            max_tokens=max_tokens,
            sampler=sampler,
            logits_processors=processors,
            prompt_cache=cache,
            prefill_step_size=args.prefill_step_size,
            kv_bits=args.kv_bits,
            kv_group_size=args.kv_group_size,
            quantized_kv_start=args.quantized_kv_start,
        )
        cancelled = False
        try:
            for response in steps:
                if request.cancelled.is_set():
                    cancelled = True
                    break
                generated.append(response.token)
                if out.push(
                    response.text, response.token, response.logprobs, response.finish_reason
                ):
                    break
        finally:
            steps.close()
        # The cache holds the prompt and every token generated (generation runs a step
        # ahead); keep it for the next turn of this conversation.
        self._store(tokens + generated, cache)
        if not cancelled:
            self._send_done(request, tokens, generated, cached, out)

    def _store(self, tokens: List[int], cache: List[Any]):
        if self.prompt_cache.max_entries <= 0:
            return
        held = getattr(cache[0], "offset", None)
        if held is None:
            return
        if held > len(tokens):
            if not cache_module.can_trim_prompt_cache(cache):
                return
            cache_module.trim_prompt_cache(cache, held - len(tokens))
            held = len(tokens)
        mx.eval([c.state for c in cache])
        self.prompt_cache.insert(tokens[:held], cache)


# ----------------------------------------------------------------------------
# HTTP


def _chat_logprobs(entries: List[dict]) -> Optional[dict]:
    def item(e):
        d = {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode())}
        return d

    content = []
    for e in entries:
        d = item(e)
        d["top_logprobs"] = [item(t) for t in e.get("top_logprobs", [])]
        content.append(d)
    return {"content": content}


def _text_logprobs(entries: List[dict], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e["token"])
        lps.append(e["logprob"])
        top = {}
        for t in e.get("top_logprobs", []):  # most likely first: it wins a text collision
            top.setdefault(t["token"], t["logprob"])
        tops.append(top)
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "mlx_lm.server"
    app: ModelServer = None  # set by `make_server`

    def log_message(self, fmt, *args):
        if self.app.args.log_requests:
            super().log_message(fmt, *args)

    # -- plumbing --

    def _send_json(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, e: RequestError):
        self._send_json(e.status, e.body())

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise RequestError("A Content-Length header is required.", None, "invalid_request")
        length = int(length)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise RequestError(
                f"The body is {length} bytes; the limit is {MAX_BODY_BYTES}.", None, "too_large"
            )
        raw = self.rfile.read(length)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(f"The body is not valid JSON: {e}.", None, "invalid_json") from None

    # -- routes --

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        if path == "/health":
            self._send_json(200, self.app.health())
        elif path == "/v1/models":
            self._send_json(
                200,
                {
                    "object": "list",
                    "data": [
                        {
                            "id": self.app.model_id,
                            "object": "model",
                            "created": self.app.created,
                            "owned_by": "mlx_lm",
                        }
                    ],
                },
            )
        else:
            self._send_error(RequestError(f"No route {path}.", None, "not_found", 404))

    def do_POST(self):
        path = self.path.split("?")[0].rstrip("/")
        kinds = {"/v1/chat/completions": "chat", "/v1/completions": "text"}
        try:
            if path not in kinds:
                self.close_connection = True
                raise RequestError(f"No route {path}.", None, "not_found", 404)
            request = parse_request(self._read_json(), kinds[path], self.app)
        except RequestError as e:
            self._send_error(e)
            return
        self.app.submit(request)
        try:
            event = request.events.get()
            if event[0] == "error":
                self._send_error(event[1])
                return
            start = event[1]
            if request.stream:
                self._stream(request, start)
            else:
                self._complete(request, start)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError):
            # The client went away: stop its generation so the worker moves on.
            request.cancelled.set()
            self.close_connection = True

    def _ids(self, request):
        prefix = "chatcmpl" if request.kind == "chat" else "cmpl"
        obj = "chat.completion" if request.kind == "chat" else "text_completion"
        return f"{prefix}-{uuid.uuid4().hex}", obj

    def _complete(self, request: GenerationRequest, start: dict):
        text, entries = [], []
        while True:
            event = request.events.get()
            if event[0] == "delta":
                text.append(event[1])
                entries.extend(event[2])
            elif event[0] == "error":
                self._send_error(event[1])
                return
            else:
                _, finish_reason, usage = event
                break
        rid, obj = self._ids(request)
        text = "".join(text)
        if request.kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(entries) if request.logprobs else None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": _text_logprobs(entries, 0) if request.logprobs else None,
                "finish_reason": finish_reason,
            }
        self._send_json(
            200,
            {
                "id": rid,
                "object": obj,
                "created": int(time.time()),
                "model": self.app.model_id,
                "system_fingerprint": "mlx_lm",
                "choices": [choice],
                "usage": usage,
            },
        )

    def _stream(self, request: GenerationRequest, start: dict):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        # No Content-Length for a stream: the connection's end marks the body's end.
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        rid, obj = self._ids(request)
        obj = obj + ".chunk" if request.kind == "chat" else obj
        created = int(time.time())
        offset = 0

        def send(choices, usage=None, with_usage_field=True):
            chunk = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": self.app.model_id,
                "system_fingerprint": "mlx_lm",
                "choices": choices,
            }
            if request.include_usage and with_usage_field:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        def choice(text, entries, finish_reason=None):
            nonlocal offset
            if request.kind == "chat":
                c = {"index": 0, "delta": {"content": text} if text or entries else {}}
                if request.logprobs:
                    c["logprobs"] = _chat_logprobs(entries) if entries else None
            else:
                c = {"index": 0, "text": text}
                if request.logprobs:
                    c["logprobs"] = _text_logprobs(entries, offset) if entries else None
                offset += len(text)
            c["finish_reason"] = finish_reason
            return c

        if request.kind == "chat":
            send(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
            )
        while True:
            event = request.events.get()
            if event[0] == "delta":
                send([choice(event[1], event[2])])
            elif event[0] == "error":
                # Headers are sent: report the error in the stream and end it.
                self.wfile.write(f"data: {json.dumps(event[1].body())}\n\n".encode())
                break
            else:
                _, finish_reason, usage = event
                send([choice("", [], finish_reason)])
                if request.include_usage:
                    send([], usage)
                break
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def make_server(app: ModelServer, host: str, port: int) -> ThreadingHTTPServer:
    handler = type("BoundHandler", (Handler,), {"app": app})
    httpd = ThreadingHTTPServer((host, port), handler)
    httpd.daemon_threads = True
    return httpd


def setup_arg_parser():
    parser = argparse.ArgumentParser(description="An OpenAI-compatible server for MLX models.")
    add_model_args(parser)
    add_kv_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on.")
    parser.add_argument("--port", type=int, default=8080, help="Port to listen on (0: any free).")
    parser.add_argument(
        "--alias", default=None, help="Another name clients may give as the request's model."
    )
    parser.add_argument(
        "--prompt-cache-size",
        type=int,
        default=10,
        help="Conversations whose KV caches are kept for reuse (0 disables reuse).",
    )
    parser.add_argument(
        "--prompt-cache-bytes",
        type=parse_bytes,
        default=None,
        help="Bound on the kept caches' total size, e.g. 256MB or 2GiB (default: no bound).",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="Longest prompt plus completion, in tokens (default: the model's "
        f"max_position_embeddings, else {DEFAULT_MAX_CONTEXT}).",
    )
    parser.add_argument(
        "--prefill-step-size", type=int, default=2048, help="Prefill chunk size in tokens."
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="Most requests decoded together (continuous batching; 1: one at a time). "
        "Caches that cannot be batched (--max-kv-size, --kv-bits, sliding-window or "
        f"recurrent layers) are always served one at a time. Default {DEFAULT_MAX_BATCH_SIZE}.",
    )
    parser.add_argument("--log-requests", action="store_true", help="Log every HTTP request.")
    return parser


def main(argv: Optional[List[str]] = None):
    parser = setup_arg_parser()
    args = parser.parse_args(argv)
    if args.model is None:
        parser.error("--model is required (a model directory, a .gguf file or a hub id).")
    check_kv_flags(parser, args)
    if args.prompt_cache_size < 0:
        parser.error(f"--prompt-cache-size must be >= 0 (got {args.prompt_cache_size}).")
    if args.max_context is not None and args.max_context < 2:
        parser.error(f"--max-context must be >= 2 (got {args.max_context}).")
    if args.prefill_step_size < 1:
        parser.error(f"--prefill-step-size must be >= 1 (got {args.prefill_step_size}).")
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1 (got {args.max_batch_size}).")
    if not 0 <= args.port < 65536:
        parser.error(f"--port must be in [0, 65535] (got {args.port}).")

    model, tokenizer, config = load_cli_model(args)
    try:
        # Fail at start-up, not on the first request, when the cache flags cannot work.
        cache_module.make_prompt_cache(model, max_kv_size=args.max_kv_size, **turbo_kwargs(args))
    except ValueError as e:
        fail(str(e))
    app = ModelServer(model, tokenizer, config, args)
    try:
        httpd = make_server(app, args.host, args.port)
    except OSError as e:
        fail(f"Cannot listen on {args.host}:{args.port}: {e}")
    host, port = httpd.server_address[:2]
    print(
        f"mlx_lm.server: serving {app.model_id} on http://{host}:{port} "
        + (
            f"(continuous batching, up to {app.max_batch_size} requests)"
            if app.batching
            else "(one request at a time)"
        ),
        file=sys.stderr,
        flush=True,
    )
    http_thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    http_thread.start()
    try:
        app.run()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.shutdown()
        httpd.server_close()


if __name__ == "__main__":
    main()
