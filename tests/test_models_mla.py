"""Multi-head latent attention architectures: DeepSeek-V3 and GLM-4.7-Flash (glm4_moe_lite).

Fast tests build the models from random ModelArgs: shapes, cached == uncached decoding, the
cache holding latents rather than per-head keys/values, TurboQuant refusing it, the
router against a loop-per-token NumPy reference, and `sanitize`. Slow tests build tiny
random transformers models (group-limited MoE routing, a dense first layer, YaRN) and
compare logits with ours loaded through `mlx_lm.utils.load`.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import cached_logits as _cached_logits
from conftest import randomize_hf_weights, save_wordlevel_tokenizer
from mlx.utils import tree_flatten, tree_map

from mlx_lm.generate import generate_step
from mlx_lm.models import deepseek_v3, glm4_moe_lite
from mlx_lm.models.cache import KVCache, QuantizedKVCache, make_prompt_cache
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    n_routed_experts=8,
    n_shared_experts=1,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=3,
    routed_scaling_factor=2.5,
    q_lora_rank=32,
    kv_lora_rank=64,
    qk_rope_head_dim=32,
    qk_nope_head_dim=16,
    v_head_dim=16,
    vocab_size=128,
    rms_norm_eps=1e-5,
    max_position_embeddings=256,
)

ARCHS = {
    "deepseek_v3": (
        deepseek_v3,
        dict(
            model_type="deepseek_v3",
            first_k_dense_replace=1,
            rope_scaling=dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=32,
                mscale=0.707,
                mscale_all_dim=1.0,
            ),
        ),
    ),
    "glm4_moe_lite": (
        glm4_moe_lite,
        dict(
            model_type="glm4_moe_lite",
            q_lora_rank=None,
            rope_interleave=False,
            mlp_layer_types=["dense", "sparse", "sparse"],
        ),
    ),
}


def _tiny(name, seed=0, **overrides):
    module, extra = ARCHS[name]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict({**TINY, **extra, **overrides}))
    # Larger weights than the default init, so attention and routing are not flat.
    model.update(tree_map(lambda p: p * 1.5, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_shapes_and_cached_decode(name):
    model = _tiny(name)
    assert len(model.layers) == TINY["num_hidden_layers"]
    assert type(model.layers[0].mlp) is deepseek_v3.MLP
    assert all(type(layer.mlp) is deepseek_v3.MoE for layer in model.layers[1:])

    # 2 x 20 tokens x 3 experts: the prompt pass takes SwitchGLU's sorted path, decoding
    # (2 x 3 pairs) the unsorted one.
    tokens = mx.random.randint(0, TINY["vocab_size"], (2, 20))
    full = model(tokens)
    assert full.shape == (2, 20, TINY["vocab_size"]) and full.dtype == mx.float32
    assert mx.abs(full).max().item() > 1.0
    cached = _cached_logits(model, tokens, prefill=12)
    assert mx.abs(full - cached).max().item() < 1e-4

    # Chunked prefill (several queries over a non-empty cache) takes the expanded path.
    cache = make_prompt_cache(model)
    chunks = [model(tokens[:, s:e], cache=cache) for s, e in [(0, 7), (7, 8), (8, 15), (15, 20)]]
    assert mx.abs(mx.concatenate(chunks, axis=1) - full).max().item() < 1e-4


@pytest.mark.parametrize("name", list(ARCHS))
def test_cache_holds_latents(name):
    model = _tiny(name)
    args = model.args
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 9))
    cache = make_prompt_cache(model)
    model(tokens, cache=cache)
    per_head_width = args.num_attention_heads * args.qk_head_dim
    for c in cache:
        assert type(c) is KVCache and c.offset == 9
        latent, k_pe = c.state
        assert latent.shape == (1, 1, 9, args.kv_lora_rank)
        assert k_pe.shape == (1, 1, 9, args.qk_rope_head_dim)
        assert latent.shape[-1] != per_head_width
    # What is cached is the normalized kv_a latent and the roped key part of layer 0.
    attn = model.layers[0].self_attn
    h = model.layers[0].input_layernorm(model.model.embed_tokens(tokens))
    latent, k_pe = mx.split(attn.kv_a_proj_with_mqa(h), [args.kv_lora_rank], axis=-1)
    latent = attn.kv_a_layernorm(latent)
    k_pe = attn.rope(k_pe[:, None])
    assert mx.allclose(cache[0].state[0][:, 0], latent, atol=1e-5)
    assert mx.allclose(cache[0].state[1], k_pe, atol=1e-5)


@pytest.mark.parametrize("name", list(ARCHS))
def test_turboquant_refuses_latent_cache(name):
    model = _tiny(name)
    assert model.model_type == name and model.args.kv_lora_rank == TINY["kv_lora_rank"]
    with pytest.raises(ValueError, match="latent") as err:
        make_prompt_cache(model, turbo_kv_bits=3)
    assert name in str(err.value) and str(TINY["kv_lora_rank"]) in str(err.value)


@pytest.mark.parametrize("name", list(ARCHS))
def test_kv_bits_alternative_runs_through_generate_step(name):
    """--kv-bits, the alternative the TurboQuant refusal names, quantizes the latent cache
    when the group size divides its widths (latent 64, rope part 32 here), and otherwise
    says which group size to use instead of failing inside mx.quantize."""
    model = _tiny(name)
    prompt = mx.random.randint(0, TINY["vocab_size"], (12,)).astype(mx.uint32)
    cache = make_prompt_cache(model)
    tokens = [
        t
        for t, _ in generate_step(
            prompt, model, max_tokens=4, prompt_cache=cache, kv_bits=8, kv_group_size=32
        )
    ]
    assert len(tokens) == 4 and all(type(c) is QuantizedKVCache for c in cache)
    with pytest.raises(ValueError, match="not multiples of --kv-group-size 64.*--kv-group-size 32"):
        list(generate_step(prompt, model, max_tokens=1, kv_bits=4, kv_group_size=64))


def test_absorbed_decode_matches_expanded_attention():
    """Decoding (absorbed attention over latents) equals attention with the per-head keys
    and values expanded from the same cache, written out here with NumPy."""
    model = _tiny("deepseek_v3", seed=3)
    attn, args = model.layers[1].self_attn, model.args
    x = mx.random.normal((1, 7, TINY["hidden_size"]))
    cache = KVCache()
    attn(x[:, :6], mask="causal", cache=cache)
    got = np.array(attn(x[:, 6:], mask=None, cache=cache))

    latent, k_pe = (np.array(a)[0, 0] for a in cache.state)  # [T, r], [T, rope]
    H, nope, v = args.num_attention_heads, args.qk_nope_head_dim, args.v_head_dim
    kv = (latent @ np.array(attn.kv_b_proj.weight).T).reshape(7, H, nope + v)
    q = np.array(attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x[:, 6:]))))
    q = q.reshape(H, nope + args.qk_rope_head_dim)
    q_pe = np.array(attn.rope(mx.array(q[None, :, None, nope:]), offset=6))[0, :, 0]
    out = []
    for h in range(H):
        keys = np.concatenate([kv[:, h, :nope], k_pe], axis=-1)
        s = keys @ np.concatenate([q[h, :nope], q_pe[h]]) * attn.scale
        p = np.exp(s - s.max())
        out.append((p / p.sum()) @ kv[:, h, nope:])
    want = np.concatenate(out) @ np.array(attn.o_proj.weight).T
    np.testing.assert_allclose(got[0, 0], want, atol=1e-4, rtol=1e-4)


def _reference_route(x, weight, bias, n_group, topk_group, k, norm, factor):
    """Loop-per-token NumPy version of DeepSeek-V3's group-limited sigmoid routing."""
    scores = 1 / (1 + np.exp(-(x @ weight.T)))
    inds, weights = [], []
    for s in scores:
        choice = s + bias
        groups = choice.reshape(n_group, -1)
        group_score = np.sort(groups, axis=-1)[:, -2:].sum(-1)
        kept = np.argsort(-group_score)[:topk_group]
        allowed = np.full_like(choice, -np.inf).reshape(n_group, -1)
        allowed[kept] = groups[kept]
        top = np.argsort(-allowed.reshape(-1))[:k]
        w = s[top] / (s[top].sum() + 1e-20) if norm else s[top]
        inds.append(top)
        weights.append(w * factor)
    return np.array(inds), np.array(weights)


@pytest.mark.parametrize("norm", [True, False])
def test_router_matches_reference(norm):
    args = deepseek_v3.ModelArgs.from_dict({**TINY, "n_routed_experts": 16, "norm_topk_prob": norm})
    gate = deepseek_v3.MoEGate(args)
    mx.random.seed(5)
    gate.weight = mx.random.normal(gate.weight.shape)
    gate.e_score_correction_bias = 0.5 * mx.random.normal(gate.e_score_correction_bias.shape)
    x = mx.random.normal((200, TINY["hidden_size"])) / 8
    inds, weights = gate(x)
    want_i, want_w = _reference_route(
        np.array(x),
        np.array(gate.weight),
        np.array(gate.e_score_correction_bias),
        args.n_group,
        args.topk_group,
        args.num_experts_per_tok,
        norm,
        args.routed_scaling_factor,
    )
    order = np.argsort(np.array(inds), axis=-1)
    got_i = np.take_along_axis(np.array(inds), order, -1)
    got_w = np.take_along_axis(np.array(weights), order, -1)
    ref_order = np.argsort(want_i, axis=-1)
    np.testing.assert_array_equal(got_i, np.take_along_axis(want_i, ref_order, -1))
    np.testing.assert_allclose(got_w, np.take_along_axis(want_w, ref_order, -1), rtol=1e-5)
    # The group limit and the bias both change some choices (the test exercises them).
    scores = np.array(mx.sigmoid(x @ gate.weight.T))
    plain = np.sort(np.argsort(-scores, axis=-1)[:, : args.num_experts_per_tok], axis=-1)
    assert (plain != got_i).any(axis=-1).mean() > 0.2


def test_switch_glu_matches_per_expert_loop():
    mx.random.seed(7)
    glu = SwitchGLU(16, 24, num_experts=5)
    x = mx.random.normal((3, 30, 16))
    inds = mx.random.randint(0, 5, (3, 30, 2))
    got = glu(x, inds)  # 180 pairs: the sorted path
    assert got.shape == (3, 30, 2, 16)
    small = glu(x[:1, :4], inds[:1, :4])  # 8 pairs: the unsorted path
    xs, ids = np.array(x), np.array(inds)
    g, u, d = (np.array(p.weight) for p in (glu.gate_proj, glu.up_proj, glu.down_proj))
    want = np.zeros(got.shape, np.float32)
    for b, t, j in np.ndindex(*ids.shape):
        e = ids[b, t, j]
        a = xs[b, t] @ g[e].T
        want[b, t, j] = ((a / (1 + np.exp(-a))) * (xs[b, t] @ u[e].T)) @ d[e].T
    np.testing.assert_allclose(np.array(got), want, atol=1e-4)
    np.testing.assert_allclose(np.array(small), want[:1, :4], atol=1e-4)


@pytest.mark.parametrize("name", list(ARCHS))
def test_quantized_weights_and_quantized_latent_cache(name):
    model = _tiny(name, seed=1)
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 12))
    ref = model(tokens)

    # --kv-bits: the latents are stored affine-quantized and dequantized to attend.
    cache = make_prompt_cache(model)
    outs = [model(tokens[:, :8], cache=cache)]
    cache = [c.to_quantized(group_size=32, bits=8) for c in cache]
    assert all(type(c) is QuantizedKVCache for c in cache)
    outs += [model(tokens[:, i : i + 1], cache=cache) for i in range(8, 12)]
    err = mx.abs(mx.concatenate(outs, axis=1) - ref).max().item()
    assert err < 0.02 * mx.abs(ref).max().item()

    # Quantized weights (experts included) still run, cached and uncached alike.
    nn.quantize(model, group_size=32, bits=8)
    assert isinstance(model.layers[1].mlp.switch_mlp.gate_proj, QuantizedSwitchLinear)
    assert isinstance(model.layers[1].self_attn.kv_b_proj, nn.QuantizedLinear)
    out = model(tokens)
    assert mx.abs(out - ref).max().item() < 0.05 * mx.abs(ref).max().item()
    assert mx.abs(out - _cached_logits(model, tokens, prefill=6)).max().item() < 1e-4


def _hf_style_weights(model):
    """Our parameters renamed to a Hugging Face checkpoint's layout (per-expert tensors)."""
    weights = {}
    for key, value in tree_flatten(model.parameters()):
        if ".switch_mlp." in key:
            prefix, proj = key.split(".switch_mlp.")
            proj = proj.split(".")[0]
            for e in range(value.shape[0]):
                weights[f"{prefix}.experts.{e}.{proj}.weight"] = value[e]
        else:
            weights[key] = value
    return weights


def test_sanitize_stacks_experts_and_drops_extras():
    model = _tiny("deepseek_v3", seed=2)
    weights = _hf_style_weights(model)
    n = TINY["num_hidden_layers"]
    # A multi-token-prediction layer and rotary buffers are in real checkpoints.
    weights[f"model.layers.{n}.self_attn.kv_b_proj.weight"] = mx.zeros((4, 4))
    weights[f"model.layers.{n}.mlp.experts.0.gate_proj.weight"] = mx.zeros((4, 4))
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = mx.zeros((8,))
    clean = model.sanitize(weights)
    ours = dict(tree_flatten(model.parameters()))
    assert set(clean) == set(ours)
    for k, v in ours.items():
        assert clean[k].shape == v.shape and mx.array_equal(clean[k], v), k

    # transformers' fused in-memory layout loads too.
    fused = dict(tree_flatten(model.parameters()))
    for i in range(1, n):
        p = f"model.layers.{i}.mlp"
        gate = fused.pop(f"{p}.switch_mlp.gate_proj.weight")
        up = fused.pop(f"{p}.switch_mlp.up_proj.weight")
        fused[f"{p}.experts.gate_up_proj"] = mx.concatenate([gate, up], axis=1)
        fused[f"{p}.experts.down_proj"] = fused.pop(f"{p}.switch_mlp.down_proj.weight")
    clean = model.sanitize(fused)
    assert all(mx.array_equal(clean[k], v) for k, v in ours.items())


def test_sanitize_dequantizes_block_fp8():
    model = _tiny("deepseek_v3")
    weights = _hf_style_weights(model)
    key = "model.layers.0.mlp.gate_proj.weight"  # [96, 64]: a partial 128 x 128 block
    w = weights[key]
    scale = mx.array([[0.5]])
    weights[key] = mx.to_fp8(w / 0.5)
    weights[key + "_scale_inv"] = scale
    clean = model.sanitize(weights)
    assert key + "_scale_inv" not in clean and clean[key].shape == w.shape
    # e4m3 keeps about 3 significant bits.
    assert mx.abs(clean[key].astype(mx.float32) - w).max().item() < 0.07 * mx.abs(w).max().item()


def test_config_validation():
    with pytest.raises(ValueError, match="n_group"):
        deepseek_v3.ModelArgs.from_dict({**TINY, "n_group": 3})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        deepseek_v3.ModelArgs.from_dict({**TINY, "num_experts_per_tok": 5, "topk_group": 2})
    with pytest.raises(ValueError, match="mlp_layer_types"):
        glm4_moe_lite.ModelArgs.from_dict({**TINY, "mlp_layer_types": ["dense", "sparse"]})
    glm = glm4_moe_lite.ModelArgs.from_dict({**TINY, "first_k_dense_replace": 2})
    assert glm.mlp_layer_types == ["dense", "dense", "sparse"]
    assert glm4_moe_lite.ModelArgs.from_dict(TINY).mlp_layer_types == ["dense", "sparse", "sparse"]


# --------------------------------------------------------------------------------------
# Parity with transformers (slow: imports torch).

PROMPT, DECODE = 24, 8


def _hf_cases():
    # MLA has no KV heads as such; transformers' eager attention still divides by this.
    common = dict(TINY, num_key_value_heads=TINY["num_attention_heads"])
    return {
        # YaRN with both mscale terms, interleaved RoPE, query bottleneck, 4 groups of 2
        # experts with the best 2 groups kept, a dense first layer.
        "deepseek_v3": (
            "DeepseekV3Config",
            dict(
                common,
                qk_rope_head_dim=16,
                kv_lora_rank=48,
                qk_nope_head_dim=24,
                v_head_dim=20,
                first_k_dense_replace=1,
                rope_interleave=True,
                rope_scaling=dict(
                    rope_type="yarn",
                    factor=4.0,
                    original_max_position_embeddings=16,
                    mscale=0.707,
                    mscale_all_dim=1.0,
                    beta_fast=32,
                    beta_slow=1,
                ),
                max_position_embeddings=64,
                tie_word_embeddings=False,
            ),
        ),
        # No query bottleneck, rotate-half RoPE, per-layer dense/sparse pattern, two
        # shared experts, 2 groups with 1 kept, unnormalized weights.
        "glm4_moe_lite": (
            "Glm4MoeLiteConfig",
            dict(
                common,
                num_hidden_layers=4,
                q_lora_rank=None,
                qk_rope_head_dim=16,
                kv_lora_rank=40,
                qk_nope_head_dim=24,
                v_head_dim=24,
                n_group=2,
                topk_group=1,
                n_shared_experts=2,
                norm_topk_prob=False,
                routed_scaling_factor=1.8,
                rope_interleave=False,
                rope_theta=1e6,
                mlp_layer_types=["dense", "sparse", "dense", "sparse"],
            ),
        ),
    }


def _randomize(hf_model, torch):
    """O(1)-logit weights (transformers' init is tiny) and a non-zero routing bias."""
    randomize_hf_weights(hf_model, torch)
    with torch.no_grad():
        for name, b in hf_model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn_like(b))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{case: (saved model dir, transformers logits [1, PROMPT + DECODE, vocab], tokens)}"""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    out = {}
    for i, (name, (config_cls, kwargs)) in enumerate(_hf_cases().items()):
        torch.manual_seed(4321 + i)
        config = getattr(transformers, config_cls)(**kwargs)
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        hf = hf.float().eval()
        _randomize(hf, torch)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        save_wordlevel_tokenizer(path, kwargs["vocab_size"])
        tokens = torch.randint(0, kwargs["vocab_size"], (1, PROMPT + DECODE))
        with torch.no_grad():
            logits = hf(tokens).logits.float().numpy()
            # transformers' own cached decoding, as a check on the reference itself.
            res = hf(tokens[:, :PROMPT], use_cache=True)
            steps = [res.logits]
            for t in range(PROMPT, PROMPT + DECODE):
                res = hf(tokens[:, t : t + 1], cache=res.cache, use_cache=True)
                steps.append(res.logits)
        hf_cached = torch.cat(steps, dim=1).float().numpy()
        assert np.abs(hf_cached - logits).max() < 1e-3
        out[name] = (path, logits, tokens.numpy())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_hf_cases()))
def test_logits_match_transformers(hf_models, name):
    from mlx_lm.utils import load

    path, hf_logits, tokens = hf_models[name]
    model, tokenizer = load(str(path))
    assert tokenizer is not None and model.model_type == name
    assert any(type(layer.mlp) is deepseek_v3.MLP for layer in model.layers)
    assert any(type(layer.mlp) is deepseek_v3.MoE for layer in model.layers)
    tokens = mx.array(tokens)

    full = np.array(model(tokens))
    err_full = np.abs(full - hf_logits).max()
    cache = make_prompt_cache(model)
    cached = np.array(_cached_logits(model, tokens, prefill=PROMPT, cache=cache))
    err_cached = np.abs(cached - hf_logits).max()
    print(f"\n{name}: max |dlogit| full={err_full:.2e} cached={err_cached:.2e}")
    assert np.abs(hf_logits).max() > 1.0  # not a comparison of near-zero logits
    assert err_full <= 1e-3
    assert err_cached <= 1e-3
    assert cache[0].state[0].shape[-1] == model.args.kv_lora_rank
