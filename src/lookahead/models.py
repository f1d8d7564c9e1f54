"""Loading a model and tokenizer: a named model, a local HF directory or a .gguf file. Offline only."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
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


# Buffers transformers computes in fp32 whatever dtype a model is loaded in: RoPE frequencies (`inv_freq`,
# `original_inv_freq`, Gemma-3's `sliding_attention_inv_freq`, ...). `model.to(bf16)` rounds them too (0.6978 ->
# 0.6992 on SmolLM2-135M), and position p then turns by p times that error: 0.8 rad at p = 600, where a bf16 load
# of the same weights turns right (measured: logits 0.25 apart at a 641-token prefix).
FP32_BUFFERS = "inv_freq"  # name suffix


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)`, as loading the model in `dtype` gives it: RoPE frequencies stay fp32."""
    kept = {name: buf for name, buf in model.named_buffers()
            if name.endswith(FP32_BUFFERS) and buf.dtype == torch.float32}
    model.to(dtype)
    for name, buf in kept.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = buf
    return model


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
    """Return (model, tokenizer), both plain transformers objects, the model in eval mode with its SDPA
    attention grouped for verify forwards (decoding/attention.py: same numbers, no per-head KV copies).

    A .gguf file is dequantised once per dtype and kept as a safetensors directory under the cache
    root (`converted/`): later loads read that instead (the conversion takes most of a first start)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .decoding.attention import use_grouped

    directory, gguf = locate(source)
    dtype = parse_dtype(dtype)
    name = Path(gguf).stem if gguf else None  # the model's name, whichever way its weights are read
    converted = _converted_dir(directory / gguf, dtype) if gguf else None
    if converted is not None and (converted / "config.json").is_file():
        directory, gguf = converted, None
    kwargs = {"local_files_only": True}
    if gguf:
        from transformers import GgufConfig
        kwargs["gguf_file"] = gguf
        # Dense weights in the asked dtype: packed GGUF kernels come from the hub (unreachable) and
        # would compute in fp32 anyway.
        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, gguf_file=gguf)
    # sdpa honours additive 4D masks (FlashAttention would not).
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa", **kwargs)
    if gguf:
        _save_converted(model, tokenizer, converted)
    if name:  # saved drafting state and cost curves key on it
        model.config._name_or_path = name
    model.to(device or default_device()).eval()
    use_grouped(model)
    return model, tokenizer


def _converted_dir(gguf: Path, dtype: torch.dtype) -> Path:
    from .weights import cache_root

    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "converted" / f"{gguf.stem}-{str(dtype).removeprefix('torch.')}-{tag}"


def save_dense(model, tokenizer, out: str | os.PathLike) -> Path:
    """Write config, generation config, tokenizer and safetensors weights: a plain Hugging Face directory.

    Without the GGUF quantization entry: the weights are dense now, and a reader that saw the entry
    would look for GGUF blocks."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    if config.pop("quantization_config", None) is not None:
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _save_converted(model, tokenizer, target: Path) -> None:
    """Write the dequantised model atomically (a half-written directory is never read)."""
    tmp = Path(tempfile.mkdtemp(dir=_mkdir(target.parent), prefix=target.name + ".tmp"))
    try:
        save_dense(model, tokenizer, tmp)
        os.replace(tmp, target)
    except OSError:  # a full disk or a concurrent writer: loading still worked, only the cache is missing
        shutil.rmtree(tmp, ignore_errors=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
