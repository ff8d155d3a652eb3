"""GGUF loading: block conversion, Q/K un-permutation, config, tokenizer, real-model logits.

The slow tests compare against llama.cpp's own dequantizer (`gguf.quants`) and against
transformers' GGUF loader (tokenizer and float32 model).
"""

import os

import mlx.core as mx
import numpy as np
import pytest

from mlx_lm import gguf as G

TEXTS = [
    "Hello world! How are you today?",
    "The year 2024 had 12345 events and 3.14159 pi.",
    "def foo(x):\n    return x ** 2  # square\n\n\tprint('done')",
    "Emoji: 😀🎉👍🏽 ok",
    "中文测试：你好，世界。日本語もテスト。",
    "Café naïve résumé über Straße",
    "  leading spaces and   multiple   gaps  ",
    "mixed\r\nline endings\n\n\nand tabs\t\t!",
    "don't can't WE'LL it's",
    "ŝ ∑ ∫ ≈ ≠ → \u00a0nbsp \u200bzero width",
]

PROMPT = (
    "The history of astronomy is long and rich. Ancient peoples watched the sky to track "
    "seasons, navigate the seas and mark religious festivals. Babylonian astronomers recorded "
    "the motions of the planets on clay tablets, and Greek thinkers such as Hipparchus and "
    "Ptolemy built geometric models, and Copernicus later placed the Sun at the centre of the "
    "known universe, changing science forever."
)


# ------------------------------------------------------------------------------ fast tests


def test_unpermute_inverts_llama_cpp_permutation():
    # llama.cpp's convert script: reshape(heads, 2, d/2, ...).swapaxes(1, 2).
    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    permuted = (
        w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(heads * head_dim, cols)
    )
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(G.permute_qk(w, heads), permuted)
    np.testing.assert_array_equal(G.unpermute_qk(permuted, heads), w)
    # The same on MLX arrays, and on 1-D rows (biases of a projection).
    np.testing.assert_array_equal(np.array(G.unpermute_qk(mx.array(permuted), heads)), w)
    np.testing.assert_array_equal(G.unpermute_qk(permuted[:, 0], heads), w[:, 0])
    # Interleaved rows (x0, y0, x1, y1, ...) of head 0 become (x0, x1, ..., y0, y1, ...).
    np.testing.assert_array_equal(G.permute_qk(w, heads)[:4, 0], w[[0, 4, 1, 5], 0])


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(3, 96)).astype(np.uint8)
    packed = mx.array(G._pack(codes, bits))
    ones, zeros = mx.ones((3, 3)), mx.zeros((3, 3))
    out = mx.dequantize(packed, ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(out), codes)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_block_conversion_is_exact(type_name):
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[type_name]
    x = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    raw = quants.quantize(x, qtype)
    ref = quants.dequantize(raw, qtype)
    w, s, b, bits = G.convert_quantized(raw, type_name, x.shape)
    assert w.dtype == mx.uint32 and s.shape == (6, 4) and b.shape == (6, 4)
    assert bits == {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}[type_name]
    out = np.array(mx.dequantize(w, s, b, group_size=32, bits=bits))
    np.testing.assert_array_equal(out, ref)


def test_unsupported_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mamba.*llama, qwen2, gemma3"):
        G.make_config({"general.architecture": "mamba"}, set())


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + bytes(60))
    with pytest.raises(ValueError, match="not a GGUF"):
        G.GGUFFile(str(bad))


def test_hf_names():
    assert G.hf_name("token_embd.weight", "llama") == "model.embed_tokens.weight"
    assert G.hf_name("output.weight", "llama") == "lm_head.weight"
    assert (
        G.hf_name("blk.3.ffn_norm.weight", "llama")
        == "model.layers.3.post_attention_layernorm.weight"
    )
    assert (
        G.hf_name("blk.3.ffn_norm.weight", "gemma3")
        == "model.layers.3.pre_feedforward_layernorm.weight"
    )
    assert (
        G.hf_name("blk.0.post_attention_norm.weight", "gemma3")
        == "model.layers.0.post_attention_layernorm.weight"
    )
    assert G.hf_name("blk.2.attn_q.bias", "qwen2") == "model.layers.2.self_attn.q_proj.bias"
    assert G.hf_name("rope_freqs.weight", "llama") is None


# ------------------------------------------------------------------------------ real files


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return smollm2_gguf, G.load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    return gemma3_gguf, G.load_gguf(gemma3_gguf)


def _check_weights_against_llama_cpp(path, config, weights):
    """Every tensor, dequantized, equals llama.cpp's float decode (after un-permuting and
    the Gemma norm shift); only re-quantized types differ, by their documented error."""
    gf = G.GGUFFile(path)
    arch = gf.metadata["general.architecture"]
    quant = config["quantization"]
    worst = {}
    for gguf_name, (qtype, shape, _) in gf.tensors.items():
        name = G.hf_name(gguf_name, arch)
        module = name.rpartition(".")[0]
        ref = gf.float_tensor(gguf_name)
        if f"{module}.scales" in weights:
            q = quant[module]
            assert weights[name].dtype == mx.uint32
            ours = mx.dequantize(
                weights[name], weights[f"{module}.scales"], weights[f"{module}.biases"], **q
            )
            ours = np.array(ours)
        else:
            ours = np.array(weights[name])
        assert ours.shape == shape, name
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            key = "num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"
            ours = G.permute_qk(ours, config[key])
        if arch == "gemma3" and name.endswith("norm.weight"):
            ours = ours + 1.0
        rel = np.sqrt(np.mean((ours - ref) ** 2) / np.mean(ref**2))
        worst[qtype.name] = max(worst.get(qtype.name, 0.0), rel)
    return worst


@pytest.mark.slow
def test_smollm2_config_and_weights(smollm2):
    path, (config, weights, _) = smollm2
    assert config["model_type"] == "llama"
    expected = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9)
    expected.update(num_key_value_heads=3, head_dim=64, intermediate_size=1536, vocab_size=49152)
    assert {k: config[k] for k in expected} == expected
    assert config["rope_theta"] == 100000.0 and config["tie_word_embeddings"] is True
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (32, 4)
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 4}  # Q4_1
    assert q["model.embed_tokens"] == {"group_size": 32, "bits": 8}  # Q8_0
    assert "lm_head.weight" not in weights
    assert weights["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536 * 4 // 32)
    assert weights["model.layers.29.mlp.down_proj.scales"].shape == (576, 1536 // 32)
    assert weights["model.norm.weight"].dtype == mx.float32
    # Q4_1 and Q8_0 are repacked bit for bit: exactly llama.cpp's values.
    worst = _check_weights_against_llama_cpp(path, config, weights)
    assert worst == {"Q4_1": 0.0, "Q8_0": 0.0, "F32": 0.0}


@pytest.mark.slow
def test_smollm2_matches_mx_load_bit_exactly(smollm2):
    """mx.load decodes Q4_1/Q8_0 correctly (only K-quants are wrong there): same triplets."""
    path, (config, weights, _) = smollm2
    ref = mx.load(path)
    for gname, name in [
        ("blk.0.attn_v.weight", "model.layers.0.self_attn.v_proj"),
        ("token_embd.weight", "model.embed_tokens"),
    ]:
        for suffix in ("weight", "scales", "biases"):
            r = ref[gname.replace("weight", suffix)] if suffix != "weight" else ref[gname]
            assert np.array_equal(
                np.array(weights[f"{name}.{suffix}"]),
                np.array(r.astype(mx.float32) if suffix != "weight" else r),
            ), (name, suffix)


@pytest.mark.slow
def test_gemma3_config_and_weights(gemma3):
    path, (config, weights, _) = gemma3
    assert config["model_type"] == "gemma3_text"
    assert config["head_dim"] == 256 and config["num_key_value_heads"] == 1
    assert config["sliding_window"] == 512 and config["query_pre_attn_scalar"] == 256
    assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config["rope_theta"] == 1e6 and config["rope_local_base_freq"] == 1e4
    q = config["quantization"]
    assert q["model.layers.0.self_attn.q_proj"] == {"group_size": 32, "bits": 5}  # Q5_0
    assert q["model.layers.0.self_attn.o_proj"] == {"group_size": 32, "bits": 4}  # Q4_K
    assert q["model.layers.0.mlp.down_proj"] == {"group_size": 32, "bits": 8}  # Q6_K
    for n in ("q_norm", "k_norm"):
        assert f"model.layers.0.self_attn.{n}.weight" in weights
    for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
        assert f"model.layers.17.{n}.weight" in weights
    worst = _check_weights_against_llama_cpp(path, config, weights)
    exact = {k: v for k, v in worst.items() if k != "Q6_K"}
    assert exact == {"F32": 0.0, "Q8_0": 0.0, "Q5_0": 0.0, "Q4_K": 0.0}
    # Q6_K -> 8-bit re-quantization: 0.5% relative RMS error measured (see REQUANT_BITS).
    assert 0 < worst["Q6_K"] < 0.01


# ------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module", autouse=True)
def gguf_parsed_once():
    """While this module's tests run, every `gguf.GGUFReader` of a file is the first one
    made: transformers' GGUF loader parses a file's metadata for its config, again for
    its weights and again for a tokenizer, and Gemma 3's (its 262K-token vocabulary, a
    numpy view per string) took about 30 s a parse on the CI machine. The readers are
    only read; they are dropped with the module."""
    try:
        import gguf
    except ImportError:  # (the tests that need it skip)
        yield
        return
    made, readers = gguf.GGUFReader, {}

    def reader(path, *args, **kwargs):
        key = (os.path.realpath(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = made(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = made


def _hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    path, (_, _, tok) = smollm2
    ref = _hf_tokenizer(path)
    for text in TEXTS + ["<|im_start|>user\nHi<|im_end|>\n"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)) == text
    x = tok.convert_tokens_to_ids("x")
    assert tok.encode("<|im_start|>x<|im_end|>") == [1, x, 2]  # control tokens stay whole
    assert 2 in tok.eos_token_ids and tok.convert_tokens_to_ids("<|im_end|>") in tok.eos_token_ids
    assert "<|im_start|>" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False
    )


@pytest.mark.slow
def test_smollm2_digits_split_like_llama_cpp(smollm2):
    """llama.cpp's `smollm` pre-tokenizer isolates every digit before GPT-2's regex;
    transformers' converter keeps " 12345" in one piece (its BPE happens to give the same
    tokens only because this vocabulary has no multi-digit merges)."""
    _, (_, _, tok) = smollm2
    pieces = [
        p for p, _ in tok._tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str("a 12345b")
    ]
    assert pieces == ["a", "Ġ", "1", "2", "3", "4", "5", "b"]
    ids = tok.encode("12345")
    assert tok.convert_ids_to_tokens(ids) == ["1", "2", "3", "4", "5"]


@pytest.mark.slow
def test_gemma3_tokenizer_matches_transformers(gemma3):
    path, (_, _, tok) = gemma3
    ref = _hf_tokenizer(path)
    for text in TEXTS + ["<start_of_turn>user\nHi<end_of_turn>\n<bos>x"]:
        assert tok.encode(text) == ref.encode(text), text
        assert tok.decode(tok.encode(text)[1:]) == text  # [1:]: the added BOS
    # Control tokens are single tokens; BOS is added (add_bos_token is true in the file).
    ids = tok.encode("<start_of_turn>user\nHi<end_of_turn>")
    assert ids[:3] == [2, 105, 2364] and ids[-1] == 106
    assert {1, 106} <= set(tok.eos_token_ids)
    # The file has no chat template: Gemma's turn format is the fallback.
    chat = [{"role": "user", "content": "Hi"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


# ------------------------------------------------------------------------------ logits


def _reference_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    )
    return model.eval()


def _logits(model, ids):
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


def _greedy(model, ids, n):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(mx.array([ids]), cache=cache)
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits[0, -1]).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)
    return out


def _acceptance(path, loaded, float_bound, same_weight_bound):
    import torch

    from mlx_lm.utils import build_model

    config, weights, tok = loaded
    ids = tok.encode(PROMPT)[:64]
    assert len(ids) == 64
    ref = _reference_model(path)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
        ref_greedy = ref.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    ref_greedy = ref_greedy[0, len(ids) :].tolist()

    # 1. Our model with transformers' own float weights: isolates the model code.
    same = {k: mx.array(v.float().numpy()) for k, v in ref.state_dict().items()}
    plain = {k: v for k, v in config.items() if k != "quantization"}
    d_same = np.abs(_logits(build_model(plain, same, strict=False), ids) - ref_logits).max()

    # 2. Our GGUF weights, dequantized to float32.
    model = build_model(dict(config), dict(weights), dequantize=True)
    ours = _logits(model, ids)
    d_ours = np.abs(ours - ref_logits).max()
    print(f"max|dlogit|: same weights {d_same:.3g}, ours {d_ours:.3g}")
    assert d_same < same_weight_bound
    assert d_ours < float_bound
    assert np.mean(ours.argmax(-1) == ref_logits.argmax(-1)) >= 0.95
    assert _greedy(model, ids, 20) == ref_greedy


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    # Q4_1/Q8_0 are converted without loss, so both models hold the same float weights:
    # only float32 summation order differs (measured max|dlogit| 8e-5, logits up to ~34).
    path, loaded = smollm2
    _acceptance(path, loaded, float_bound=2e-3, same_weight_bound=2e-3)


@pytest.mark.slow
def test_gemma3_logits_match_transformers(gemma3):
    # All tensors are bit-exact except the nine Q6_K ffn_down matrices, re-quantized to
    # 8 bits (0.5% relative weight error): the bound allows for that, see the report.
    path, loaded = gemma3
    _acceptance(path, loaded, float_bound=0.5, same_weight_bound=2e-3)
