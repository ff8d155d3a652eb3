"""Serving benchmark for `mlx_lm.server`: FP16 (model dtype) vs TurboQuant KV caches.

For each cache config a server is started in a subprocess. Then, per number of
concurrent streaming clients (1, 4, 8 by default), every client sends the same fixed mix
of chat requests; we report aggregate generated tokens/s, p50/p95 time to first token,
and the server's RSS before and after. A fill test then sends distinct conversations of
`--conversation-tokens` tokens to a server started with `--prompt-cache-bytes` and reads
how many the prompt cache holds. `--soak-seconds` runs 4 clients for that long and reports
the RSS growth (the issue's target: under 5% over a 10-minute soak).

    python benchmarks/server_bench.py --model $(python -m mlx_lm.sample_models smollm2) \\
        --dequantize --configs fp16 tq3 --clients 1 4 8 --max-tokens 32 \\
        --max-batch-size 1 8 --output bench_out/server.md

On Linux CPUs set LD_PRELOAD to OpenBLAS (the server subprocess inherits it; see
README): MLX's bundled BLAS is about 70x slower.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import psutil

CONFIGS = {
    "fp16": [],
    "tq4": ["--turbo-kv-bits", "4"],
    "tq3": ["--turbo-kv-bits", "3"],
    "tq3-fp16-1": ["--turbo-kv-bits", "3", "--turbo-fp16-layers", "1"],
}

# The fixed request mix: short and longer prompts, each client sends all of them.
REQUESTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, then give one everyday example of "
    "light scattering that a child would recognize.",
    "List three fruits.",
]


class Server:
    def __init__(self, model, extra):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-c", "from mlx_lm.server import main; main()"]
        self.proc = subprocess.Popen(
            cmd + ["--model", model, "--port", "0", *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(open(self.log.name).read())
            m = re.search(r"on http://127\.0\.0\.1:(\d+)", open(self.log.name).read())
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return
            time.sleep(0.2)
        raise RuntimeError("server did not start")

    def rss_mb(self) -> float:
        return psutil.Process(self.proc.pid).memory_info().rss / 1e6

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health") as r:
            return json.loads(r.read())

    def post(self, path, body, stream=False):
        req = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        return urllib.request.urlopen(req, timeout=3600)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        os.unlink(self.log.name)


def stream_chat(server, prompt, max_tokens):
    """(seconds to the first content token, completion tokens) of one streamed chat."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tic = time.perf_counter()
    ttft, tokens = None, 0
    with server.post("/v1/chat/completions", body) as resp:
        for line in resp:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                if ttft is None and c.get("delta", {}).get("content"):
                    ttft = time.perf_counter() - tic
    return ttft if ttft is not None else time.perf_counter() - tic, tokens


def run_clients(server, n_clients, max_tokens, rounds=1):
    ttfts, tokens = [], []
    lock = threading.Lock()

    def client(i):
        for r in range(rounds):
            for k in range(len(REQUESTS)):
                # Clients start at different places in the mix; a distinct suffix keeps
                # the prompt cache from answering one client with another's prefill.
                prompt = REQUESTS[(k + i) % len(REQUESTS)] + f" (client {i}, round {r})"
                t, n = stream_chat(server, prompt, max_tokens)
                with lock:
                    ttfts.append(t)
                    tokens.append(n)

    tic = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    q = statistics.quantiles(ttfts, n=20, method="inclusive") if len(ttfts) > 1 else ttfts * 19
    return {
        "tok_s": sum(tokens) / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": q[18],
        "requests": len(ttfts),
    }


def fill_prompt_cache(server, conv_tokens, max_fill, vocab_low=1000, vocab_high=20000):
    """Send distinct conversations of `conv_tokens` tokens until the prompt cache evicts
    one (or `max_fill` were sent). Returns (conversations held, bytes per conversation,
    whether the budget was reached)."""
    import random

    rng = random.Random(0)
    held, per_conv = 0, 0
    for i in range(max_fill):
        prompt = [rng.randrange(vocab_low, vocab_high) for _ in range(conv_tokens - 1)]
        server.post("/v1/completions", {"prompt": prompt, "max_tokens": 1}).read()
        stats = server.health()["prompt_cache"]
        if i == 0:
            per_conv = stats["bytes"]
        if stats["entries"] <= held:
            return held, per_conv, True
        held = stats["entries"]
    return held, per_conv, False


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--dequantize", action="store_true")
    p.add_argument("--configs", nargs="+", default=["fp16", "tq3"], choices=list(CONFIGS))
    p.add_argument("--clients", nargs="*", type=int, default=[1, 4, 8])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=1, help="Passes over the mix per client.")
    p.add_argument("--conversation-tokens", type=int, default=2048)
    p.add_argument("--prompt-cache-bytes", default="256MB")
    p.add_argument(
        "--max-fill",
        type=int,
        default=40,
        help="Most conversations sent by the fill test; when the budget is not reached "
        "by then, the capacity is computed from the measured bytes per conversation.",
    )
    p.add_argument(
        "--max-batch-size",
        nargs="+",
        type=int,
        default=[8],
        help="The server's --max-batch-size values to compare (1: one request at a time).",
    )
    p.add_argument("--soak-seconds", type=float, default=0)
    p.add_argument("--output", default=None, help="Also write the markdown table here.")
    args = p.parse_args()

    from mlx_lm.server import parse_bytes

    budget = parse_bytes(args.prompt_cache_bytes)
    rows, fill_rows, soak_rows = [], [], []
    for name in args.configs:
        extra = CONFIGS[name] + (["--dequantize"] if args.dequantize else [])
        extra += ["--prompt-cache-size", "1000", "--prompt-cache-bytes", str(budget)]
        for mbs in args.max_batch_size:
            server = Server(args.model, extra + ["--max-batch-size", str(mbs)])
            try:
                stream_chat(server, "Hello!", 4)  # warm-up
                rss0 = server.rss_mb()
                for n in args.clients:
                    r = run_clients(server, n, args.max_tokens, args.rounds)
                    r["peak_batch"] = server.health().get("peak_batch", 1)
                    rows.append((name, mbs, n, r, rss0, server.rss_mb()))
                    print(name, mbs, n, r, flush=True)
                if args.soak_seconds > 0:
                    before = server.rss_mb()
                    end = time.time() + args.soak_seconds
                    while time.time() < end:
                        run_clients(server, 4, args.max_tokens)
                    after = server.rss_mb()
                    soak_rows.append((f"{name}, batch {mbs}", args.soak_seconds, before, after))
            finally:
                server.stop()
        if args.max_fill > 0:
            # A fresh server: its prompt cache holds only the fill test's conversations.
            server = Server(args.model, extra)
            try:
                held, per_conv, full = fill_prompt_cache(
                    server, args.conversation_tokens, args.max_fill
                )
            finally:
                server.stop()
            fits = held if full else budget // max(per_conv, 1)
            fill_rows.append((name, per_conv, fits, "measured" if full else "computed"))
            print(name, "fill", held, per_conv, full, flush=True)

    lines = [
        f"Model: {os.path.basename(args.model)}{' (dequantized)' if args.dequantize else ''}; "
        f"{len(REQUESTS)} chat requests per client per round, max_tokens {args.max_tokens}, "
        "greedy. 'max batch' is the server's --max-batch-size (1: one request at a time "
        "from the FIFO queue; more: continuous batching) and 'peak' the most requests it "
        "decoded together so far (/health). "
        "'fp16' is the uncompressed cache in the model's dtype (float32 with --dequantize).",
        "",
        "| KV cache | max batch | clients | requests | aggregate tok/s | TTFT p50 (s) "
        "| TTFT p95 (s) | peak | RSS before (MB) | RSS after (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, mbs, n, r, rss0, rss1 in rows:
        lines.append(
            f"| {name} | {mbs} | {n} | {r['requests']} | {r['tok_s']:.1f} "
            f"| {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} | {r['peak_batch']} | {rss0:.0f} "
            f"| {rss1:.0f} |"
        )
    lines += [
        "",
        f"Conversations of {args.conversation_tokens} tokens held by "
        f"--prompt-cache-bytes {args.prompt_cache_bytes}:",
        "",
        "| KV cache | bytes per conversation | conversations that fit | how |",
        "|---|---|---|---|",
    ]
    for name, per_conv, fits, how in fill_rows:
        lines.append(f"| {name} | {per_conv / 1e6:.1f} MB | {fits} | {how} |")
    if soak_rows:
        lines += ["", "| KV cache | soak (s) | RSS start (MB) | RSS end (MB) | growth |"]
        lines.append("|---|---|---|---|---|")
        for name, secs, before, after in soak_rows:
            lines.append(
                f"| {name} | {secs:.0f} | {before:.0f} | {after:.0f} "
                f"| {100 * (after - before) / before:+.1f}% |"
            )
    table = "\n".join(lines)
    print(table)
    if args.output:
        os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
        with open(args.output, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
