"""TurboQuant on real SmolLM2-135M keys and values (slow: real weights)."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_lm.models.llama as llama
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.turboquant_cache import TurboQuantKVCache
from mlx_lm.perplexity import compare, teacher_forced_logprobs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def captured(smollm2, prose):
    """Queries, keys and values of every layer for 1,536 tokens of prose."""
    model, tokenizer = smollm2
    tokens = mx.array(tokenizer.encode(prose)[:1536])
    queries = []
    plain = llama.scaled_dot_product_attention

    def spy(q, k, v, cache, scale, mask, **kw):
        queries.append(q)
        return plain(q, k, v, cache=cache, scale=scale, mask=mask, **kw)

    llama.scaled_dot_product_attention = spy
    try:
        cache = make_prompt_cache(model)
        model(tokens[None], cache=cache)
    finally:
        llama.scaled_dot_product_attention = plain
    layers = [(q, *c.state) for q, c in zip(queries, cache)]
    mx.eval(layers)
    return layers, model.layers[0].self_attn.scale


def cosine(a, b):
    return mx.sum(a * b, -1) / (mx.linalg.norm(a, axis=-1) * mx.linalg.norm(b, axis=-1) + 1e-12)


def affine(x, bits):
    return mx.dequantize(*mx.quantize(x, group_size=64, bits=bits), group_size=64, bits=bits)


def attention_error(q, k, v, k_hat, v_hat, scale, last=64):
    q = q[:, :, -last:]
    mask = "causal"
    exact = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    approx = mx.fast.scaled_dot_product_attention(q, k_hat, v_hat, scale=scale, mask=mask)
    return float(mx.linalg.norm(approx - exact) / mx.linalg.norm(exact))


def test_real_kv_cosine_and_attention_error_vs_affine(captured):
    layers, scale = captured
    rows = {}
    for bits in (2, 3, 4):
        stats = {"tq": [], "affine": [], "k_cos": [], "v_cos": [], "ak_cos": [], "av_cos": []}
        for i, (q, k, v) in enumerate(layers):
            tq = TurboQuantKVCache(bits, bits, layer_idx=i)
            tq.update_and_fetch(k, v)
            k_hat, v_hat = tq.dequantized()
            ak, av = affine(k, bits), affine(v, bits)
            stats["k_cos"].append(float(mx.mean(cosine(k, k_hat))))
            stats["v_cos"].append(float(mx.mean(cosine(v, v_hat))))
            stats["ak_cos"].append(float(mx.mean(cosine(k, ak))))
            stats["av_cos"].append(float(mx.mean(cosine(v, av))))
            stats["tq"].append(attention_error(q, k, v, k_hat, v_hat, scale))
            stats["affine"].append(attention_error(q, k, v, ak, av, scale))
        rows[bits] = {name: float(np.mean(vals)) for name, vals in stats.items()}

    print(
        "\n| bits | TQ K cos | TQ V cos | TQ attn rel err | affine K cos | affine V cos | affine attn rel err |"
    )
    print("|---|---|---|---|---|---|---|")
    for bits, r in rows.items():
        print(
            f"| {bits} | {r['k_cos']:.4f} | {r['v_cos']:.4f} | {r['tq']:.3f} | "
            f"{r['ak_cos']:.4f} | {r['av_cos']:.4f} | {r['affine']:.3f} |"
        )
    assert rows[3]["k_cos"] >= 0.98 and rows[3]["v_cos"] >= 0.98
    assert rows[4]["k_cos"] >= 0.995 and rows[4]["v_cos"] >= 0.995
    for bits in (2, 3, 4):
        assert rows[bits]["tq"] <= rows[bits]["affine"], (bits, rows[bits])


@pytest.fixture(scope="module")
def default_runs(smollm2, prose):
    """Perplexity change, KL and top-1 of cache configs against FP16, fed in chunks of
    512 as `mlx_lm.perplexity` does. CI's short version: 1,024 tokens (about 90 s
    instead of 250 s for 2,048); the 2,048-token tables come from
    benchmarks/quality_tables.py. Measured at 1,024 tokens: 4-bit -0.3% (KL 0.0044,
    affine 4-bit 0.079), 3-bit +1.4%, plain 3-bit +28.6%."""
    model, tokenizer = smollm2
    tokens = mx.array(tokenizer.encode(prose)[:1025])
    ref = teacher_forced_logprobs(model, tokens, make_prompt_cache(model))
    plain = dict(turbo_key_centering=False, turbo_key_scaling=False, turbo_fp16_window=0)
    configs = {
        "tq4": ({"turbo_kv_bits": 4}, {}),
        "tq3": ({"turbo_kv_bits": 3}, {}),
        "tq3 plain": ({"turbo_kv_bits": 3, **plain}, {}),
        "kv4": ({}, {"kv_bits": 4}),
    }
    runs = {}
    for name, (cache_kw, step_kw) in configs.items():
        cache = make_prompt_cache(model, **cache_kw)
        f = compare(ref, teacher_forced_logprobs(model, tokens, cache, **step_kw), tokens[1:])
        runs[name] = dict(delta=f["ppl"] / f["ref_ppl"] - 1, kl=f["kl"], top1=f["top1"])
        print(f"\n{name}: {runs[name]}")
    return runs


def test_4_bit_quality_target(default_runs):
    """Issue 3: within +7% perplexity and top-1 agreement >= 0.87 (plain TurboQuant
    without the causal key mean measured +6.9% / 0.841 here)."""
    r = default_runs["tq4"]
    assert r["delta"] <= 0.07 and r["top1"] >= 0.87, r


def test_cli_paris_with_3_bits_and_fp16_layers(smollm2_gguf):
    from test_cli import run

    r = run(
        "generate",
        "--model",
        smollm2_gguf,
        "--prompt",
        "What is the capital of France?",
        "--max-tokens",
        "20",
        "--temp",
        "0",
        "--turbo-kv-bits",
        "3",
        "--turbo-fp16-layers",
        "1",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "[turboquant] 28 of 30 layers compressed" in r.stderr


def test_default_quality_targets(default_runs):
    """Issue 7 on SmolLM2: with the defaults (causal key mean and scaling, a 64-token
    float16 window), --turbo-kv-bits 4 within +3% perplexity and at most a third of
    affine 4-bit's KL, --turbo-kv-bits 3 within +10%. Plain TurboQuant_mse at 3 bits
    misses that by far (+30.6% measured), so the check measures something."""
    r = default_runs
    assert r["tq4"]["delta"] <= 0.03 and r["tq4"]["kl"] <= r["kv4"]["kl"] / 3, r
    assert r["tq3"]["delta"] <= 0.10, r
    assert r["tq3 plain"]["delta"] > 0.10, r
