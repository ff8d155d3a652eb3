"""Loading models and tokenizers: local directories, Hugging Face hub ids, GGUF files."""

import glob
import importlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from .models.quantized_matmul import use_rows_kernel
from .tokenizer_utils import TokenizerWrapper, load_tokenizer

# HF model types served by a module of another name.
MODEL_REMAPPING = {
    "mistral": "llama",
    "smollm": "llama",
    "gemma3": "gemma3_text",
}


# Modules under models/ that are building blocks, not architectures.
NOT_ARCHITECTURES = ("__init__", "base", "cache", "rope_utils", "switch_layers")


class ModelNotFoundError(ValueError):
    pass


def get_model_path(path_or_hf_repo: str, revision: Optional[str] = None) -> Path:
    """A local directory or file, or a hub id fetched through `huggingface_hub`."""
    model_path = Path(path_or_hf_repo).expanduser()
    if model_path.exists():
        return model_path
    looks_local = (
        path_or_hf_repo.startswith((".", "/", "~"))
        or path_or_hf_repo.endswith(".gguf")
        or path_or_hf_repo.count("/") != 1
    )
    if looks_local:
        raise ModelNotFoundError(
            f"Model path '{path_or_hf_repo}' does not exist. Pass --model a directory with "
            "config.json and *.safetensors, a .gguf file, or a Hugging Face repo id."
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                path_or_hf_repo,
                revision=revision,
                allow_patterns=[
                    "*.json",
                    "*.safetensors",
                    "*.py",
                    "tokenizer.model",
                    "*.tiktoken",
                    "*.txt",
                    "*.jinja",
                ],
            )
        )
    except Exception as e:
        raise ModelNotFoundError(
            f"Model '{path_or_hf_repo}' is not in the local Hugging Face cache and could not be "
            f"downloaded ({type(e).__name__}). Point --model at a local directory "
            "(config.json + *.safetensors + tokenizer files) or a .gguf file instead."
        ) from None


def load_config(model_path: Path) -> Dict[str, Any]:
    config_file = Path(model_path) / "config.json"
    if not config_file.exists():
        raise ModelNotFoundError(
            f"No config.json in '{model_path}'. A model directory needs config.json, "
            "*.safetensors and tokenizer files (or pass a .gguf file)."
        )
    with open(config_file) as f:
        config = json.load(f)
    gen_file = Path(model_path) / "generation_config.json"
    if gen_file.exists() and "eos_token_id" not in config:
        with open(gen_file) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            config["eos_token_id"] = eos
    return config


def _get_classes(config: Dict[str, Any]):
    """The (Model, ModelArgs) classes for a config's `model_type`."""
    model_type = config.get("model_type")
    if model_type is None:
        raise ValueError(
            "config.json has no 'model_type'; cannot tell which architecture to build."
        )
    module_name = MODEL_REMAPPING.get(model_type, model_type)
    try:
        arch = importlib.import_module(f"mlx_lm.models.{module_name}")
    except ImportError:
        supported = sorted(
            p.stem
            for p in (Path(__file__).parent / "models").glob("*.py")
            if p.stem not in NOT_ARCHITECTURES and not p.stem.startswith("turboquant")
        )
        raise ValueError(
            f"Model type '{model_type}' is not supported. Supported model types: "
            f"{', '.join(supported + sorted(MODEL_REMAPPING))}."
        ) from None
    return arch.Model, arch.ModelArgs


def _quantization_predicate(quantization: Dict[str, Any], weights: Dict[str, mx.array]):
    """Per-layer quantization: a module is quantized when its weights carry scales;
    per-layer overrides in the config (a dict of params, or False) win."""

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized"):
            return False
        return f"{path}.scales" in weights

    return predicate


def _dequantized_weight(module: nn.Module, dtype) -> mx.array:
    # Scales in the target dtype first: float16 scales would round the weights to float16.
    return mx.dequantize(
        module.weight,
        module.scales.astype(dtype),
        module.biases.astype(dtype),
        module.group_size,
        module.bits,
    )


def _float_layer(module: nn.Module, dtype) -> Optional[nn.Module]:
    """The float twin of a quantized layer (None for other modules)."""
    from .models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    if isinstance(module, nn.QuantizedLinear):
        w = _dequantized_weight(module, dtype)
        new = nn.Linear(w.shape[1], w.shape[0], bias="bias" in module)
    elif isinstance(module, nn.QuantizedEmbedding):
        w = _dequantized_weight(module, dtype)
        new = nn.Embedding(w.shape[0], w.shape[1])
    elif isinstance(module, QuantizedSwitchLinear):
        w = _dequantized_weight(module, dtype)
        new = SwitchLinear(w.shape[2], w.shape[1], w.shape[0], bias="bias" in module)
    else:
        return None
    new.weight = w
    if "bias" in module:
        new.bias = module.bias.astype(dtype)
    return new


def _dequantize_model(model: nn.Module, dtype=mx.float32):
    """Replace quantized layers with float ones (fast on CPU, where MLX's
    quantized matmul is slow) and cast every floating parameter to `dtype`."""
    layers = []
    for name, module in model.named_modules():
        new = _float_layer(module, dtype)
        if new is not None:
            layers.append((name, new))
    if layers:
        model.update_modules(tree_unflatten(layers))
    model.apply(lambda x: x.astype(dtype) if mx.issubdtype(x.dtype, mx.floating) else x)


def build_model(
    config: Dict[str, Any],
    weights: Dict[str, mx.array],
    strict: bool = True,
    dequantize: bool = False,
) -> nn.Module:
    """Instantiate the architecture for `config` and load `weights` (HF names)."""
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quantization = config.get("quantization", None)
    if quantization is not None:
        nn.quantize(
            model,
            group_size=quantization.get("group_size", 64),
            bits=quantization.get("bits", 4),
            class_predicate=_quantization_predicate(quantization, weights),
        )
        use_rows_kernel(model)
    model.load_weights(list(weights.items()), strict=strict)
    if dequantize:
        _dequantize_model(model)
    model.eval()
    return model


def load_model(
    model_path: Path,
    lazy: bool = False,
    strict: bool = True,
    model_config: Dict[str, Any] = {},
    dequantize: bool = False,
) -> Tuple[nn.Module, Dict[str, Any]]:
    """Load the model in a directory (config.json + sharded *.safetensors)."""
    model_path = Path(model_path)
    config = load_config(model_path)
    config.update(model_config)
    if "quantization" not in config and "quantization_config" in config:
        qc = config["quantization_config"]
        if "bits" in qc and "group_size" in qc:
            config["quantization"] = qc
    _get_classes(config)  # an unsupported model type fails before any weights are read
    weight_files = sorted(glob.glob(str(model_path / "model*.safetensors")))
    if not weight_files:
        weight_files = sorted(glob.glob(str(model_path / "*.safetensors")))
    if not weight_files:
        raise ModelNotFoundError(f"No *.safetensors weights found in '{model_path}'.")
    weights = {}
    for wf in weight_files:
        weights.update(mx.load(wf))
    model = build_model(config, weights, strict=strict, dequantize=dequantize)
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    dequantize: bool = False,
):
    """Load a model and its tokenizer.

    Args:
        path_or_hf_repo: a local model directory, a `.gguf` file, or a hub repo id.
        tokenizer_config: extra keyword arguments for the tokenizer.
        model_config: entries that override the model's config.json.
        adapter_path: not supported yet (LoRA adapters).
        lazy: leave the weights unevaluated until first use.
        return_config: also return the model config.
        dequantize: turn quantized weights into float32 at load time (much faster
            on MLX's CPU backend, whose quantized matmul is slow; costs memory).

    Returns:
        (model, tokenizer) or (model, tokenizer, config).
    """
    tokenizer_config = tokenizer_config or {}
    model_config = model_config or {}
    if adapter_path is not None:
        raise ValueError("LoRA adapters are not supported by mlx-lm-turbo yet; drop adapter_path.")
    model_path = get_model_path(path_or_hf_repo, revision=revision)
    if model_path.is_file() and model_path.suffix == ".gguf":
        from .gguf import load_gguf

        config, weights, tokenizer = load_gguf(str(model_path))
        config.update(model_config)
        model = build_model(config, weights, dequantize=dequantize)
        if not lazy:
            mx.eval(model.parameters())
    elif model_path.is_file():
        raise ModelNotFoundError(
            f"'{model_path}' is a file but not a .gguf; pass a model directory or a .gguf file."
        )
    else:
        model, config = load_model(
            model_path, lazy=lazy, model_config=model_config, dequantize=dequantize
        )
        eos = config.get("eos_token_id")
        tokenizer = load_tokenizer(
            model_path,
            tokenizer_config,
            eos_token_ids=[eos] if isinstance(eos, int) else eos,
        )
    config.setdefault("model_path", str(model_path))
    if return_config:
        return model, tokenizer, config
    return model, tokenizer


__all__ = [
    "load",
    "load_model",
    "load_config",
    "get_model_path",
    "build_model",
    "TokenizerWrapper",
    "ModelNotFoundError",
]
