"""Streaming detokenizers, TokenizerWrapper and load_tokenizer.

The tokenizers are trained here on a few strings with the `tokenizers` library
(no network): a GPT-2 style byte-level BPE and a Llama-style SentencePiece BPE
with byte fallback. The contract checked everywhere: all the streamed segments
together give `tokenizer.decode(all_tokens)`, every segment is free of U+FFFD,
the text so far is always a prefix of the final text, and nothing complete is
held back.

Importing transformers takes several seconds here (it imports torch), so the fast
tests drive the detokenizers through `RawTokenizer`, the few methods of the Hugging
Face tokenizer API they use, over a bare `tokenizers.Tokenizer`; the tests that go
through transformers (load_tokenizer, clean-up, chat templates, real GGUF
vocabularies) are marked slow.
"""

import importlib.util
import json
import random
import shutil
from functools import partial

import pytest

tokenizers = pytest.importorskip("tokenizers")

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
    _detokenizer_class_for,
    load_tokenizer,
)

TRAIN = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, café naïve résumé. Ça va?",
    "你好，世界！日本語のテキスト。한국어 텍스트.",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "  leading spaces\n\nnew lines\tand tabs   multiple   spaces",
    "I don't think it's right , isn't it ? They're here .",
]

TEXTS = TRAIN + [
    # Text the tokenizers were not trained on: more byte-level pieces.
    "Ünïcödé 🧑🏽‍🚀 astronaut and 中文混合 text",
    "   three leading spaces",
    " one leading space",
    "trailing spaces  ",
    "\nstarts with a newline\n\n\nand ends with one\n",
    "flags 🇯🇵🇰🇷 and family 👩‍👩‍👦 and keycap 1️⃣",
    "Zalgo: Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǵ̟o",
    "Ελληνικά, русский, עברית, العربية, हिन्दी",
]

SPM_DECODER = [
    decoders.Replace("▁", " "),
    decoders.ByteFallback(),
    decoders.Fuse(),
    decoders.Strip(" ", 1, 0),
]


class RawTokenizer:
    """The part of the Hugging Face tokenizer API the detokenizers and the wrapper use,
    over a bare `tokenizers.Tokenizer` (decode as transformers does without clean-up)."""

    clean_up_tokenization_spaces = False

    def __init__(self, tok: Tokenizer, eos_token: str):
        self.backend_tokenizer = tok
        self.eos_token = eos_token
        self.eos_token_id = tok.token_to_id(eos_token)

    def get_vocab(self):
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text, add_special_tokens=False):
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.backend_tokenizer.id_to_token(i) for i in ids]


def _bpe():
    """A GPT-2 style byte-level BPE tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN, trainer)
    return RawTokenizer(tok, "<|endoftext|>")


def _spm(strip=True):
    """A Llama-style SentencePiece BPE with byte fallback. Trained without the CJK and
    emoji lines, so those go through <0xXX> byte tokens."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(SPM_DECODER if strip else SPM_DECODER[:3])
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"] + byte_tokens,
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN[:2] + TRAIN[4:], trainer)
    return RawTokenizer(tok, "</s>")


def _save(raw: RawTokenizer, path, **config):
    """Save as a Hugging Face tokenizer directory (imports transformers: slow tests)."""
    from transformers import PreTrainedTokenizerFast

    special = {"eos_token": raw.eos_token}
    if raw.backend_tokenizer.token_to_id("<unk>") is not None:
        special.update(bos_token="<s>", unk_token="<unk>")
    hf = PreTrainedTokenizerFast(tokenizer_object=raw.backend_tokenizer, **special, **config)
    hf.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def bpe():
    return _bpe()


@pytest.fixture(scope="module")
def spm():
    return _spm()


@pytest.fixture(scope="module")
def spm_nostrip():
    return _spm(strip=False)


DETOKENIZERS = {
    "bpe": BPEStreamingDetokenizer,
    "spm": SPMStreamingDetokenizer,
    "spm_nostrip": partial(SPMStreamingDetokenizer, trim_space=False),
}


def _encode(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False)


def check_stream(detokenizer, tokenizer, ids, prompt=True):
    """Stream `ids`; check the segments against `tokenizer.decode(ids)`.

    With `prompt`, also check that text is not held back needlessly: after each token
    the stream holds at least the text of the longest prefix of tokens that decodes
    without U+FFFD (an incomplete character).
    """
    expected = tokenizer.decode(ids)
    detokenizer.reset()
    segments = []
    complete = ""
    for i, t in enumerate(ids):
        detokenizer.add_token(t)
        assert expected.startswith(detokenizer.text), (i, detokenizer.text)
        if prompt:
            partial = tokenizer.decode(ids[: i + 1])
            complete = complete if "\ufffd" in partial else partial
            assert len(detokenizer.text) >= len(complete), (i, complete, detokenizer.text)
        segment = detokenizer.last_segment
        assert "\ufffd" not in segment, (i, segment)
        segments.append(segment)
    detokenizer.finalize()
    segments.append(detokenizer.last_segment)
    assert "".join(segments) == expected
    assert detokenizer.text == expected
    assert detokenizer.tokens == list(ids)
    assert detokenizer.last_segment == ""
    for s in segments:
        s.encode("utf-8")  # no lone surrogates: code points are whole
    return segments


def check_bpe_prompt(detokenizer, tokenizer, ids):
    """Byte-level BPE: after each token the stream is exactly decode() of the tokens
    so far without the U+FFFD of a trailing incomplete character."""
    detokenizer.reset()
    for i, t in enumerate(ids):
        detokenizer.add_token(t)
        assert detokenizer.text == tokenizer.decode(ids[: i + 1]).rstrip("\ufffd"), i


def test_detokenizer_class_from_decoder(bpe, spm, spm_nostrip):
    def pick(raw):
        return _detokenizer_class_for(json.loads(raw.backend_tokenizer.to_str()))

    assert pick(bpe) is BPEStreamingDetokenizer
    cls = pick(spm)
    assert cls.func is SPMStreamingDetokenizer and cls.keywords == {"trim_space": True}
    cls = pick(spm_nostrip)
    assert cls.func is SPMStreamingDetokenizer and cls.keywords == {"trim_space": False}
    steps = json.loads(spm.backend_tokenizer.to_str())["decoder"]["decoders"]
    # Strip before Fuse strips every token: not what SPMStreamingDetokenizer does.
    swapped = [steps[0], steps[1], steps[3], steps[2]]
    naive = NaiveStreamingDetokenizer
    assert _detokenizer_class_for({"decoder": {"type": "Sequence", "decoders": swapped}}) is naive
    no_bytes = [steps[0], steps[2]]
    assert _detokenizer_class_for({"decoder": {"type": "Sequence", "decoders": no_bytes}}) is naive
    assert _detokenizer_class_for({"decoder": {"type": "Metaspace"}}) is naive
    assert _detokenizer_class_for({"decoder": None}) is naive
    assert _detokenizer_class_for({}) is naive


def test_tokenizers_exercise_byte_pieces(bpe, spm):
    """Guard for the tests below: the texts really split characters across tokens."""
    ids = _encode(bpe, "你好 😀")
    assert any("\ufffd" in bpe.decode(ids[:i]) for i in range(1, len(ids)))
    pieces = spm.convert_ids_to_tokens(_encode(spm, "你好 👨‍👩‍👧‍👦"))
    assert sum(p.startswith("<0x") for p in pieces) >= 10


@pytest.mark.parametrize("name", ["bpe", "spm", "spm_nostrip"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_decode(name, text, request):
    tokenizer = request.getfixturevalue(name)
    ids = _encode(tokenizer, text)
    decoded = tokenizer.decode(ids)
    # The round trip is exact (up to the leading space the SPM normalizer adds).
    assert decoded == (" " + text if name == "spm_nostrip" else text)
    check_stream(DETOKENIZERS[name](tokenizer), tokenizer, ids)
    if name == "bpe":
        check_bpe_prompt(BPEStreamingDetokenizer(tokenizer), tokenizer, ids)
    check_stream(NaiveStreamingDetokenizer(tokenizer), tokenizer, ids)


@pytest.mark.parametrize("name", ["bpe", "spm"])
def test_stream_with_special_tokens_and_reset(name, request):
    tokenizer = request.getfixturevalue(name)
    ids = _encode(tokenizer, TEXTS[6]) + [tokenizer.eos_token_id] + _encode(tokenizer, "😀 ok")
    for detokenizer in (DETOKENIZERS[name](tokenizer), NaiveStreamingDetokenizer(tokenizer)):
        check_stream(detokenizer, tokenizer, ids)
        check_stream(detokenizer, tokenizer, ids[5:])  # reused after reset()


def test_stream_segments_split_only_between_code_points(spm):
    """A family emoji (7 code points, 25 bytes) from byte tokens: each segment holds
    whole code points, and the text grows as soon as each one is complete."""
    family = "👨‍👩‍👧‍👦"
    ids = _encode(spm, "x " + family)
    detokenizer = SPMStreamingDetokenizer(spm)
    seen = []
    for t in ids:
        detokenizer.add_token(t)
        seen.append(detokenizer.last_segment)
    detokenizer.finalize()
    assert detokenizer.last_segment == ""
    pieces = [s for s in seen if s]
    assert "".join(pieces) == "x " + family
    # Code points arrive one by one as their last byte token is added.
    assert [c for c in family] == [s for s in pieces if s[0] in family]


def test_bpe_random_tokens_match_lossy_decode(bpe):
    """Random ids include invalid UTF-8: the stream equals decode() once finalized, and
    a U+FFFD is emitted only for bytes that are known to be invalid."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(bpe)) for _ in range(rng.randrange(1, 30))]
        expected = bpe.decode(ids)
        detokenizer = BPEStreamingDetokenizer(bpe)
        for t in ids:
            detokenizer.add_token(t)
            assert expected.startswith(detokenizer.text)
        detokenizer.finalize()
        assert detokenizer.text == expected


def test_unknown_ids_decode_to_nothing(bpe, spm):
    """Ids past the vocabulary (padded embedding rows) decode to "" like decode() does."""
    for tokenizer, cls in ((bpe, BPEStreamingDetokenizer), (spm, SPMStreamingDetokenizer)):
        ids = _encode(tokenizer, "Hello world") + [len(tokenizer) + 5]
        check_stream(cls(tokenizer), tokenizer, ids)


def test_wrapper_forwards_and_eos(bpe):
    wrapper = TokenizerWrapper(bpe, BPEStreamingDetokenizer)
    assert wrapper.encode("Hello") == bpe.encode("Hello")
    assert wrapper.convert_ids_to_tokens([5]) == bpe.convert_ids_to_tokens([5])
    assert len(wrapper) == len(bpe)
    first = wrapper.detokenizer
    assert type(first) is BPEStreamingDetokenizer and wrapper.detokenizer is not first
    first.add_token(5)
    assert wrapper.detokenizer.tokens == []
    eos = bpe.eos_token_id
    assert wrapper.eos_token_ids == {eos}
    he = bpe.get_vocab()["He"]
    wrapper.add_eos_token("He")
    wrapper.add_eos_token(7)
    # A digit string is a token if the vocabulary has it, otherwise an id.
    assert "250" not in bpe.get_vocab()
    wrapper.add_eos_token("250")
    wrapper.add_eos_token("9")
    nine = bpe.get_vocab()["9"]
    assert nine != 9
    assert wrapper.eos_token_ids == {eos, he, 7, 250, nine}
    with pytest.raises(ValueError, match="not a token"):
        wrapper.add_eos_token("definitely-not-a-token")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        wrapper.add_eos_token(10**9)
    assert TokenizerWrapper(bpe, eos_token_ids=[1, 2]).eos_token_ids == {1, 2}
    assert TokenizerWrapper(bpe, eos_token_ids=3).eos_token_ids == {3}
    with pytest.raises(ValueError, match="eos_token_ids"):
        TokenizerWrapper(bpe, eos_token_ids=["x"])
    # Writes to names the wrapper does not own go to the tokenizer.
    wrapper.some_setting = "left"
    assert bpe.some_setting == "left"
    del bpe.some_setting
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute
    assert not wrapper.has_chat_template and not wrapper.has_thinking


# ---------------------------------------------------------------------------------------
# Through transformers (slow: importing it imports torch)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, bpe, spm, spm_nostrip):
    root = tmp_path_factory.mktemp("hf")
    return {
        name: _save(raw, root / name)
        for name, raw in (("bpe", bpe), ("spm", spm), ("spm_nostrip", spm_nostrip))
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bpe", "spm", "spm_nostrip"])
def test_load_tokenizer_streams_like_decode(name, hf_dirs):
    tokenizer = load_tokenizer(hf_dirs[name])
    assert isinstance(tokenizer, TokenizerWrapper)
    expected_class = {"bpe": BPEStreamingDetokenizer}.get(name, SPMStreamingDetokenizer)
    assert type(tokenizer.detokenizer) is expected_class
    assert tokenizer.eos_token_ids == {tokenizer.eos_token_id}
    for text in TEXTS:
        ids = _encode(tokenizer, text)
        check_stream(tokenizer.detokenizer, tokenizer, ids)
        check_stream(NaiveStreamingDetokenizer(tokenizer._tokenizer), tokenizer, ids)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bpe", "spm"])
def test_clean_up_tokenization_spaces(name, hf_dirs):
    extra = {
        "clean_up_tokenization_spaces": True,
        # transformers 5 skips the clean-up for BPE models unless told this.
        "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True,
    }
    tokenizer = load_tokenizer(hf_dirs[name], tokenizer_config_extra=extra)
    text = "I don't think it's right , isn't it ? They're here . Yes ' no ' , ok !"
    ids = _encode(tokenizer, text)
    decoded = tokenizer.decode(ids)
    assert decoded != text and " ," not in decoded  # the clean-up is really on
    for detokenizer in (
        tokenizer.detokenizer,
        NaiveStreamingDetokenizer(tokenizer._tokenizer),
    ):
        check_stream(detokenizer, tokenizer, ids, prompt=False)
        # Only a short tail (at most " n'") is ever held back for the clean-up.
        detokenizer.reset()
        for i, t in enumerate(ids):
            detokenizer.add_token(t)
            now = tokenizer.decode(ids[: i + 1])
            assert len(now) - len(detokenizer.text) <= 3, (now, detokenizer.text)


@pytest.mark.slow
def test_chat_template(hf_dirs):
    tokenizer = load_tokenizer(hf_dirs["bpe"])
    assert not tokenizer.has_chat_template
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    wrapper = TokenizerWrapper(tokenizer._tokenizer, chat_template=template)
    assert wrapper.has_chat_template
    out = wrapper.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert out == "<user>hi"


@pytest.mark.slow
def test_load_tokenizer_eos_from_configs(hf_dirs, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(hf_dirs["bpe"], path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    (path / "config.json").write_text(json.dumps({"eos_token_id": 9, "model_type": "gpt2"}))
    tokenizer = load_tokenizer(path)
    eos = tokenizer._tokenizer.eos_token_id
    assert tokenizer.eos_token_ids == {5, 7, 9, eos}
    assert load_tokenizer(path, eos_token_ids=[3]).eos_token_ids == {3, eos}
    assert load_tokenizer(str(path), eos_token_ids=11).eos_token_ids == {11, eos}


def _gguf_tokenizer(path):
    from mlx_lm.gguf import load_gguf

    _, _, tokenizer = load_gguf(path)
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    return tokenizer


REAL_TEXTS = TEXTS + [
    "def f(x):\n    return x ** 2  # ✓ done\n",
    "<|im_start|>user\nHi 👋 there<|im_end|>\n",
    "Numbers 1234567 and 3.14159, URLs https://example.com/a?b=c",
]
needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("mlx_lm.gguf") is None, reason="mlx_lm/gguf.py is not written yet"
)


@pytest.mark.slow
@needs_gguf
def test_smollm2_tokenizer_stream(smollm2_gguf):
    """The real SmolLM2 vocabulary (byte-level BPE, 49k tokens)."""
    tokenizer = _gguf_tokenizer(smollm2_gguf)
    assert type(tokenizer.detokenizer) is BPEStreamingDetokenizer
    for text in REAL_TEXTS:
        ids = _encode(tokenizer, text)
        check_stream(tokenizer.detokenizer, tokenizer, ids)
        check_bpe_prompt(tokenizer.detokenizer, tokenizer, ids)
        check_stream(NaiveStreamingDetokenizer(tokenizer._tokenizer), tokenizer, ids)


@pytest.mark.slow
@needs_gguf
def test_gemma3_tokenizer_stream(gemma3_gguf):
    """The real Gemma 3 vocabulary (SentencePiece BPE with byte fallback, 262k tokens).
    Only the tokenizer is built: loading the weights would take far longer."""
    from mlx_lm import gguf

    if not all(hasattr(gguf, f) for f in ("GGUFFile", "build_tokenizer", "wrap_tokenizer")):
        pytest.skip("mlx_lm.gguf has no GGUFFile/build_tokenizer/wrap_tokenizer")
    meta = gguf.GGUFFile(gemma3_gguf).metadata
    tokenizer = gguf.wrap_tokenizer(gguf.build_tokenizer(meta), meta)
    assert type(tokenizer.detokenizer) is SPMStreamingDetokenizer
    rare = "Zalgo Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǵ̟o, hieroglyph 𓀀 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽"
    ids = _encode(tokenizer, rare)
    assert sum(p.startswith("<0x") for p in tokenizer.convert_ids_to_tokens(ids)) >= 10
    for text in REAL_TEXTS + [rare]:
        ids = _encode(tokenizer, text)
        check_stream(tokenizer.detokenizer, tokenizer, ids)
        check_stream(NaiveStreamingDetokenizer(tokenizer._tokenizer), tokenizer, ids)
