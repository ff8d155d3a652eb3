"""mlx_lm.server: unit tests of its parts, then the real server in a subprocess driven by
the `openai` client (fast: a tiny random model; slow: SmolLM2 with TurboQuant 3-bit)."""

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from mlx_lm.server import PromptCacheStore, _stop_hold, parse_bytes

openai = pytest.importorskip("openai")

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


# ----------------------------------------------------------------------------
# Parts


def test_parse_bytes():
    assert parse_bytes("256MB") == 256_000_000
    assert parse_bytes("2GiB") == 2 * 1024**3
    assert parse_bytes("1000") == 1000
    assert parse_bytes("1.5k") == 1500
    with pytest.raises(Exception, match="invalid size"):
        parse_bytes("lots")


def test_stop_hold():
    assert _stop_hold("hello wor", ["world"]) == 3
    assert _stop_hold("hello", ["world"]) == 0
    assert _stop_hold("abc", ["c!", "bc?"]) == 2


class FakeLayer:
    """A trimmable cache layer that records its tokens, standing in for KVCache."""

    def __init__(self, tokens, nbytes_per_token=10):
        self.tokens = list(tokens)
        self.per = nbytes_per_token

    @property
    def offset(self):
        return len(self.tokens)

    @property
    def nbytes(self):
        return self.per * len(self.tokens)

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(n, len(self.tokens))
        self.tokens = self.tokens[: len(self.tokens) - n]
        return n


def test_prompt_cache_store_prefix_copy_and_trim():
    store = PromptCacheStore(max_entries=4)
    stored = [FakeLayer([1, 2, 3, 4, 5])]
    store.insert([1, 2, 3, 4, 5], stored)
    cache, n = store.fetch([1, 2, 3, 9, 9])
    assert n == 3 and cache[0].tokens == [1, 2, 3]
    # A private copy: the stored conversation is untouched.
    cache[0].tokens.append(7)
    assert stored[0].tokens == [1, 2, 3, 4, 5]
    # The whole prompt cached: one token is left for the model to process.
    cache, n = store.fetch([1, 2, 3, 4, 5])
    assert n == 4 and cache[0].tokens == [1, 2, 3, 4]
    assert store.fetch([8, 1, 2]) == (None, 0)


def test_prompt_cache_store_lru_bounds():
    store = PromptCacheStore(max_entries=2, max_bytes=100)
    store.insert([1, 2], [FakeLayer([1, 2])])
    store.insert([3, 4], [FakeLayer([3, 4])])
    store.fetch([1, 2, 5])  # makes [1, 2] the most recently used
    store.insert([6, 7], [FakeLayer([6, 7])])
    assert sorted(store.stats()["tokens"]) == [2, 2] and store.fetch([3, 4, 1])[1] == 0
    assert store.fetch([1, 2, 9])[1] == 2
    # Bytes: 9 tokens x 10 bytes leave no room for another 20-byte entry in 100 bytes.
    store.insert([9] * 9, [FakeLayer([9] * 9)])
    assert store.stats()["bytes"] <= 100 and store.stats()["entries"] == 1
    # An entry larger than the whole budget is not kept at all.
    store.insert([5] * 20, [FakeLayer([5] * 20)])
    assert store.stats()["bytes"] <= 100
    # A conversation that extends a stored one supersedes it.
    store = PromptCacheStore(max_entries=4)
    store.insert([1, 2], [FakeLayer([1, 2])])
    store.insert([1, 2, 3], [FakeLayer([1, 2, 3])])
    assert store.stats()["tokens"] == [3]


# ----------------------------------------------------------------------------
# The server in a subprocess


class Server:
    def __init__(self, *args):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        env = dict(os.environ)
        if os.path.exists(OPENBLAS):
            env["LD_PRELOAD"] = OPENBLAS  # MLX's CPU BLAS is slow without it
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from mlx_lm.server import main; main()", "--port", "0", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.port = None

    def wait(self, timeout=120):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {open(self.log.name).read()}")
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", open(self.log.name).read())
            if m:
                self.port = int(m.group(1))
                if self.get("/health")[0] == 200:
                    return self
            time.sleep(0.2)
        raise RuntimeError(f"server did not start: {open(self.log.name).read()}")

    def client(self):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none")

    def request(self, method, path, body=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        out = resp.status, resp.read()
        conn.close()
        return out[0], json.loads(out[1]) if out[1] else None

    def get(self, path):
        try:
            return self.request("GET", path)
        except OSError:
            return None, None

    def wait_idle(self, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.get("/health")[1]["active_requests"] == 0:
                return True
            time.sleep(0.05)
        return False

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture(scope="module")
def tiny_server(tiny_model_dir):
    server = Server("--model", tiny_model_dir, "--alias", "tiny", "--max-context", "4096")
    server.wait()
    yield server
    server.stop()


def chat(client, content, model="tiny", **kw):
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, **kw)


def stream_text(stream):
    """(text, finish_reason, usage) of a streamed chat or text completion."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            piece = c.delta.content if hasattr(c, "delta") else c.text
            text.append(piece or "")
            finish = c.finish_reason or finish
    return "".join(text), finish, usage


def check_usage(usage, max_tokens, finish_reason):
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens > 0 and 1 <= usage.completion_tokens <= max_tokens
    if finish_reason == "length":
        assert usage.completion_tokens == max_tokens


def test_health_and_models(tiny_server, tiny_model_dir):
    status, body = tiny_server.get("/health")
    assert status == 200 and body["status"] == "ok"
    assert [m.id for m in tiny_server.client().models.list().data] == ["tiny"]
    # The served model answers to its path and its alias.
    r = chat(tiny_server.client(), "hi", model=tiny_model_dir, max_tokens=2)
    assert r.choices[0].message.role == "assistant"


def test_chat_stream_matches_plain(tiny_server):
    client = tiny_server.client()
    r = chat(client, "hello world", max_tokens=12, temperature=0)
    choice = r.choices[0]
    check_usage(r.usage, 12, choice.finish_reason)
    assert choice.finish_reason in ("stop", "length") and choice.message.content
    stream = chat(
        client,
        "hello world",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = stream_text(stream)
    assert (text, finish) == (choice.message.content, choice.finish_reason)
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        r.usage.prompt_tokens,
        r.usage.completion_tokens,
    )
    # The repeated prompt came from the prompt cache (all but its last token).
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_completions_usage_and_logprobs(tiny_server):
    client = tiny_server.client()
    prompt = [5, 17, 42, 99, 120, 7]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=3)
    assert r.usage.prompt_tokens == len(prompt)
    check_usage(r.usage, 6, r.choices[0].finish_reason)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # Greedy decoding picks the most likely token: its logprob tops the list. (The
        # legacy format keys the alternatives by text: byte tokens may collide.)
        assert 1 <= len(top) <= 3 and value <= 0
        assert value == pytest.approx(max(top.values()), abs=1e-5)
    rc = chat(client, "hello", max_tokens=4, logprobs=True, top_logprobs=3)
    content = rc.choices[0].logprobs.content
    assert len(content) == rc.usage.completion_tokens or rc.choices[0].finish_reason == "stop"
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0], abs=1e-5)
    text, finish, usage = stream_text(
        client.completions.create(
            model="tiny",
            prompt=prompt,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (text, finish) == (r.choices[0].text, r.choices[0].finish_reason)
    assert usage.completion_tokens == r.usage.completion_tokens


def test_stop_strings_never_emitted(tiny_server):
    client = tiny_server.client()
    prompt = [3, 44, 55, 66]
    base = client.completions.create(model="tiny", prompt=prompt, max_tokens=24).choices[0].text
    assert len(base) >= 8
    stop = base[5:7]
    expected = base[: base.find(stop)]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, stop=[stop, "\x00zz"])
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    text, finish, _ = stream_text(
        client.completions.create(
            model="tiny", prompt=prompt, max_tokens=24, stop=stop, stream=True
        )
    )
    assert (text, finish) == (expected, "stop")


def test_seed_reproducible(tiny_server):
    client = tiny_server.client()
    kw = dict(max_tokens=16, temperature=1.0)
    a = chat(client, "The capital", seed=7, **kw).choices[0].message.content
    others = {chat(client, "The capital", seed=s, **kw).choices[0].message.content for s in (8, 9)}
    b = chat(client, "The capital", seed=7, **kw).choices[0].message.content
    assert a == b
    assert others | {a} != {a}  # other seeds sample something else


def test_conversation_reuses_prompt_cache(tiny_server):
    client = tiny_server.client()
    first = [{"role": "user", "content": "naïve café"}]
    r1 = chat(client, first, max_tokens=8)
    turn = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "hello"},
    ]
    r2 = chat(client, turn, max_tokens=8)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r1.usage.prompt_tokens <= cached < r2.usage.prompt_tokens


BAD_BODIES = [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": "10"}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"x": 1}}, "logit_bias"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("body,param", BAD_BODIES)
def test_bad_requests_are_400(tiny_server, body, param):
    status, err = tiny_server.request("POST", "/v1/chat/completions", body)
    assert status == 400 and err["error"]["param"] == param
    assert set(err["error"]) == {"message", "type", "param", "code"}


def test_faults_then_server_still_serves(tiny_server):
    s = tiny_server
    status, err = s.request("POST", "/v1/chat/completions", raw="{not json")
    assert status == 400 and err["error"]["code"] == "invalid_json"
    status, err = s.request("POST", "/v1/completions", raw="[1, 2]")
    assert status == 400
    # Longer than --max-context 4096.
    status, err = s.request("POST", "/v1/completions", {"prompt": [5] * 5000, "max_tokens": 4})
    assert status == 400 and err["error"]["code"] == "context_length_exceeded"
    # Any other model name is a 404 and never a path the server opens.
    with pytest.raises(openai.NotFoundError):
        chat(s.client(), "hi", model="/etc/passwd", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        chat(s.client(), "hi", max_tokens=0)
    r = chat(s.client(), "hello", max_tokens=4)
    assert r.usage.completion_tokens >= 1


def disconnect_mid_stream(server, body):
    """Open a stream, read its first content chunk, then drop the connection."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    seen = b""
    while seen.count(b"data: ") < 2:  # the role chunk, then the first text
        seen += sock.recv(4096)
    sock.close()
    assert seen.startswith(b"HTTP/1.1 200")


def test_disconnect_stops_generation(tiny_server):
    s = tiny_server
    keep = [{"role": "user", "content": "The capital of France is Paris."}]
    before = chat(s.client(), keep, max_tokens=6)
    # EOS (</s>, id 1) banned so that only the disconnect can end this generation early.
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 4000,
        "stream": True,
        "logit_bias": {"1": -100},
    }
    tic = time.time()
    disconnect_mid_stream(s, body)
    # 4000 tokens take far longer than this: the worker stopped at the disconnect.
    assert s.wait_idle(timeout=3.0), "generation went on after the client left"
    # Queue a request behind a stream that is dropped: it is served promptly.
    disconnect_mid_stream(s, body)
    after = chat(s.client(), keep, max_tokens=6)
    assert time.time() - tic < 20
    # Other conversations' cached state is untouched.
    assert after.choices[0].message.content == before.choices[0].message.content
    assert after.usage.prompt_tokens_details.cached_tokens > 0


def concurrently(*calls):
    """Run the calls in threads started together; their results in order."""
    results = [None] * len(calls)
    barrier = threading.Barrier(len(calls))

    def run(i):
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_clients_get_independent_streams(tiny_server):
    client = tiny_server.client()
    prompts = ["hello", "world", "café", "Paris"]
    # EOS banned: long enough generations that the four overlap in the batch.
    kw = dict(max_tokens=150, logit_bias={"1": -100})
    solo = [chat(client, p, **kw).choices[0].message.content for p in prompts]
    results = concurrently(
        *[lambda p=p: stream_text(chat(client, p, stream=True, **kw))[0] for p in prompts]
    )
    assert results == solo
    health = tiny_server.get("/health")[1]
    assert health["max_batch_size"] == 8 and health["peak_batch"] >= 2


@pytest.fixture(scope="module")
def tiny_tq_server(tiny_model_dir):
    """TurboQuant 3-bit, at most 3 requests per batch, no prompt-cache reuse (each
    request computed from scratch, so sequential and concurrent runs are comparable)."""
    flags = ["--model", tiny_model_dir, "--alias", "tiny", "--turbo-kv-bits", "3"]
    server = Server(*flags, "--max-batch-size", "3", "--prompt-cache-size", "0")
    server.wait()
    yield server
    server.stop()


def test_turboquant_batch_equals_sequential_runs(tiny_tq_server):
    """Four streaming clients against a batch of at most three (the fourth joins when one
    leaves), prompts of different lengths whose decoding crosses TurboQuant's key-mean
    segment start at position 32, greedy and seeded sampling, stop strings, logprobs:
    each gets what it gets when it runs alone."""
    client = tiny_tq_server.client()
    long = "The capital of France is Paris. " * 3
    jobs = [
        dict(content="hello", max_tokens=60, logit_bias={"1": -100}),
        dict(content=long, max_tokens=40, temperature=0.9, seed=11),
        dict(content="naïve café", max_tokens=50, temperature=1.2, seed=5, top_p=0.9),
        dict(content="world", max_tokens=45, logprobs=True, top_logprobs=2),
    ]

    def run(job, stream=True):
        job = dict(job)
        content = job.pop("content")
        if not stream:
            r = chat(client, content, **job)
            return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
        return stream_text(chat(client, content, stream=True, **job))

    solo = [run(j, stream=False) for j in jobs]
    # A stop string taken from the second request's own output: cut there in the batch.
    stop = solo[1][0][8:11]
    jobs[1]["stop"] = [stop]
    expected_stop = solo[1][0][: solo[1][0].find(stop)]
    got = concurrently(*[lambda j=j: run(j) for j in jobs])
    for i, ((text, finish, _), (want, want_finish, usage)) in enumerate(zip(got, solo)):
        if i == 1:
            assert (text, finish) == (expected_stop, "stop")
        else:
            assert (text, finish) == (want, want_finish), i
    assert solo[0][2].completion_tokens == 60
    health = tiny_tq_server.get("/health")[1]
    assert health["max_batch_size"] == 3 and health["peak_batch"] == 3


def test_one_at_a_time_server(tiny_model_dir):
    """--max-kv-size (a rotating cache, which cannot be batched): requests are served one
    after another, concurrent streams still equal sequential runs, stop strings hold."""
    server = Server("--model", tiny_model_dir, "--alias", "tiny", "--max-kv-size", "64")
    try:
        server.wait()
        health = server.get("/health")[1]
        assert health["max_batch_size"] == 1
        client = server.client()
        prompts = ["hello", "world", "café"]
        kw = dict(max_tokens=40, logit_bias={"1": -100})
        solo = [chat(client, p, **kw).choices[0].message.content for p in prompts]
        got = concurrently(
            *[lambda p=p: stream_text(chat(client, p, stream=True, **kw))[0] for p in prompts]
        )
        assert got == solo
        stop = solo[0][6:8]
        r = chat(client, "hello", stop=stop, **kw)
        assert r.choices[0].message.content == solo[0][: solo[0].find(stop)]
        assert r.choices[0].finish_reason == "stop"
        assert server.get("/health")[1]["peak_batch"] == 1
    finally:
        server.stop()


def test_uncombinable_caches_are_served_one_at_a_time():
    from conftest import make_tiny_model

    from mlx_lm.server import ModelServer, setup_arg_parser

    model = make_tiny_model("llama", head_dim=32)

    def server(*flags):
        args = setup_arg_parser().parse_args(["--model", "tiny", *flags])
        return ModelServer(model, None, {"vocab_size": 128}, args)

    assert server().max_batch_size == 8
    assert server("--turbo-kv-bits", "3", "--max-batch-size", "4").max_batch_size == 4
    for flags in (["--max-kv-size", "64"], ["--kv-bits", "8"], ["--max-batch-size", "1"]):
        s = server(*flags)
        assert not s.batching and s.max_batch_size == 1, flags


# ----------------------------------------------------------------------------
# SmolLM2 with TurboQuant 3-bit (slow)


@pytest.fixture(scope="module")
def smol_servers(smollm2_gguf):
    """A server with prompt-cache reuse and a fresh one without, both TQ3."""
    flags = ["--model", smollm2_gguf, "--alias", "smol", "--turbo-kv-bits", "3", "--dequantize"]
    servers = [Server(*flags), Server(*flags, "--prompt-cache-size", "0")]
    try:
        yield [s.wait() for s in servers]
    finally:
        for s in servers:
            s.stop()


@pytest.mark.slow
def test_smollm2_chat_completion_stream(smol_servers):
    client = smol_servers[0].client()
    question = [{"role": "user", "content": "What is the capital of France?"}]
    r = chat(client, question, model="smol", max_tokens=8)
    choice = r.choices[0]
    check_usage(r.usage, 8, choice.finish_reason)
    assert re.search(r"[A-Za-z]{2}", choice.message.content)
    text, finish, usage = stream_text(
        chat(
            client,
            question,
            model="smol",
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (text, finish) == (choice.message.content, choice.finish_reason)
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    c = client.completions.create(model="smol", prompt="The sky is", max_tokens=6)
    check_usage(c.usage, 6, c.choices[0].finish_reason)
    # Stop strings: cut where the first one would start, never emitted.
    base = c.choices[0].text
    stop = base.strip()[:2]
    cut = client.completions.create(model="smol", prompt="The sky is", max_tokens=6, stop=stop)
    assert cut.choices[0].text == base[: base.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_smollm2_seed_and_conversation_cache(smol_servers):
    cached_server, fresh_server = smol_servers
    client, fresh = cached_server.client(), fresh_server.client()
    # Seeded sampling repeats itself (on the server without reuse, where each request
    # is computed from scratch) whatever ran in between.
    kw = dict(model="smol", max_tokens=6, temperature=0.9)
    a = chat(fresh, "Tell me a story.", seed=123, **kw).choices[0].message.content
    chat(fresh, "Tell me a story.", seed=5, **kw)
    b = chat(fresh, "Tell me a story.", seed=123, **kw).choices[0].message.content
    assert a == b
    first = [{"role": "user", "content": "Name a fruit."}]
    r1 = chat(client, first, model="smol", max_tokens=8)
    turn = first + [
        {"role": "assistant", "content": r1.choices[0].message.content},
        {"role": "user", "content": "Now name a color."},
    ]
    r2 = chat(client, turn, model="smol", max_tokens=8)
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r1.usage.prompt_tokens <= cached < r2.usage.prompt_tokens
    f2 = chat(fresh, turn, model="smol", max_tokens=8)
    assert f2.usage.prompt_tokens_details.cached_tokens == 0
    assert f2.choices[0].message.content == r2.choices[0].message.content


@pytest.mark.slow
def test_smollm2_disconnect_then_serves(smol_servers):
    s = smol_servers[0]
    body = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Count to 1000."}],
        "max_tokens": 1000,
        "stream": True,
    }
    disconnect_mid_stream(s, body)
    assert s.wait_idle(timeout=10.0)
    status, err = s.request("POST", "/v1/chat/completions", {"model": "smol", "messages": []})
    assert status == 400
    r = chat(s.client(), "Hi!", model="smol", max_tokens=4)
    assert r.usage.completion_tokens >= 1


@pytest.mark.slow
def test_smollm2_concurrent_streams_equal_sequential(smol_servers):
    """TQ3 SmolLM2: three streaming clients decoded together get the texts each gets
    alone (on the server without prompt-cache reuse: every request from scratch)."""
    s = smol_servers[1]
    client = s.client()
    questions = ["What is the capital of France?", "Name three colors.", "Tell me a story."]
    kw = dict(model="smol", max_tokens=12)
    solo = [chat(client, q, **kw).choices[0].message.content for q in questions]
    got = concurrently(
        *[lambda q=q: stream_text(chat(client, q, stream=True, **kw))[0] for q in questions]
    )
    assert got == solo
    assert s.get("/health")[1]["peak_batch"] >= 2
