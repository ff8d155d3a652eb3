"""Architecture tests.

Fast tests build each model from random ModelArgs and check shapes, the cache types and
that cached decoding reproduces the uncached forward pass. Slow tests build tiny random
transformers models, save them with `save_pretrained`, load them with `mlx_lm.utils.load`
and compare logits with transformers' own (full prompt, and cached decode steps).
"""

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import cached_logits as _cached_logits
from conftest import randomize_hf_weights, save_wordlevel_tokenizer

from mlx_lm.models import gemma3_text, llama, qwen2, qwen3
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE, initialize_rope

TINY = dict(
    hidden_size=64,
    num_hidden_layers=3,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
)

# (module, extra config) for the fast self-consistency tests.
ARCHS = {
    "llama": (llama, dict(model_type="llama")),
    "llama3_rope_tied": (
        llama,
        dict(
            model_type="llama",
            tie_word_embeddings=True,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=8192,
            ),
        ),
    ),
    "mistral_window": (llama, dict(model_type="mistral", sliding_window=5)),
    "qwen2": (qwen2, dict(model_type="qwen2", tie_word_embeddings=True)),
    "qwen3": (qwen3, dict(model_type="qwen3", head_dim=32)),
    "gemma3_text": (
        gemma3_text,
        dict(
            model_type="gemma3_text",
            head_dim=32,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            final_logit_softcapping=30.0,
        ),
    ),
}


def _perturb_norms(model):
    from mlx.utils import tree_flatten, tree_unflatten

    params = tree_flatten(model.parameters())
    new = [(k, v + 0.3 * mx.random.normal(v.shape)) for k, v in params if "norm" in k]
    model.update(tree_unflatten(new))
    mx.eval(model.parameters())


@pytest.mark.parametrize("name", list(ARCHS))
def test_forward_shapes_and_cached_decode(name):
    module, extra = ARCHS[name]
    mx.random.seed(0)
    args = module.ModelArgs.from_dict({**TINY, **extra})
    model = module.Model(args)
    _perturb_norms(model)
    assert len(model.layers) == TINY["num_hidden_layers"]

    tokens = mx.random.randint(0, TINY["vocab_size"], (2, 14))
    full = model(tokens)
    assert full.shape == (2, 14, TINY["vocab_size"])
    assert full.dtype == mx.float32
    cached = _cached_logits(model, tokens, prefill=8)
    assert mx.abs(full - cached).max().item() < 1e-4

    # The window must actually matter where a config sets one: full causal attention
    # gives different logits beyond the window.
    if extra.get("sliding_window"):
        wide = module.Model(module.ModelArgs.from_dict({**TINY, **extra, "sliding_window": 64}))
        wide.update(model.parameters())
        assert mx.abs(wide(tokens)[:, 6:] - full[:, 6:]).max().item() > 1e-3
        assert mx.abs(wide(tokens)[:, :5] - full[:, :5]).max().item() < 1e-5


@pytest.mark.parametrize("name", ["mistral_window", "gemma3_text"])
@pytest.mark.parametrize("chunks", [[7, 5, 1, 1, 6, 4], [3, 3, 3, 1, 1, 1, 12], [1] * 24])
def test_windowed_chunked_prefill(name, chunks):
    """Multi-token updates after the sliding window (ring buffer) has wrapped."""
    module, extra = ARCHS[name]
    mx.random.seed(2)
    model = module.Model(module.ModelArgs.from_dict({**TINY, **extra}))
    _perturb_norms(model)
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, sum(chunks)))
    full = model(tokens)
    cache, outs, start = make_prompt_cache(model), [], 0
    for n in chunks:
        outs.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    assert mx.abs(mx.concatenate(outs, axis=1) - full).max().item() < 1e-4


@pytest.mark.parametrize("name", list(ARCHS))
def test_quantized_forward(name):
    """The loader quantizes Linear/Embedding layers; the models must still run."""
    module, extra = ARCHS[name]
    mx.random.seed(1)
    model = module.Model(module.ModelArgs.from_dict({**TINY, **extra}))
    tokens = mx.random.randint(0, TINY["vocab_size"], (1, 10))
    ref = model(tokens)
    nn.quantize(model, group_size=64, bits=8)
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    out = model(tokens)
    assert out.shape == ref.shape
    assert mx.abs(out - ref).max().item() < 0.05 * mx.abs(ref).max().item() + 1e-3
    cached = _cached_logits(model, tokens, prefill=6)
    assert mx.abs(out - cached).max().item() < 1e-4


def test_gemma3_layer_types_and_caches():
    args = gemma3_text.ModelArgs.from_dict(
        {**TINY, "model_type": "gemma3_text", "num_hidden_layers": 7, "head_dim": 16}
    )
    # transformers' default: every 6th layer global.
    assert args.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
    model = gemma3_text.Model(args)
    caches = make_prompt_cache(model)
    assert [type(c) for c in caches] == [RotatingKVCache] * 5 + [KVCache, RotatingKVCache]
    assert all(
        c.max_size == args.sliding_window and c.keep == 0 for c in caches if c is not caches[5]
    )
    with pytest.raises(ValueError, match="layer_types"):
        gemma3_text.ModelArgs.from_dict(
            {**TINY, "model_type": "gemma3_text", "layer_types": ["sliding_attention"]}
        )


def test_gemma3_rope_parameters_nested():
    """transformers >= 5 nests RoPE settings by layer type."""
    args = gemma3_text.ModelArgs.from_dict(
        {
            **TINY,
            "model_type": "gemma3_text",
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        }
    )
    assert args.rope_theta == 1e6 and args.rope_local_base_freq == 1e4
    assert args.rope_scaling["factor"] == 8.0 and args.rope_local_scaling is None


def test_old_and_new_rope_config_formats_agree():
    scaling = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )
    old = llama.ModelArgs.from_dict(
        {**TINY, "model_type": "llama", "rope_theta": 5e5, "rope_scaling": scaling}
    )
    new = llama.ModelArgs.from_dict(
        {**TINY, "model_type": "llama", "rope_parameters": {**scaling, "rope_theta": 5e5}}
    )
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling["factor"] == new.rope_scaling["factor"] == 8.0
    plain = llama.ModelArgs.from_dict(
        {
            **TINY,
            "model_type": "llama",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e5},
        }
    )
    assert plain.rope_theta == 1e5 and plain.rope_scaling is None


def _reference_rope(x, inv_freq, offset, mscale=1.0):
    """NumPy rotate-half RoPE with explicit inverse frequencies."""
    x = np.array(x)
    L, d = x.shape[-2], x.shape[-1]
    ang = (np.arange(L) + offset)[:, None] * np.array(inv_freq)[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1) * mscale
    sin = np.concatenate([np.sin(ang)] * 2, -1) * mscale
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + rot * sin


def test_rope_variants_match_formulas():
    d, base = 32, 500000.0
    x = mx.random.normal((1, 2, 6, d))
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)

    plain = initialize_rope(d, base, False, None)
    np.testing.assert_allclose(plain(x, offset=3), _reference_rope(x, inv, 3), atol=1e-4)

    linear = initialize_rope(d, base, False, {"type": "linear", "factor": 4.0})
    np.testing.assert_allclose(linear(x, offset=3), _reference_rope(x, inv / 4, 3), atol=1e-4)

    # llama3: per-band rule written out independently of the implementation.
    cfg = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0)
    cfg["original_max_position_embeddings"] = 8192
    rope = initialize_rope(d, base, False, cfg, 131072)
    assert isinstance(rope, Llama3RoPE)
    want = []
    for f in inv:
        wl = 2 * math.pi / f
        if wl < 8192 / 4:
            want.append(f)
        elif wl > 8192:
            want.append(f / 8)
        else:
            s = (8192 / wl - 1) / (4 - 1)
            want.append((1 - s) * f / 8 + s * f)
    assert any(w != f for w, f in zip(want, inv)) and any(w == f for w, f in zip(want, inv))
    np.testing.assert_allclose(rope(x, offset=1000), _reference_rope(x, want, 1000), atol=2e-3)

    yarn = initialize_rope(
        d, 10000.0, False, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096)
    )
    assert isinstance(yarn, YarnRoPE)
    assert yarn.mscale == pytest.approx(0.1 * math.log(4.0) + 1.0)

    with pytest.raises(ValueError, match="rope_type 'banana'"):
        initialize_rope(d, base, False, {"rope_type": "banana"})


# --------------------------------------------------------------------------------------
# Parity with transformers (slow: imports torch).

PROMPT, DECODE = 24, 8


def _hf_cases():
    # A short original context puts all three llama3 bands among the head's frequencies
    # that matter within PROMPT + DECODE positions.
    llama3 = dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    )
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        rms_norm_eps=1e-5,
    )
    return {
        "llama": ("LlamaConfig", dict(common, num_hidden_layers=2, tie_word_embeddings=False)),
        "llama3_rope_tied": (
            "LlamaConfig",
            dict(
                common,
                num_hidden_layers=2,
                tie_word_embeddings=True,
                rope_theta=500000.0,
                rope_scaling=llama3,
                max_position_embeddings=131072,
            ),
        ),
        "mistral_window": (
            "MistralConfig",
            dict(common, num_hidden_layers=2, sliding_window=10, tie_word_embeddings=False),
        ),
        "qwen2_tied": (
            "Qwen2Config",
            dict(common, num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1e6),
        ),
        "qwen2_yarn": (
            "Qwen2Config",
            dict(
                common,
                num_hidden_layers=2,
                tie_word_embeddings=False,
                rope_theta=1e6,
                rope_scaling=dict(
                    rope_type="yarn", factor=4.0, original_max_position_embeddings=16
                ),
                max_position_embeddings=64,
            ),
        ),
        "qwen3": (
            "Qwen3Config",
            dict(common, num_hidden_layers=2, head_dim=32, tie_word_embeddings=False),
        ),
        "gemma3_text": (
            "Gemma3TextConfig",
            dict(
                common,
                num_hidden_layers=4,
                head_dim=32,
                sliding_window=8,
                layer_types=["sliding_attention"] * 3 + ["full_attention"],
                query_pre_attn_scalar=24,
                final_logit_softcapping=30.0,
                rope_scaling=dict(rope_type="linear", factor=8.0),
                rope_local_base_freq=10000.0,
                rope_theta=1e6,
            ),
        ),
    }


def _randomize(hf_model, torch):
    gemma = "gemma" in type(hf_model).__name__.lower()  # zero-centred norms (1 + w)
    randomize_hf_weights(hf_model, torch, lambda name: 0.0 if gemma else 1.0)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{case: (saved model dir, transformers logits [1, PROMPT + DECODE, vocab], tokens)}"""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    out = {}
    for i, (name, (config_cls, kwargs)) in enumerate(_hf_cases().items()):
        torch.manual_seed(1234 + i)
        config = getattr(transformers, config_cls)(**kwargs)
        config._attn_implementation = "eager"
        hf = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        hf = hf.float().eval()
        _randomize(hf, torch)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        save_wordlevel_tokenizer(path, kwargs["vocab_size"])
        tokens = torch.randint(0, kwargs["vocab_size"], (1, PROMPT + DECODE))
        with torch.no_grad():
            logits = hf(tokens).logits.float().numpy()
        out[name] = (path, logits, tokens.numpy())
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_hf_cases()))
def test_logits_match_transformers(hf_models, name):
    from mlx_lm.utils import load

    path, hf_logits, tokens = hf_models[name]
    model, tokenizer = load(str(path))
    assert tokenizer is not None
    tokens = mx.array(tokens)

    # (a) the whole sequence in one forward pass
    full = np.array(model(tokens))
    err_full = np.abs(full - hf_logits).max()
    # (b) cached prefill of PROMPT tokens, then DECODE single-token steps
    cached = np.array(_cached_logits(model, tokens, prefill=PROMPT))
    err_cached = np.abs(cached - hf_logits).max()
    print(f"\n{name}: max |dlogit| full={err_full:.2e} cached={err_cached:.2e}")
    assert np.abs(hf_logits).max() > 1.0  # the comparison is not between near-zero logits
    assert err_full <= 1e-3
    assert err_cached <= 1e-3


@pytest.mark.slow
def test_multimodal_gemma3_checkpoint_text_path(tmp_path):
    """A multimodal "gemma3" checkpoint loads as its language model (text-only logits)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from mlx_lm.utils import load

    torch.manual_seed(7)
    text = transformers.Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        num_hidden_layers=2,
        head_dim=16,
        sliding_window=6,
    )
    vision = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
    )
    config = transformers.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        boi_token_index=297,
        eoi_token_index=298,
        image_token_index=299,
    )
    hf = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    _randomize(hf, torch)
    hf.save_pretrained(tmp_path)
    save_wordlevel_tokenizer(tmp_path, 300)
    tokens = torch.randint(0, 290, (1, 16))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits.float().numpy()

    model, _ = load(str(tmp_path))
    got = np.array(_cached_logits(model, mx.array(tokens.numpy()), prefill=10))
    print(f"\ngemma3 (multimodal checkpoint): max |dlogit| cached={np.abs(got - want).max():.2e}")
    assert np.abs(want).max() > 1.0
    assert np.abs(got - want).max() <= 1e-3
