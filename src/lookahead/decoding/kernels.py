"""Prepacked linear layers on CPU: the matmuls that take most of a verify forward.

oneDNN can reorder a weight once into the blocked layout its kernels read (`mkldnn._reorder_linear_weight`);
eager `F.linear` re-reads the plain layout every call. Measured on SmolLM2-135M (Intel Xeon, AVX-512 bf16,
no AMX, 2 threads; README "Kernels"): bf16 forwards of 1-16 query tokens ~20 % faster packed, fp32 slower
at one token (MKL's matrix-vector path wins there), so `load(dtype="auto")` measures each candidate
(dtype x kernels) and keeps the fastest with drafting. The plain no-draft loop runs the same kernels, so
speedups stay honest. Packing keeps the original weights (tied embeddings, state dicts, deep copies of
the unpacked model) and adds one packed copy of each linear weight.

Sibling projections that read the same input (q/k/v, gate/up) are packed as one stacked weight and run as one
matmul, as vLLM's merged linears do: fewer, larger calls, each column computed as before (bitwise equal logits
on Zen 5). Measured there (`python bench/stacked_linears.py`, bf16, verify forwards over a 256-token cache,
medians of 4 alternating curves): SmolLM2-135M 14.1 -> 12.5 ms at 1 query token, 1.08x at 13; Qwen2.5-Coder-0.5B
23.9 -> 22.5 ms, 1.04x at 13; Qwen2.5-Coder-1.5B 56.7 -> 53.8 ms, level from 13; Gemma-3-270M 16.4 -> 15.5 ms. The
Qwen models' one-token forwards read their linear weights at 44-57 GB/s, this machine's memory bandwidth.
"""
from __future__ import annotations

import functools
import itertools

import torch

from .invariant import is_invariant

EAGER, PACKED = "eager", "packed"
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # transformers' names, read in this order


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
    """Run every nn.Linear of `model` from a oneDNN-packed copy of its weight (siblings stacked); returns how many."""
    if not can_pack(model):
        raise ValueError("packed kernels need oneDNN on the CPU with native kernels for the model's dtype")
    stacked: set[int] = set()
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, name, None) for name in names]
            if _stackable(members):
                group = _Stacked(members)
                for i, module in enumerate(members):
                    module.forward = functools.partial(group, i)
                    stacked.add(id(module))
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            if id(module) not in stacked:
                weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), None)
                module.forward = functools.partial(_packed, weight, module.bias, module.out_features)
            n += 1
    model._lookahead_kernels = PACKED
    model._lookahead_stacked = len(stacked)
    return n


def stacked_linears(model: torch.nn.Module) -> int:
    """How many of `model`'s linears run stacked with their siblings (0 unless packed)."""
    return getattr(model, "_lookahead_stacked", 0) if linear_kernels(model) == PACKED else 0


def _stackable(members: list) -> bool:
    if not all(isinstance(m, torch.nn.Linear) for m in members):
        return False
    first = members[0]
    return all(m.in_features == first.in_features and m.weight.dtype == first.weight.dtype
               and (m.bias is None) == (first.bias is None) for m in members)


class _Stacked:
    """One packed matmul for sibling linears that read the same input. The first sibling called with an input
    computes all their columns; the others, given that same tensor, take theirs (a view), else recompute. Once
    every sibling has taken its columns the result is dropped: kept, it would hold a layer's activations."""

    def __init__(self, members: list[torch.nn.Linear]) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(torch.cat([m.weight.detach() for m in members]), None)
        self.bias = torch.cat([m.bias.detach() for m in members]) if members[0].bias is not None else None
        ends = list(itertools.accumulate(m.out_features for m in members))
        self.columns = list(zip([0, *ends[:-1]], ends, strict=True))
        self.everyone = (1 << len(members)) - 1
        # (input, output, bitmask of the siblings served): one tuple, swapped whole, so a thread never reads
        # another's output for its input
        self.cached: tuple[torch.Tensor, torch.Tensor, int] | None = None

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        cached = self.cached
        if cached is None or cached[0] is not x:
            cached = (x, _packed(self.weight, self.bias, self.columns[-1][1], x), 0)
        served = cached[2] | 1 << i
        self.cached = None if served == self.everyone else (cached[0], cached[1], served)
        start, end = self.columns[i]
        return cached[1][..., start:end]


def unpack_linears(model: torch.nn.Module) -> None:
    """Back to eager `F.linear` (drops the packed copies)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and "forward" in module.__dict__:
            del module.forward
    model._lookahead_kernels = EAGER
    model._lookahead_stacked = 0


def _packed(weight: torch.Tensor, bias: torch.Tensor | None, out_features: int, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], out_features)
