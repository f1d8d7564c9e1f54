"""Prepacked linear layers on CPU: the matmuls that take most of a verify forward.

oneDNN can reorder a weight once into the blocked layout its kernels read (`mkldnn._reorder_linear_weight`);
eager `F.linear` re-reads the plain layout every call. Measured on SmolLM2-135M (Intel Xeon, AVX-512 bf16,
no AMX, 2 threads; README "Kernels"): bf16 forwards of 1-16 query tokens ~20 % faster packed, fp32 slower
at one token (MKL's matrix-vector path wins there), so `load(dtype="auto")` measures each candidate
(dtype x kernels) and keeps the fastest with drafting. The plain no-draft loop runs the same kernels, so
speedups stay honest. Packing keeps the original weights (tied embeddings, state dicts, deep copies of
the unpacked model) and adds one packed copy of each linear weight.
"""
from __future__ import annotations

import functools

import torch

from .invariant import is_invariant

EAGER, PACKED = "eager", "packed"


def linear_kernels(model: torch.nn.Module) -> str:
    """Which linear kernels `model` runs: "eager" or "packed"."""
    return getattr(model, "_lookahead_kernels", EAGER)


def running_kernels(model: torch.nn.Module) -> str:
    """What a report says the model's linears run: "invariant" (deterministic mode's own tiles), else
    `linear_kernels`."""
    return "invariant" if is_invariant(model) else linear_kernels(model)


def can_pack(model: torch.nn.Module) -> bool:
    """oneDNN is there, the model is on the CPU, and its dtype has native oneDNN kernels here."""
    param = next(model.parameters())
    if param.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return param.dtype == torch.float32 or (param.dtype == torch.bfloat16
                                            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@torch.inference_mode()
def pack_linears(model: torch.nn.Module) -> int:
    """Run every nn.Linear of `model` from a oneDNN-packed copy of its weight; returns how many."""
    if not can_pack(model):
        raise ValueError("packed kernels need oneDNN on the CPU with native kernels for the model's dtype")
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
            module.forward = functools.partial(_packed, weight, module.bias, module.out_features)
            n += 1
    model._lookahead_kernels = PACKED
    return n


def unpack_linears(model: torch.nn.Module) -> None:
    """Back to eager `F.linear` (drops the packed copies)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "forward" in module.__dict__:
            del module.forward
    model._lookahead_kernels = EAGER


def _packed(weight: torch.Tensor, bias: torch.Tensor | None, out_features: int, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], out_features)
