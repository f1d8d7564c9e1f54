"""Loading a model and tokenizer: a named model, a local HF directory or a .gguf file. Offline only."""
from __future__ import annotations

import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def locate(source: str | os.PathLike | None) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a named model, a .gguf file or an HF directory."""
    from .weights import NAMED_MODELS, resolve

    source = DEFAULT_MODEL if source is None else str(source)
    if source in NAMED_MODELS:
        return resolve(source)
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").is_file():
        return path, None
    raise FileNotFoundError(
        f"{source!r} is neither a named model ({', '.join(sorted(NAMED_MODELS))}), a .gguf file, "
        "nor a local Hugging Face model directory with a config.json (no hub downloads: this runs offline)")


def load_model(source: str | os.PathLike | None = None, dtype: str | torch.dtype = "bfloat16",
               device: str | None = None):
    """Return (model, tokenizer), both plain transformers objects, the model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, gguf = locate(source)
    kwargs = {"local_files_only": True}
    if gguf:
        kwargs["gguf_file"] = gguf
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    if gguf:
        # Dense weights in the asked dtype: packed GGUF kernels come from the hub (unreachable) and
        # would compute in fp32 anyway.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    # sdpa honours additive 4D masks (FlashAttention would not).
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=parse_dtype(dtype), attn_implementation="sdpa",
                                                 **kwargs)
    model.to(device or default_device()).eval()
    return model, tokenizer
