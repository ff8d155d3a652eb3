"""Tokenizer wrapper and streaming detokenizers.

A streaming detokenizer turns generated token ids into text one token at a time.
The contract every class here keeps: the concatenation of all ``last_segment``
reads (with one last read after ``finalize()``) equals ``tokenizer.decode(tokens)``
for valid UTF-8 output, and no segment ends inside a UTF-8 sequence or contains a
placeholder U+FFFD for bytes that are still to come.

- ``NaiveStreamingDetokenizer`` works with any tokenizer: it re-decodes a short
  window of recent tokens with ``tokenizer.decode``.
- ``SPMStreamingDetokenizer`` decodes SentencePiece pieces ("▁" for a space,
  ``<0xXX>`` byte-fallback tokens) itself.
- ``BPEStreamingDetokenizer`` decodes GPT-2 style byte-level BPE tokens itself.

``load_tokenizer`` picks the right one from ``tokenizer.json``'s decoder.
"""

import codecs
import json
import re
import weakref
from functools import partial
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

__all__ = [
    "StreamingDetokenizer",
    "NaiveStreamingDetokenizer",
    "SPMStreamingDetokenizer",
    "BPEStreamingDetokenizer",
    "TokenizerWrapper",
    "load_tokenizer",
]

# transformers' `clean_up_tokenization` replaces these (in this order) in the decoded
# text. Each starts with a space, so text ending in a proper prefix of one of them
# may still change when more text arrives: that tail is held back.
_CLEANUP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
_CLEANUP_PATTERNS = tuple(p for p, _ in _CLEANUP)
_CLEANUP_MAX = max(len(p) for p in _CLEANUP_PATTERNS)


def _clean_up_tokenization(text: str) -> str:
    for pattern, replacement in _CLEANUP:
        text = text.replace(pattern, replacement)
    return text


def _cleanup_cut(text: str) -> int:
    """Length of the prefix of `text` that no later text can change through cleanup."""
    cut = len(text)
    for k in range(1, min(_CLEANUP_MAX, len(text)) + 1):
        tail = text[-k:]
        if tail[0] == " " and any(p != tail and p.startswith(tail) for p in _CLEANUP_PATTERNS):
            cut = len(text) - k
    # " ' " has a space inside: a held tail may be the end of one that started earlier.
    if text[cut - 2 : cut] == " '" and cut < len(text):
        cut -= 2
    return cut


def _decode_cleans_spaces(tokenizer) -> bool:
    """Whether `tokenizer.decode` applies transformers' space clean-up.

    Measured rather than read from the config: transformers 5 ignores
    `clean_up_tokenization_spaces` for BPE models unless told otherwise.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    flag = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
    if backend is None or not flag:
        return flag
    try:
        ids = tokenizer.encode("a , b", add_special_tokens=False)
        raw = backend.decode(ids, skip_special_tokens=False)
        if " ," in raw:
            return " ," not in tokenizer.decode(ids)
    except Exception:
        pass
    return flag


class StreamingDetokenizer:
    """Incremental detokenizer interface.

    Attributes:
        text: all the text produced so far.
        tokens: all the tokens added since the last ``reset()``.
        offset: how much of ``text`` the previous ``last_segment`` reads returned.
    """

    def __init__(self):
        self.text = ""
        self.tokens: List[int] = []
        self.offset = 0
        self._clean_spaces = False
        self._raw = ""

    def _emit(self, text: str, final: bool = False):
        """Append decoded text, applying the space clean-up when `tokenizer.decode` does.

        The clean-up runs on the raw text, holding back a tail that later text could
        still turn into a clean-up pattern.
        """
        if not self._clean_spaces:
            self.text += text
            return
        raw = self._raw + text
        cut = len(raw) if final else _cleanup_cut(raw)
        self.text += _clean_up_tokenization(raw[:cut])
        self._raw = raw[cut:]

    def reset(self):
        """Forget every token and all the text."""
        raise NotImplementedError

    def add_token(self, token: int):
        """Add one generated token id."""
        raise NotImplementedError

    def finalize(self):
        """Flush any text held back; call once after the last token."""
        raise NotImplementedError

    @property
    def last_segment(self) -> str:
        """The text produced since the previous read."""
        segment = self.text[self.offset :]
        self.offset = len(self.text)
        return segment


class NaiveStreamingDetokenizer(StreamingDetokenizer):
    """Detokenize with `tokenizer.decode`, for any tokenizer.

    Text is emitted as the difference between decoding the recent tokens with and
    without the newest ones; decoding the previous tokens as context keeps the
    tokenizer's word-boundary handling (such as leading-space stripping) right.
    Text ending in U+FFFD (an incomplete character) is held until more tokens
    complete it. The space clean-up, when ``decode`` applies it, is applied here to
    the raw text (it depends on neighbouring text, so windows cannot be cleaned).
    """

    def __init__(self, tokenizer):
        super().__init__()
        self._tokenizer = tokenizer
        self._clean_spaces = _decode_cleans_spaces(tokenizer)
        self.reset()

    def reset(self):
        self.text = ""
        self.tokens = []
        self.offset = 0
        self._raw = ""
        # tokens[_prefix:_read] decode to the context for the new tokens tokens[_read:].
        self._prefix = 0
        self._read = 0

    def _decode(self, tokens: List[int]) -> str:
        if self._clean_spaces:
            return self._tokenizer.decode(tokens, clean_up_tokenization_spaces=False)
        return self._tokenizer.decode(tokens)

    def _pending(self):
        context = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        return context, full

    def add_token(self, token: int):
        self.tokens.append(int(token))
        context, full = self._pending()
        # (If `full` does not extend `context`, the tokenizer rewrote text that was
        # already emitted; nothing can take it back, so go on from the same length.)
        if len(full) <= len(context) or full.endswith("\ufffd"):
            return
        self._emit(full[len(context) :])
        self._prefix, self._read = self._read, len(self.tokens)

    def finalize(self):
        context, full = self._pending()
        self._emit(full[len(context) :], final=True)
        self._prefix = self._read = len(self.tokens)


class _ByteStreamDetokenizer(StreamingDetokenizer):
    """Shared machinery for detokenizers that map tokens to bytes themselves:
    incremental UTF-8 decoding, the optional leading-space strip and clean-up."""

    _tables = weakref.WeakKeyDictionary()

    def __init__(self, tokenizer):
        super().__init__()
        self._clean_spaces = _decode_cleans_spaces(tokenizer)
        self._tokenmap = self._token_table(tokenizer)
        self._trim_space = False
        self.reset()

    def _token_table(self, tokenizer) -> List[bytes]:
        """id -> bytes for every id of the vocabulary (added tokens included), built
        once per tokenizer object and vocabulary size."""
        key = (type(self).__name__, len(tokenizer))
        try:
            cached = self._tables.setdefault(tokenizer, {})
        except TypeError:  # not weak-referenceable
            cached = {}
        if key not in cached:
            vocab = tokenizer.get_vocab()
            table = [b""] * (max(vocab.values(), default=-1) + 1)
            for piece, i in vocab.items():
                table[i] = self._piece_bytes(piece)
            cached[key] = table
        return cached[key]

    def _piece_bytes(self, piece: str):
        raise NotImplementedError

    def reset(self):
        self.text = ""
        self.tokens = []
        self.offset = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._raw = ""  # decoded text held back for the clean-up
        self._started = False  # whether any character has been produced yet

    def _bytes(self, token: int):
        return self._tokenmap[token] if 0 <= token < len(self._tokenmap) else b""

    def _push(self, text: str, final: bool = False):
        if text and not self._started:
            self._started = True
            if self._trim_space and text[0] == " ":
                text = text[1:]
        self._emit(text, final)

    def add_token(self, token: int):
        token = int(token)
        self.tokens.append(token)
        self._push(self._utf8.decode(self._bytes(token)))

    def finalize(self):
        self._push(self._utf8.decode(b"", final=True), final=True)


class SPMStreamingDetokenizer(_ByteStreamDetokenizer):
    """Streaming detokenizer for SentencePiece pieces: "▁" is a space, ``<0xXX>``
    is one byte (byte fallback).

    Args:
        tokenizer: the Hugging Face tokenizer.
        trim_space: drop the space that starts the text, as the usual decoder's
            ``Strip(" ", 1, 0)`` step does.

    Like the ``ByteFallback`` decoder, a run of byte tokens that does not form
    valid UTF-8 becomes one U+FFFD per byte, emitted once a non-byte token (or
    ``finalize``) ends the run; valid characters are emitted as soon as complete.
    """

    _byte_piece = re.compile(r"<0x([0-9A-Fa-f]{2})>")

    def __init__(self, tokenizer, trim_space: bool = True):
        super().__init__(tokenizer)
        self._trim_space = trim_space

    def _piece_bytes(self, piece: str):
        m = self._byte_piece.fullmatch(piece)
        if m:
            return int(m.group(1), 16)  # an int marks a byte-fallback token
        return piece.replace("\u2581", " ").encode("utf-8")

    def _flush_bytes(self, final: bool):
        """End a run of byte tokens: bytes left over are invalid, one U+FFFD each."""
        left = self._utf8.getstate()[0]
        self._utf8.reset()
        self._push("\ufffd" * len(left), final=final)

    def add_token(self, token: int):
        token = int(token)
        self.tokens.append(token)
        piece = self._bytes(token)
        if isinstance(piece, int):
            self._push(self._utf8.decode(bytes([piece])))
        else:
            self._flush_bytes(final=False)
            self._push(piece.decode("utf-8"))

    def finalize(self):
        self._flush_bytes(final=True)


# GPT-2's byte <-> printable-character table: bytes that are printable Latin-1
# characters stand for themselves, the others are shifted to U+0100 and up in order.
def _byte_level_decoder() -> Dict[str, int]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


_BYTE_DECODER = _byte_level_decoder()


class BPEStreamingDetokenizer(_ByteStreamDetokenizer):
    """Streaming detokenizer for GPT-2 style byte-level BPE (the ``ByteLevel``
    decoder): each character of a token stands for one byte.

    Text is emitted as soon as it is complete UTF-8. Like the ``ByteLevel`` decoder,
    a token with a character outside the byte table (an added token such as
    ``"<think>\\n"``) contributes its own UTF-8 bytes, and leading spaces are kept.
    Invalid bytes become U+FFFD as in a lossy UTF-8 decode.
    """

    def _piece_bytes(self, piece: str) -> bytes:
        try:
            return bytes(_BYTE_DECODER[c] for c in piece)
        except KeyError:
            return piece.encode("utf-8")


class TokenizerWrapper:
    """A Hugging Face tokenizer plus a streaming detokenizer and the EOS token set.

    Attributes the wrapper does not define are read from (and written to) the
    wrapped tokenizer, so it can be used wherever the tokenizer is.

    Args:
        tokenizer: the Hugging Face tokenizer.
        detokenizer_class: class (or factory) of the streaming detokenizer.
        eos_token_ids: token ids that end generation (int or iterable); default
            ``{tokenizer.eos_token_id}``.
        chat_template: a chat template overriding the tokenizer's own.
    """

    def __init__(
        self,
        tokenizer,
        detokenizer_class=NaiveStreamingDetokenizer,
        eos_token_ids: Optional[Union[int, Iterable[int]]] = None,
        chat_template: Optional[str] = None,
    ):
        self._tokenizer = tokenizer
        self._detokenizer_class = detokenizer_class
        self._chat_template = chat_template
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [] if eos is None else [eos]
        self.eos_token_ids = eos_token_ids

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (a new one each access)."""
        return self._detokenizer_class(self._tokenizer)

    @property
    def eos_token_ids(self) -> set:
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: Union[int, Iterable[int]]):
        ids = [ids] if isinstance(ids, int) else list(ids)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or i < 0:
                raise ValueError(f"eos_token_ids must be non-negative token ids, got {i!r}.")
        self._eos_token_ids = set(ids)

    def add_eos_token(self, token: Union[str, int]):
        """Make `token` (a token string, or an id as int or digit string) end generation."""
        if isinstance(token, int) and not isinstance(token, bool):
            token_id = token
        elif isinstance(token, str):
            vocab = self._tokenizer.get_vocab()
            if token in vocab:
                token_id = vocab[token]
            elif token.isdigit():
                token_id = int(token)
            else:
                raise ValueError(
                    f"'{token}' is not a token of this tokenizer; pass an exact token "
                    "string from its vocabulary or a token id."
                )
        else:
            raise ValueError(f"add_eos_token takes a token string or id, got {token!r}.")
        if not 0 <= token_id < len(self._tokenizer):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary (size {len(self._tokenizer)})."
            )
        self._eos_token_ids.add(token_id)

    @property
    def has_chat_template(self) -> bool:
        return bool(self._chat_template or getattr(self._tokenizer, "chat_template", None))

    def apply_chat_template(self, *args, **kwargs):
        """`tokenizer.apply_chat_template`, with the wrapper's template by default."""
        if self._chat_template is not None and kwargs.get("chat_template") is None:
            kwargs["chat_template"] = self._chat_template
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    @property
    def has_thinking(self) -> bool:
        return self.think_start is not None

    @property
    def think_start(self) -> Optional[str]:
        return "<think>" if "<think>" in self._tokenizer.get_vocab() else None

    @property
    def think_end(self) -> Optional[str]:
        return "</think>" if "</think>" in self._tokenizer.get_vocab() else None

    def __len__(self):
        return len(self._tokenizer)

    def __call__(self, *args, **kwargs):
        return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails; private names are never forwarded
        # (and must not recurse while `_tokenizer` itself is unset, e.g. in copy).
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._tokenizer, name)

    def __setattr__(self, name: str, value: Any):
        if name.startswith("_") or hasattr(type(self), name):
            object.__setattr__(self, name, value)
        else:
            setattr(self._tokenizer, name, value)


def _spm_trim_space(decoder: Dict[str, Any]) -> Optional[bool]:
    """For a SentencePiece decoder Sequence, whether it strips the leading space
    (a Strip step after Fuse); None when the sequence is not one SPM can mirror."""
    steps = decoder.get("decoders") or []
    types = [s.get("type") for s in steps]
    replaces_space = any(
        s.get("type") == "Replace"
        and s.get("pattern", {}).get("String") == "\u2581"
        and s.get("content") == " "
        for s in steps
    )
    if not replaces_space or "ByteFallback" not in types:
        return None
    trim = False
    for i, s in enumerate(steps):
        if s.get("type") == "Strip":
            # A Strip before Fuse would strip every token, not just the text start.
            if "Fuse" not in types[:i] or s.get("content") != " " or s.get("stop", 0) != 0:
                return None
            trim = s.get("start", 0) >= 1
        elif s.get("type") not in ("Replace", "ByteFallback", "Fuse"):
            return None
    return trim


def _detokenizer_class_for(tokenizer_json: Dict[str, Any]):
    decoder = tokenizer_json.get("decoder") or {}
    if decoder.get("type") == "ByteLevel":
        return BPEStreamingDetokenizer
    if decoder.get("type") == "Sequence":
        trim = _spm_trim_space(decoder)
        if trim is not None:
            return partial(SPMStreamingDetokenizer, trim_space=trim)
    return NaiveStreamingDetokenizer


def _eos_from_file(path: Path) -> List[int]:
    if not path.is_file():
        return []
    with open(path, "r", encoding="utf-8") as f:
        eos = json.load(f).get("eos_token_id")
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


def load_tokenizer(
    model_path: Union[str, Path],
    tokenizer_config_extra: Optional[Dict[str, Any]] = None,
    eos_token_ids: Optional[Union[int, Iterable[int]]] = None,
) -> TokenizerWrapper:
    """Load the Hugging Face tokenizer of `model_path` in a `TokenizerWrapper`.

    The streaming detokenizer follows tokenizer.json's decoder: ``ByteLevel`` gets
    `BPEStreamingDetokenizer`, the SentencePiece sequence (Replace "▁", ByteFallback,
    Fuse, optional Strip) gets `SPMStreamingDetokenizer`, anything else the naive one.

    EOS ids: `eos_token_ids` if given, else those of generation_config.json and
    config.json (``eos_token_id``, int or list); the tokenizer's own EOS is always added.
    """
    from transformers import AutoTokenizer

    model_path = Path(model_path)
    tokenizer = AutoTokenizer.from_pretrained(str(model_path), **(tokenizer_config_extra or {}))

    detokenizer_class = NaiveStreamingDetokenizer
    tokenizer_file = model_path / "tokenizer.json"
    if tokenizer_file.is_file():
        with open(tokenizer_file, "r", encoding="utf-8") as f:
            detokenizer_class = _detokenizer_class_for(json.load(f))

    if eos_token_ids is None:
        ids = _eos_from_file(model_path / "generation_config.json")
        ids += _eos_from_file(model_path / "config.json")
    else:
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    return TokenizerWrapper(tokenizer, detokenizer_class, eos_token_ids=ids)
