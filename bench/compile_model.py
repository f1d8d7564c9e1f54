"""The whole default model under torch.compile vs the packed kernels, through the verifier (issue #11, item 1).

    python bench/compile_model.py [rounds] [frozen|packed] > bench/results/<dir>/compile_model.md

Two copies of SmolLM2-135M (fp32): one with packed linears (what `auto` picks on AVX2 CPUs), one whose
forward is `torch.compile(dynamic=True)`, either with inductor weight freezing ("frozen": the weights
become graph constants and inductor packs them itself; its FX graph cache is bypassed under freezing)
or around our packed linears ("packed": they stay opaque calls through a custom op, since inductor's own
packed-linear lowering needs frozen weights, and compile fuses everything else). Both decode through `Verifier`
(verify + commit, a 400-token cache that grows) a chain of k query tokens; rounds interleave the two and
every k. Prints the warm-up (compile) time of each k, then per k the median step time of each.
Set TORCHINDUCTOR_CACHE_DIR to an empty folder to measure a cold compile, run it again for a warm one.
"""
import statistics
import sys
import time

import torch
import torch._inductor.config as inductor_config

from lookahead.decoding.cost import cpu_info
from lookahead.decoding.kernels import pack_linears
from lookahead.decoding.verify import Verifier
from lookahead.models import load_model
from lookahead.tree import DraftTree

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
SIZES, STEPS, PAST = (1, 2, 4, 8, 12, 16), 8, 400

packed, _ = load_model(None, dtype=torch.float32, device="cpu")
pack_linears(packed)
compiled, _ = load_model(None, dtype=torch.float32, device="cpu")
VARIANT = sys.argv[2] if len(sys.argv) > 2 else "frozen"
if VARIANT == "frozen":
    inductor_config.freezing = True
else:
    import lookahead.decoding.kernels as kernels

    eager_packed = kernels._packed  # the packed call itself, run opaquely inside the custom op

    @torch.library.custom_op("lookahead::packed_linear", mutates_args=())
    def packed_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: int) -> torch.Tensor:
        return eager_packed(w, b, out, x)

    @packed_linear.register_fake
    def _(x, w, b, out):
        return x.new_empty(*x.shape[:-1], out)

    kernels._packed = lambda w, b, out, x: torch.ops.lookahead.packed_linear(x, w, b, out)
    pack_linears(compiled)
compiled.forward = torch.compile(compiled.forward, dynamic=True)


def steps(model: torch.nn.Module, k: int, n: int) -> list[float]:
    """Seconds of n decode steps verifying a k-token chain (one node accepted each step)."""
    verifier = Verifier(model)
    verifier.add(0, list(range(100, 100 + PAST)))
    times = []
    for _ in range(n):
        tree = DraftTree.chain(5, list(range(200, 200 + k - 1)))
        t = time.perf_counter()
        verifier.verify([tree])
        verifier.commit([[0, 1] if k > 1 else [0]])
        times.append(time.perf_counter() - t)
    return times


name, flags = cpu_info()
print(f"# torch.compile of the whole model vs packed linears\n\n{name}; {torch.get_num_threads()} threads; "
      f"torch {torch.__version__}; avx512: {'avx512f' in flags}; SmolLM2-135M fp32, {PAST}-token cache; "
      f"compiled: {VARIANT}\n")
t0 = time.perf_counter()
for k in SIZES:  # warm-up: three steps per k after a fresh prefill (the second sees cropped cache strides)
    t = time.perf_counter()
    steps(compiled, k, 3)
    print(f"- warm-up k={k}: {time.perf_counter() - t:.1f} s", flush=True)
print(f"- compile warm-up in all: {time.perf_counter() - t0:.0f} s\n")
results = {(kind, k): [] for kind in ("packed", "compiled") for k in SIZES}
for r in range(rounds):
    for k in SIZES:
        for kind, model in (("packed", packed), ("compiled", compiled))[:: 1 if r % 2 == 0 else -1]:
            results[(kind, k)] += steps(model, k, STEPS)
print("| k query tokens | packed ms | compiled ms | packed / compiled |\n|---:|---:|---:|---:|")
for k in SIZES:
    p, c = (statistics.median(results[(kind, k)]) * 1e3 for kind in ("packed", "compiled"))
    print(f"| {k} | {p:.1f} | {c:.1f} | {p / c:.2f} |")
