"""Run a `lookahead` command as on an AVX2-only CPU (AMD EPYC-like), on a CPU that has more.

    python bench/as_avx2.py bench --model smollm2-135m --dtype auto --tasks code,chat,summary,qa ...

Caps the instruction sets MKL, oneDNN and ATen may use at AVX2 (their own environment switches, set before
torch loads) and has torch report no native bf16, as it does on such a CPU (its check reads the CPU's
flags, not the caps). Cost curves are cached apart (the caps are part of the machine key) and results.json
records the caps. What it cannot emulate is another CPU's caches, memory and clocks: it checks the code
paths and the decisions the engine takes on them, it does not give an AMD machine's figures.
"""
from __future__ import annotations

import os
import sys

CAPS = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}

if __name__ == "__main__":
    if any(os.environ.get(k) != v for k, v in CAPS.items()):  # the libraries read them when they load
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **CAPS})
    import torch

    from lookahead.cli import main

    torch.ops.mkldnn._is_mkldnn_bf16_supported = lambda: False
    sys.exit(main(sys.argv[1:]))
