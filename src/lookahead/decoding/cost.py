"""What one verify forward costs: t(T) for T query tokens in one forward (any split into rows).

One curve per engine, measured by `measure_cost` (real `Verifier` forwards over a cached context,
interleaved, see `timing.interleaved`), cached per machine under `~/.cache/lookahead/cost/` and
corrected online from every forward the engine runs (`CostModel.observe`). The correction is
what keeps a bad measurement (taken while something else loaded the machine) from steering
later runs: when live forwards disagree with the cached curve, the corrected curve is written
back, so a poisoned cache heals itself.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files import write_atomic
from ..timing import interleaved, stopwatch
from ..tree import DraftTree
from ..weights import cache_root

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128)


def piecewise_linear(xs: list[int], ys: list[float], x: float) -> float:
    """ys interpolated at x over increasing xs; past the last point, the last slope continues."""
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2]) if len(xs) > 1 else 0.0
        return ys[-1] + slope * (x - xs[-1])
    i = bisect.bisect_right(xs, x) - 1
    if i < 0:
        return ys[0]
    if xs[i] == x:
        return ys[i]
    return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])


@dataclass
class CostModel:
    """Seconds of one forward over T query tokens, linear between measured points; for a batch of `rows` rows,
    t(T, rows) = curve(rows) + (rows - 1) * per_row + marginal * (curve(T) - curve(rows)).

    `observe(T, seconds)` of a one-row forward moves the point nearest to T (in log scale) towards what was
    measured (a running mean that counts the measurement as 4 observations, then an exponential one): the
    ratios t(T)/t(1) that sizing depends on follow the machine as it is now. Each point moves only by
    its own observations; the curve is read non-decreasing. A batch's forwards (`rows` > 1) teach two
    numbers instead. Its plain ones, `per_row`: each row attends to its own keys and is set up on its own,
    which one row of as many tokens does not pay (measured, SmolLM2 bf16 on Zen 5, ~200-token rows: 15 rows
    of one token 30 ms where one row of 15 tokens took 23 ms). Its drafted ones, `marginal`: what a batch's
    draft tokens cost over its plain step, against what the curve says they cost one row (40 mixed prompts,
    16 rows: drafted steps took 1.5-2.1x a plain one where the curve said 1.3-1.55x; trees in many rows are
    attended apart or padded). The one-row curve alone read a batch's draft tokens as next to free.
    """
    tokens: list[int]
    seconds: list[float]
    smoothing: float = 0.05
    path: Path | None = None     # where the curve is cached; rewritten when live forwards disagree
    counts: list[int] = field(default_factory=list)
    drift: float = 0.0           # largest relative change since the curve was loaded or saved
    per_row: float = 0.0         # seconds each row past the first adds to a plain batch forward (learnt)
    marginal: float = 1.0        # a batch's draft tokens cost this times what the curve says (learnt)
    plain_batches: int = 0       # plain batch forwards observed
    drafted_batches: int = 0     # drafted batch forwards observed

    def __post_init__(self) -> None:
        if (not self.tokens or self.tokens[0] != 1 or sorted(set(self.tokens)) != list(self.tokens)
                or len(self.tokens) != len(self.seconds) or min(self.seconds) <= 0):
            raise ValueError("CostModel needs increasing token counts starting at 1 and one positive time each")
        self.tokens, self.seconds = list(self.tokens), [float(s) for s in self.seconds]
        self.counts = self.counts or [0] * len(self.tokens)
        self._loaded = list(self.seconds)

    def __call__(self, total: int, rows: int = 1) -> float:
        # A forward over more tokens never costs less: the curve is read non-decreasing. Not stored so: a point
        # raised by a slow spell must not raise the points above it for good (measured: one-token forwards
        # observed through a loaded minute lifted t(2..8) with them, t(2)/t(1) read 1.48 where the machine
        # gave 1.1; drafting then looked dear, so those points were never verified again to come back down).
        curve = self._curve(total)
        if rows <= 1:
            return curve
        plain = self._curve(rows)
        # Rows may also cost less than the curve says (it was measured slow): never below half of it.
        return max(plain + (rows - 1) * self.per_row, plain / 2) + self.marginal * max(curve - plain, 0.0)

    def _curve(self, total: int) -> float:
        return piecewise_linear(self.tokens, list(itertools.accumulate(self.seconds, max)), max(total, 1))

    def ratio(self, total: int) -> float:
        """t(T) / t(1)."""
        return self(total) / self.seconds[0]

    def observe(self, total: int, seconds: float, rows: int = 1) -> None:
        """A live forward over `total` query tokens in `rows` rows took `seconds`."""
        if seconds <= 0 or total < 1:
            return
        if rows > 1:
            if total <= rows:
                self.plain_batches += 1
                weight = max(self.smoothing, 1.0 / self.plain_batches)
                self.per_row += weight * ((seconds - self._curve(rows)) / (rows - 1) - self.per_row)
            else:
                self.drafted_batches += 1
                weight = max(self.smoothing, 1.0 / self.drafted_batches)
                extra = self._curve(total) - self._curve(rows)
                if extra > 0:  # bounded: one odd forward must not make drafting free or forbidden
                    ratio = min(max((seconds - self(rows, rows)) / extra, 0.5), 4.0)
                    self.marginal += weight * (ratio - self.marginal)
            return
        i = min(range(len(self.tokens)), key=lambda j: abs(math.log(self.tokens[j] / total)))
        # Scale the observation to the point it corrects by the curve's own shape in between: its stored points,
        # not the non-decreasing read (a point below a higher neighbour scaled by that read was pulled a little
        # lower by every forward near it; measured: t(16) fell to 0.5 ms against 21 ms for t(1), and the curve
        # read 16-token trees as cheap as 8-token ones). A forward never costs less for more tokens, nor more
        # than in proportion to them: the shape is bounded by that, whatever the points say.
        shape = self.seconds[i] / piecewise_linear(self.tokens, self.seconds, total)
        low, high = sorted((1.0, self.tokens[i] / total))
        target = seconds * min(max(shape, low), high)
        self.counts[i] += 1
        weight = max(self.smoothing, 1.0 / (self.counts[i] + 4))  # the measurement counts as 4 observations
        self.seconds[i] += weight * (target - self.seconds[i])
        self.drift = max(self.drift, abs(math.log(self.seconds[i] / self._loaded[i])))
        if self.path is not None and self.drift > math.log(1.5) and self.counts[i] >= 20:
            self.save(self.path)  # the cached curve was off by more than 1.5x: heal it

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps({"tokens": self.tokens, "seconds": self.seconds}))
        self._loaded, self.drift = list(self.seconds), 0.0

    def __repr__(self) -> str:
        return "CostModel(" + ", ".join(f"{t}: {1000 * s:.1f}ms" for t, s in zip(self.tokens, self.seconds,
                                                                                   strict=True)) + ")"


def flat_span(cost: CostModel, tokens: int, most: int = 4, tolerance: float = 1.1) -> int:
    """The largest m in 1, 2, 4 ... `most` for which a forward over m * `tokens` query tokens costs at most
    `tolerance` times one over `tokens`: how much wider a tree is next to free on this curve (CPUs: 1; an
    H200 running SmolLM2-135M at launch overhead: t(128)/t(1) = 1.08, so 4)."""
    m = 1
    while 2 * m <= most and cost(2 * m * tokens) <= tolerance * cost(tokens):
        m *= 2
    return m


def drafting_rate(cost: CostModel, accept: float = 0.7, depth: int = 16) -> float:
    """Tokens per second of the best chain length when each draft node is accepted with `accept`."""
    return max(sum(accept ** i for i in range(n + 1)) / cost(n + 1) for n in range(depth + 1))


def measure_cost(model: torch.nn.Module, tokens: tuple[int, ...] = TOKENS, context: int = 256,
                 reps: int = 3) -> CostModel:
    """Time `Verifier` forwards of T query tokens over `context`-token caches, as decoding runs them.

    T up to 16 is one row (one request with a draft chain); larger T is split into rows of 16,
    the way a batch fills a forward. Cases are interleaved; the fastest run of each is kept (the
    least disturbed one) and a larger T is never taken as cheaper than a smaller one.
    """
    from .verify import Verifier

    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(0)
    verifiers: dict[int, Verifier] = {}  # by row count: token counts with as many rows share one prefill
    setups = {}
    for total in tokens:
        rows = max(1, total // 16)
        if rows not in verifiers:
            verifiers[rows] = Verifier(model)
            for r in range(rows):
                verifiers[rows].add(r, torch.randint(0, vocab, (context,), generator=gen).tolist())
        sizes = [total // rows + (1 if r < total % rows else 0) for r in range(rows)]
        setups[total] = verifiers[rows], [DraftTree.chain(1, list(range(2, 1 + n))) for n in sizes]

    def timed(total: int) -> float:
        verifier, trees = setups[total]
        seconds = stopwatch(lambda: verifier.verify(trees), verifier.device)
        verifier.abort()
        return seconds

    runs = interleaved(tokens, timed, reps)
    seconds: list[float] = []
    for t in tokens:
        seconds.append(max(min(runs[t]), seconds[-1]) if seconds else min(runs[t]))
    return CostModel(list(tokens), seconds)


def cpu_info(path: Path = Path("/proc/cpuinfo")) -> tuple[str, list[str]]:
    """The CPU's model name with its family and model numbers ('' where unknown) and its instruction-set
    flags that decide kernel speed. The numbers tell apart what a VM names alike: "AMD EPYC" was a Zen 3
    (family 25 model 1, AVX2 only) on one machine and a Zen 4 (model 17, AVX-512 bf16) on another."""
    fields: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in fields:  # the first processor's block is read; the others repeat it
                break
            fields[key] = value.strip()
    except OSError:
        pass
    name = fields.get("model name", "")
    if name and "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']} model {fields['model']})"
    flags = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "amx", "fma", "sse4")))
    return name, flags


# Caps on the instruction sets MKL, oneDNN and ATen may use: they change kernel speed on the same CPU.
ISA_CAPS = ("MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def machine_key() -> str:
    """CPU model and instruction-set flags (and any cap on those the libraries may use: what decides kernel
    speed), torch version and threads."""
    name, cpu_flags = cpu_info()
    cpu, flags = platform.processor(), " ".join(cpu_flags)
    if not cpu.strip() and name:
        cpu = name
    if torch.cuda.is_available():
        cpu += " " + torch.cuda.get_device_name()
    caps = ",".join(f"{k}={os.environ[k]}" for k in ISA_CAPS if os.environ.get(k))
    raw = f"{cpu}|{flags}|{torch.__version__}|t{torch.get_num_threads()}" + (f"|{caps}" if caps else "")
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def cost_path(key: str, dtype: torch.dtype, device: str) -> Path:
    """Where the curve of model `key` in `dtype` on `device` is cached for this machine."""
    name = f"{key}-{str(dtype).removeprefix('torch.')}-{device}-{machine_key()}"
    return cache_root() / "cost" / ("".join(c if c.isalnum() or c in "-._" else "_" for c in name) + ".json")


def cached_cost(path: Path) -> CostModel | None:
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return CostModel(data["tokens"], data["seconds"], path=path)
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or from an older version: measure again
    return None


def load_cost(model: torch.nn.Module, key: str, check: tuple[int, ...] = (1, 8)) -> CostModel:
    """The cost curve of `model` on this machine: cached per model/dtype/device/CPU/flags/torch/threads,
    measured on first use (seconds for a small model), corrected and re-saved as it runs; a cached one is read
    at the level of a few live forwards (`at_level`).

    A cached curve is checked against a few live forwards first (T in `check`): one measured while
    something else loaded the machine, or on another kernel build, would otherwise steer every
    decision made before online correction caught up (dtype auto decides before any request runs)."""
    param = next(model.parameters())
    path = cost_path(key, param.dtype, param.device.type)
    cost = cached_cost(path)
    if cost is not None:
        live = measure_cost(model, tokens=check, reps=2)
        if agrees(cost, live):
            return at_level(cost, live)
    cost = measure_cost(model)
    cost.path = path
    cost.save(path)
    return cost


def at_level(cached: CostModel, live: CostModel) -> CostModel:
    """The cached curve's shape at the level of live forwards (the geometric mean of live / cached where both are).

    Sizing reads only ratios t(k)/t(1); `dtype="auto"` compares levels between candidates, and cached curves are
    taken at different times on a machine whose speed drifts. Measured on Zen 5: bf16 packed cached at t(1) =
    22.8 ms, t(8) = 30.3 against 17.5 and 19.2 live; fp32 packed 24.0 / 27.1 against 21.2 / 25.5. Read as cached,
    `auto` put them at ~112 and ~116 tok/s and kept fp32, where fresh curves gave 157 and 116, and bf16 packed
    decoded twelve edits 1.43x faster."""
    pairs = [(t, s) for t, s in zip(live.tokens, live.seconds, strict=True) if s > 0]
    if not pairs:
        return cached
    scale = math.exp(sum(math.log(s / cached(t)) for t, s in pairs) / len(pairs))
    return CostModel(cached.tokens, [s * scale for s in cached.seconds], path=cached.path)


def agrees(cached: CostModel, live: CostModel, tolerance: float = 1.5) -> bool:
    """Whether live timings at a few token counts lie within `tolerance`x of the cached curve."""
    return all(1 / tolerance <= s / cached(t) <= tolerance for t, s in zip(live.tokens, live.seconds, strict=True))
