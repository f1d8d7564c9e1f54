"""One linear layer, rows M = 1..16: eager vs oneDNN-packed (`decoding/kernels.py`) vs torch.compile.

    python bench/compile_linear.py float32 576x1536,1536x8960

(as on an AVX2-only CPU: prefix `MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`;
there oneDNN has no bf16 kernels, so bf16 has no packed column.)

Answers whether compiled linears (inductor with weight freezing, default or max-autotune's C++ GEMM
templates) would beat the packed kernels `kernels="auto"` already measures. Median of 30 calls each, the four
kernels interleaved per round (`lookahead.timing`).
"""
import statistics
import sys
import time

import torch
import torch._dynamo
import torch._inductor.config as inductor

from lookahead.timing import interleaved, stopwatch

torch.set_num_threads(2)
inductor.freezing = True  # weights become constants: inductor prepacks them, as packed kernels do
torch._dynamo.config.recompile_limit = torch._dynamo.config.cache_size_limit = 256  # one graph per M and shape
ROWS = (1, 2, 4, 8, 16)


def median_ms(kernels: dict, x: torch.Tensor) -> list[float]:
    """Median milliseconds of each kernel on `x`, the kernels interleaved per round."""
    runs = interleaved(list(kernels), lambda name: stopwatch(lambda: kernels[name](x), x.device), reps=30, warmup=5)
    return [statistics.median(runs[name]) * 1e3 for name in kernels]


@torch.no_grad()
def main(dtype: torch.dtype, shapes: list[tuple[int, int]]) -> None:
    print("| shape | M | eager ms | packed ms | compiled ms | max-autotune ms |\n|---|---:|---:|---:|---:|---:|")
    for k, n in shapes:
        linear = torch.nn.Linear(k, n, bias=False).to(dtype).eval()
        kernels = {"eager": linear}
        if dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported():  # as `can_pack` decides
            weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
            kernels["packed"] = lambda x, weight=weight: torch.ops.mkldnn._linear_pointwise(
                x, weight, None, "none", [], "")
        compiled, took = {}, {}
        for mode in ("default", "max-autotune"):
            t = time.perf_counter()
            compiled[mode] = torch.compile(linear, mode=None if mode == "default" else mode, dynamic=False)
            for m in ROWS:
                compiled[mode](torch.randn(m, k, dtype=dtype))
            took[mode] = time.perf_counter() - t
        kernels.update(compiled)
        for m in ROWS:
            x = torch.randn(m, k, dtype=dtype)
            ms = dict(zip(kernels, median_ms(kernels, x), strict=True))
            cells = (ms.get(name) for name in ("eager", "packed", "default", "max-autotune"))
            print(f"| {k}x{n} | {m} | " + " | ".join("–" if v is None else f"{v:.3f}" for v in cells) + " |",
                  flush=True)
        print(f"compile time for {len(ROWS)} row counts: " + ", ".join(f"{k} {v:.1f} s" for k, v in took.items()))


if __name__ == "__main__":
    main(getattr(torch, sys.argv[1]), [tuple(map(int, s.split("x"))) for s in sys.argv[2].split(",")])
