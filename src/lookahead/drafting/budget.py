"""Draft size from measured cost: verify as many nodes as pay for themselves.

A best-first tree lists its nodes in non-increasing score order, and any prefix of that list
is a tree. If node i's path is accepted with probability a_i, a tree of its first n nodes
emits 1 + sum(a_1..a_n) tokens in expectation and costs t(n + 1), the measured time of one
forward over n + 1 tokens. We keep the n with the most tokens per second.

a_i comes from the node's score through a calibration learned online (scores are rough
frequency estimates; what fraction of nodes with such a score the model accepted is a fact).
"""
from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field

import torch

from ..timing import interleaved, stopwatch
from ..weights import cache_root


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
    """Verify cost t(k) of one forward over k new tokens, relative to k = 1; linear in between."""
    ks: list[int]
    times: list[float]

    def __post_init__(self) -> None:
        if not self.ks or self.ks[0] != 1 or sorted(self.ks) != self.ks or len(self.ks) != len(self.times):
            raise ValueError("CostModel needs increasing ks starting at 1, one time each")
        base = self.times[0]
        self.times = [t / base for t in self.times]

    def __call__(self, k: int) -> float:
        return piecewise_linear(self.ks, self.times, k)

    @classmethod
    def flat(cls) -> CostModel:
        """Free verification: the fixed budget is always used in full."""
        return cls([1, 2], [1.0, 1.0])


@dataclass
class Calibration:
    """Observed acceptance rate per score bin, with a prior pulling towards the score itself."""
    bins: int = 10
    prior: float = 4.0
    seen: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seen = self.seen or [0.0] * self.bins
        self.accepted = self.accepted or [0.0] * self.bins

    def _bin(self, score: float) -> int:
        return min(int(score * self.bins), self.bins - 1)

    def __call__(self, score: float) -> float:
        b = self._bin(score)
        return (self.accepted[b] + self.prior * score) / (self.seen[b] + self.prior)

    def observe(self, scores: list[float], accepted: list[bool]) -> None:
        for s, a in zip(scores, accepted, strict=True):
            b = self._bin(s)
            self.seen[b] += 1
            self.accepted[b] += a


def best_size(scores: list[float], cost: CostModel, calibration: Calibration, rows: int = 1) -> int:
    """Number of draft nodes (a prefix of best-first `scores`, root excluded) maximising tokens per cost.

    `rows` sequences verified in the same forward share its cost: each row's k tokens cost
    t(rows * k) / rows of a one-token forward.
    """
    best_n, best_rate, expected = 0, 1.0 / cost(rows), 1.0
    for n, score in enumerate(scores, start=1):
        expected += calibration(score)
        rate = expected / cost(rows * (n + 1))
        if rate > best_rate:
            best_n, best_rate = n, rate
    return best_n


def measure_cost(model: torch.nn.Module, ks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64), context: int = 256,
                 reps: int = 5) -> CostModel:
    """Time one forward over k new tokens on a `context`-token cache (median of `reps` per k).

    The ks are timed interleaved (see `timing.interleaved`); a larger k is never taken as
    cheaper than a smaller one.
    """
    from ..decoding.kv import compact, new_cache

    device = next(model.parameters()).device
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (1, context + max(ks)), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.inference_mode():
        cache = new_cache()
        model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1)

        def timed(k: int) -> float:
            seconds = stopwatch(lambda: model(input_ids=ids[:, context:context + k], past_key_values=cache,
                                              use_cache=True), device)
            compact(cache, context, [])  # back to the context-token cache
            return seconds

        runs = interleaved(ks, timed, reps)
    times: list[float] = []
    for k in ks:
        median = sorted(runs[k])[len(runs[k]) // 2]
        times.append(max(median, times[-1]) if times else median)
    return CostModel(list(ks), times)


def cached_cost(model: torch.nn.Module, key: str) -> CostModel:
    """measure_cost once per model/dtype/device/threads; later loads read the cached curve."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    name = f"{key}-{str(dtype).removeprefix('torch.')}-{device.type}-t{torch.get_num_threads()}"
    name = "".join(c if c.isalnum() or c in "-._" else "_" for c in name)
    root = cache_root() / "cost"
    path = root / f"{name}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            return CostModel(data["ks"], data["times"])
        except (ValueError, KeyError):
            pass  # unreadable: measure again
    cost = measure_cost(model)
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ks": cost.ks, "times": cost.times}))
    return cost
