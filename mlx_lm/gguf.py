"""Load llama.cpp GGUF files: config, MLX weights and tokenizer.

    config, weights, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")

`config` is a Hugging Face style dict (plus a `quantization` entry in mlx-lm's per-layer
format), `weights` maps Hugging Face tensor names to MLX arrays (quantized ones as
`name.weight` uint32 / `name.scales` / `name.biases` triplets, group size 32), and
`tokenizer` is a `TokenizerWrapper` around a `PreTrainedTokenizerFast` built from the
vocabulary in the file.

Quantized tensors are converted from the raw GGUF blocks with numpy:

- Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q4_K are affine per 32 values (w = scale * q + bias
  with q an unsigned code), which is exactly MLX's affine format with group size 32: the
  codes are repacked bit for bit and the weights stay quantized with the same bits.
  (`mx.load` would give the same for Q4_0/Q4_1/Q8_0 but decodes Q4_K wrongly and fails on
  Q5_0, so it is not used.)
- Everything else (Q6_K with its 16-value sub-blocks, Q5_K, Q2_K, ...) is decoded to float
  with llama.cpp's `gguf` package and re-quantized to 8 bits, group 32; see REQUANT_BITS.
- F32/F16/BF16 tensors stay float (norms, and any unquantized matrix).

Scales and biases are float32: the products d * sub_scale of Q4_K are exact only in float32
(as in llama.cpp), dequantizing gives llama.cpp's float weights bit for bit, and on MLX's CPU
backend quantized matmuls run about 40x faster with float32 than with float16 activations
(float16 scales would turn the whole forward pass float16). Cast them for a float16 model.
"""

import re
import struct
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")

# Bits used when a GGUF type has no exact MLX equivalent and is re-quantized from its float
# decode (group size 32). Measured on Gemma 3 270M's nine Q6_K ffn_down matrices, relative
# RMS error of the re-quantized weight against llama.cpp's float decode: 4 bits 8.5%,
# 5 bits 4.2%, 6 bits 2.0%, 8 bits 0.50%. Q6_K's own rounding error (step / sqrt(12) of its
# 16-value sub-blocks) is about 2.1% of the weight RMS, so 6 bits would double the error;
# 8 bits adds about 3% to it (errors add in quadrature).
REQUANT_BITS = 8
GROUP_SIZE = 32


# ----------------------------------------------------------------------------------------
# Quantized block conversion (raw GGUF bytes -> MLX affine triplets)
# ----------------------------------------------------------------------------------------


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes [rows, cols] into MLX's layout: a little-endian bit stream,
    `bits` bits per value, filling uint32 words from the least significant bit."""
    rows, cols = codes.shape
    if bits == 8:
        return np.ascontiguousarray(codes, dtype=np.uint8).view(np.uint32)
    # 8 codes make exactly `bits` bytes: build them in a uint64, keep the low bytes.
    c = codes.reshape(rows, cols // 8, 8)
    acc = np.zeros((rows, cols // 8), np.uint64)
    for k in range(8):
        acc |= c[..., k].astype(np.uint64) << np.uint64(bits * k)
    packed = acc.view(np.uint8).reshape(rows, cols // 8, 8)[..., :bits]
    return np.ascontiguousarray(packed).reshape(rows, -1).view(np.uint32)


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian float16 stored as 2 bytes -> float32 array (last axis dropped)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 codes: low nibbles are values 0..15, high nibbles 16..31 (ggml's
    Q4_0/Q4_1/Q5_x layout)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q5_high(qh_bytes: np.ndarray) -> np.ndarray:
    """The 32 fifth bits of a Q5_0/Q5_1 block (uint32 little-endian, bit j for value j)."""
    qh = np.ascontiguousarray(qh_bytes).view("<u4")[..., 0]
    return ((qh[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _k4_scale_min(scales: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Unpack the 12-byte, 8 x (6-bit scale, 6-bit min) table of Q4_K/Q5_K."""
    s = scales.astype(np.uint8)
    sc = np.empty(s.shape[:-1] + (8,), np.uint8)
    mn = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    mn[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)
    mn[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, mn


def _blocks_q4_0(b):
    d = _f16(b[..., 0:2])
    return _nibbles(b[..., 2:18]), 4, d, -8 * d


def _blocks_q4_1(b):
    return _nibbles(b[..., 4:20]), 4, _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _blocks_q5_0(b):
    d = _f16(b[..., 0:2])
    codes = _nibbles(b[..., 6:22]) | (_q5_high(b[..., 2:6]) << 4)
    return codes, 5, d, -16 * d


def _blocks_q5_1(b):
    codes = _nibbles(b[..., 8:24]) | (_q5_high(b[..., 4:8]) << 4)
    return codes, 5, _f16(b[..., 0:2]), _f16(b[..., 2:4])


def _blocks_q8_0(b):
    d = _f16(b[..., 0:2])
    codes = b[..., 2:34] ^ np.uint8(0x80)  # int8 q -> q + 128 as uint8
    return codes, 8, d, -128 * d


def _blocks_q4_k(b):
    # One 144-byte super-block holds 256 values as 8 groups of 32:
    # w = d * sc[j] * q - dmin * m[j], q in 0..15.
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
    sc, mn = _k4_scale_min(b[..., 4:16])
    qs = b[..., 16:144].reshape(b.shape[:-1] + (4, 32))
    # Each 32-byte chunk gives two groups: low nibbles first, then high nibbles.
    codes = np.stack([qs & 0x0F, qs >> 4], axis=-2).reshape(b.shape[:-1] + (8, 32))
    scales = d[..., None] * sc
    biases = -(dmin[..., None] * mn)
    return codes, 4, scales, biases


# type name -> (bytes per block, values per block, decoder)
_EXACT = {
    "Q4_0": (18, 32, _blocks_q4_0),
    "Q4_1": (20, 32, _blocks_q4_1),
    "Q5_0": (22, 32, _blocks_q5_0),
    "Q5_1": (24, 32, _blocks_q5_1),
    "Q8_0": (34, 32, _blocks_q8_0),
    "Q4_K": (144, 256, _blocks_q4_k),
}


def convert_quantized(raw: np.ndarray, type_name: str, shape: Tuple[int, int]):
    """Raw GGUF blocks of a [rows, cols] matrix -> (weight uint32, scales, biases, bits)
    in MLX's affine format with group size 32, without loss."""
    block_bytes, block_values, decode = _EXACT[type_name]
    rows, cols = shape
    blocks = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // block_values, block_bytes)
    codes, bits, scales, biases = decode(blocks)
    codes = codes.reshape(rows, cols)
    scales = scales.reshape(rows, cols // GROUP_SIZE).astype(np.float32)
    biases = biases.reshape(rows, cols // GROUP_SIZE).astype(np.float32)
    return mx.array(_pack(codes, bits)), mx.array(scales), mx.array(biases), bits


# ----------------------------------------------------------------------------------------
# llama.cpp's Q/K row permutation
# ----------------------------------------------------------------------------------------


def permute_qk(w, n_heads: int):
    """What llama.cpp's converter does to llama Q/K rows: within each head, rows
    (x0..x_{d/2-1}, y0..y_{d/2-1}) become interleaved (x0, y0, x1, y1, ...), so that its
    interleaved RoPE pairs the same dimensions as Hugging Face's half-split RoPE."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_heads: int):
    """Inverse of `permute_qk`: interleaved rows back to half-split order. Works on any
    array whose first axis is the output rows (weights, scales, biases, bias vectors)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------
# Metadata and config
# ----------------------------------------------------------------------------------------


# GGUF value type -> struct format (numpy understands the same codes).
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q"}
_SCALARS.update({11: "<q", 12: "<d"})
_STRING, _ARRAY = 8, 9


class GGUFFile:
    """A minimal GGUF reader: metadata as Python values, tensors as numpy views of a
    memory map (raw blocks for quantized types).

    llama.cpp's `gguf.GGUFReader` builds a numpy view per vocabulary string, which takes
    30-50 s on Gemma's 262k-token vocabulary here; this parser reads it in under a second.
    """

    def __init__(self, path: str):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.view = memoryview(self.data)
        if bytes(self.data[:4]) != b"GGUF":
            raise ValueError(f"'{path}' is not a GGUF file (bad magic number).")
        self.pos = 4
        version = self._scalar("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} in '{path}' is too old; re-convert it.")
        n_tensors, n_kv = self._scalar("<Q"), self._scalar("<Q")
        self.metadata = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar("<Q") for _ in range(self._scalar("<I"))]
            infos.append((name, dims, self._scalar("<I"), self._scalar("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        start = -(-self.pos // align) * align
        self.tensors = {}
        for name, dims, ttype, offset in infos:
            qtype = GGMLQuantizationType(ttype)
            block, nbytes = GGML_QUANT_SIZES[qtype]
            shape = tuple(int(d) for d in reversed(dims))  # GGUF lists dims innermost first
            count = int(np.prod(shape)) // block * nbytes
            raw = self.data[start + offset : start + offset + count]
            self.tensors[name] = (qtype, shape, raw)

    def _scalar(self, fmt):
        (v,) = struct.unpack_from(fmt, self.view, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def _string(self):
        n = self._scalar("<Q")
        s = str(self.view[self.pos : self.pos + n], "utf-8", errors="replace")
        self.pos += n
        return s

    def _value(self, vtype):
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._scalar("<I"), self._scalar("<Q")
            if etype in _SCALARS:
                dt = np.dtype(_SCALARS[etype])
                arr = self.data[self.pos : self.pos + dt.itemsize * count].view(dt)
                self.pos += dt.itemsize * count
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        return self._scalar(_SCALARS[vtype])

    def float_tensor(self, name: str) -> np.ndarray:
        """A tensor decoded to float32 (llama.cpp's own dequantizer for quantized types)."""
        from gguf import GGMLQuantizationType, quants

        qtype, shape, raw = self.tensors[name]
        if qtype == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(shape).copy()
        if qtype == GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(shape).astype(np.float32)
        rows = raw.reshape(shape[0], -1) if len(shape) == 2 else raw
        return quants.dequantize(rows, qtype).astype(np.float32).reshape(shape)


def _layer_types_gemma3(meta: Dict[str, Any], n_layers: int):
    pattern = meta.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == n_layers:
        # Newer files store one flag per layer: true for a sliding-window layer.
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    # llama.cpp's fixed Gemma 3 pattern: five sliding layers, then one global.
    return ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]


def _rope_scaling(meta: Dict[str, Any], arch: str) -> Optional[Dict[str, Any]]:
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind in (None, "none") or factor is None:
        return None
    scaling = {"rope_type": kind, "type": kind, "factor": float(factor)}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def make_config(meta: Dict[str, Any], tensor_names) -> Dict[str, Any]:
    """A Hugging Face style config from GGUF metadata (no quantization entry yet)."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture '{arch}' is not supported. Supported architectures: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    config = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "architectures": [],
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "rope_scaling": _rope_scaling(meta, arch),
    }
    if arch == "llama":
        config["architectures"] = ["LlamaForCausalLM"]
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = False
    elif arch == "qwen2":
        config["architectures"] = ["Qwen2ForCausalLM"]
    elif arch == "gemma3":
        config["architectures"] = ["Gemma3ForCausalLM"]
        config["sliding_window"] = int(get("attention.sliding_window", 4096))
        config["layer_types"] = _layer_types_gemma3(meta, n_layers)
        config["sliding_window_pattern"] = 6
        # llama.cpp hard-codes these for Gemma 3 (they are not in the file): local layers
        # use RoPE base 10000, and queries are scaled by head_dim**-0.5, except for the
        # 62-layer 27B model which uses (hidden / heads)**-0.5.
        config["rope_local_base_freq"] = 10000.0
        config["query_pre_attn_scalar"] = hidden // n_heads if n_layers == 62 else head_dim
        config["hidden_activation"] = "gelu_pytorch_tanh"
        config["final_logit_softcapping"] = None
        config["attn_logit_softcapping"] = None
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is not None:
            config[key.replace("padding", "pad")] = int(value)
    return config


# ----------------------------------------------------------------------------------------
# Tensor names
# ----------------------------------------------------------------------------------------

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def hf_name(gguf_name: str, arch: str) -> Optional[str]:
    """GGUF tensor name -> Hugging Face module path + ".weight"/".bias" (None: skip)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m is None:
        return None  # e.g. rope_freqs: recomputed from the config
    layer, part = m.groups()
    if part == "ffn_norm":
        # Llama/Qwen: the norm before the MLP is "post_attention_layernorm"; Gemma 3 has a
        # separate post-attention norm and calls this one "pre_feedforward_layernorm".
        part_name = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    elif part in _BLOCK:
        part_name = _BLOCK[part]
    else:
        return None
    return f"model.layers.{layer}.{part_name}.{kind}"


# ----------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------


def load_weights(gf: GGUFFile, config: Dict[str, Any]):
    """All tensors as MLX arrays under Hugging Face names, and the per-layer quantization
    entries ({module path: {"group_size", "bits"}} or False)."""
    arch = {"gemma3_text": "gemma3"}.get(config["model_type"], config["model_type"])
    weights, quant = {}, {}
    for gguf_name, (qtype, shape, raw) in gf.tensors.items():
        name = hf_name(gguf_name, arch)
        if name is None:
            continue
        module, _, kind = name.rpartition(".")
        type_name = qtype.name
        quantizable = kind == "weight" and len(shape) == 2 and shape[1] % GROUP_SIZE == 0
        if quantizable and type_name in _EXACT:
            w, s, b, bits = convert_quantized(raw, type_name, shape)
        elif quantizable and type_name not in ("F32", "F16", "BF16"):
            dense = mx.array(gf.float_tensor(gguf_name))
            w, s, b = mx.quantize(dense, group_size=GROUP_SIZE, bits=REQUANT_BITS)
            bits = REQUANT_BITS
        else:
            arr = gf.float_tensor(gguf_name)
            if arch == "gemma3" and name.endswith("norm.weight"):
                # llama.cpp stores Gemma's RMSNorm weights as w + 1; our model (like
                # transformers, whose GGUF loader also subtracts 1) computes x * (1 + w).
                arr = arr - 1.0
            w, s, b, bits = mx.array(arr), None, None, None
            if len(shape) == 2:
                quant[module] = False
        if arch == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config[
                "num_attention_heads" if module.endswith("q_proj") else "num_key_value_heads"
            ]
            w = unpermute_qk(w, heads)
            s = None if s is None else unpermute_qk(s, heads)
            b = None if b is None else unpermute_qk(b, heads)
        weights[name] = w
        if s is not None:
            weights[f"{module}.scales"] = s
            weights[f"{module}.biases"] = b
            quant[module] = {"group_size": GROUP_SIZE, "bits": bits}
    return weights, quant


# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), by `tokenizer.ggml.pre`. Each entry
# is a list of regexes applied in turn; pieces matched by one are split further by the next.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2_SPLIT],
    "gpt2": [_GPT2_SPLIT],
    # SmolLM: every digit on its own, then GPT-2's regex.
    "smollm": [r"\p{N}", _GPT2_SPLIT],
    "llama3": [_LLAMA3_SPLIT],
    "llama-bpe": [_LLAMA3_SPLIT],
    "smaug-bpe": [_LLAMA3_SPLIT],
    "qwen2": [_QWEN2_SPLIT],
    "deepseek-r1-qwen": [_QWEN2_SPLIT],
}

# Token types in tokenizer.ggml.token_type (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED, _BYTE = 3, 4, 6

# Tokens that end a turn in chat templates: generation stops at them as well as at EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")


def _byte_level_tokenizer(meta):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(
            f"GGUF pre-tokenizer '{pre}' is not supported. Supported: "
            f"{', '.join(sorted(PRE_TOKENIZER_SPLITS))}."
        )
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
    splits = [
        pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_tokenizer(meta):
    """SentencePiece-style BPE ("llama" vocab type): spaces written as U+2581, unknown
    bytes as <0xXX> tokens, merges rebuilt from the scores (higher score merges first,
    which is how llama.cpp's SPM tokenizer picks the pair to merge)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    # Tokens made only of spaces are stored with real spaces; in the text they are "▁".
    tokens = [
        "\u2581" * len(t) if t and not t.strip(" ") else t for t in meta["tokenizer.ggml.tokens"]
    ]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    # A merge (a, b) exists when a, b and a+b are all tokens; its rank is the merged
    # token's score (best first), ties broken by id. Control and byte tokens are never
    # merge results (user-defined ones are: runs of spaces, for instance).
    candidates = []
    for i, t in enumerate(tokens):
        if types[i] in (_CONTROL, _BYTE) or len(t) < 2 or vocab[t] != i:
            continue
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in vocab and b in vocab:
                candidates.append((-scores[i], i, vocab[a], vocab[b], a, b))
    candidates.sort()
    merges = [(a, b) for *_, a, b in candidates]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        tok.normalizer = normalizers.Sequence(
            [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
        )
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return tok


# Gemma GGUFs converted without a chat template still need one: Gemma's turn format
# (llama.cpp also falls back to it). A system message is folded into the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(prefix='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.prefix = m['content'] + '\\n\\n' %}"
    "{% else %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ ns.prefix + (m['content'] | trim) }}<end_of_turn>\n"
    "{% set ns.prefix = '' %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tokenizer(meta: Dict[str, Any]):
    """A `transformers.PreTrainedTokenizerFast` from the tokenizer.* metadata of a GGUF
    (no torch import). Control tokens are special and never split; user-defined tokens
    are matched whole, like llama.cpp does."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    if kind == "gpt2":
        tok = _byte_level_tokenizer(meta)
    elif kind == "llama":
        tok = _spm_tokenizer(meta)
    else:
        raise ValueError(
            f"GGUF tokenizer model '{kind}' is not supported. Supported: gpt2 (byte-level BPE), "
            "llama (SentencePiece BPE)."
        )
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = tok.get_vocab()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty == _CONTROL and vocab.get(t) is not None
        ]
    )
    # llama.cpp matches user-defined tokens whole in the raw text before tokenizing the rest
    # (Gemma: "\n\n", "<table>", runs of spaces or tabs). Runs of spaces are spelled "▁▁..."
    # in our SentencePiece vocabulary, so those are matched after the " " -> "▁" normalizer.
    user = []
    for t, ty in zip(tokens, types):
        if ty != _USER_DEFINED:
            continue
        if vocab.get(t) is not None:
            user.append(AddedToken(t, special=False, normalized=False))
        elif kind == "llama" and t and not t.strip(" "):
            user.append(AddedToken("\u2581" * len(t), special=False, normalized=True))
    tok.add_tokens(user)

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    bos, eos = token("bos_token_id"), token("eos_token_id")
    arch = meta.get("general.architecture", "")
    default_template = GEMMA_CHAT_TEMPLATE if arch.startswith("gemma") else None
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    if add_bos and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=meta.get("tokenizer.chat_template") or default_template,
        clean_up_tokenization_spaces=False,
    )


def eos_token_ids(meta: Dict[str, Any]):
    """EOS plus the end-of-turn tokens that chat templates close each turn with."""
    tokens = meta["tokenizer.ggml.tokens"]
    ids = {
        int(meta[k])
        for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
        if k in meta
    }
    types = meta.get("tokenizer.ggml.token_type") or [_CONTROL] * len(tokens)
    for name in _END_OF_TURN:
        if name in tokens:
            i = tokens.index(name)
            if types[i] in (_CONTROL, _USER_DEFINED):
                ids.add(i)
    return sorted(ids)


def wrap_tokenizer(tokenizer, meta: Dict[str, Any]):
    """Our TokenizerWrapper with the streaming detokenizer that fits the vocabulary."""
    try:
        from .tokenizer_utils import (
            BPEStreamingDetokenizer,
            SPMStreamingDetokenizer,
            TokenizerWrapper,
        )
    except ImportError:
        return tokenizer
    if meta.get("tokenizer.ggml.model") == "gpt2":
        detokenizer = BPEStreamingDetokenizer
    else:
        trim = bool(meta.get("tokenizer.ggml.add_space_prefix", False))

        def detokenizer(tok):
            return SPMStreamingDetokenizer(tok, trim_space=trim)

    return TokenizerWrapper(
        tokenizer, detokenizer_class=detokenizer, eos_token_ids=eos_token_ids(meta)
    )


# ----------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------


def load_gguf(path: str):
    """Read a GGUF file: returns (config, weights, tokenizer).

    config: Hugging Face style dict with a `quantization` entry ({"group_size", "bits"}
        defaults plus one entry per module: {"group_size", "bits"} or False).
    weights: Hugging Face names -> mx.array; quantized modules as weight/scales/biases.
    tokenizer: a TokenizerWrapper (a PreTrainedTokenizerFast if tokenizer_utils is absent).
    """
    gf = GGUFFile(path)
    meta = gf.metadata
    config = make_config(meta, set(gf.tensors))
    weights, quant = load_weights(gf, config)
    quantized = [q for q in quant.values() if q]
    if quantized:
        bits = [q["bits"] for q in quantized]
        config["quantization"] = {
            "group_size": GROUP_SIZE,
            "bits": max(set(bits), key=bits.count),
            **quant,
        }
    tokenizer = wrap_tokenizer(build_tokenizer(meta), meta)
    return config, weights, tokenizer
