"""Calibration: what fraction of draft nodes with a given score the model accepted.

Scores are rough estimates (trie frequencies, a source's own probability); acceptance is a fact.
A calibration learns, per score bin, the observed acceptance rate. A bin that has seen little is
pulled towards score x ratio, the ratio being accepted nodes per unit of score over every bin: one
rejection teaches every bin a little, so a cold state stops trusting its scores within a few steps
instead of one bin at a time. Before any evidence the ratio is `cold`.

Why not trust scores when cold: a prompt's n-gram seen once continues one way with trie probability
1.0, so a cold identity calibration expected a 12-node chain to be accepted whole (measured on a
code prompt: 12.0 tokens expected, 1 accepted; the sizing verified such trees for 20 steps).
The drafter keeps one calibration for fused scores (what the sizing policy reads) and one per
source (its trust curve).
"""
from __future__ import annotations

from dataclasses import dataclass, field

RATIO_PRIOR = 8.0  # weight, in units of score, of the cold ratio against the evidence


@dataclass
class Calibration:
    """Observed acceptance rate per score bin, with a prior pulling towards score x the overall ratio."""
    bins: int = 10
    prior: float = 4.0
    cold: float = 1.0   # accepted per unit of score believed before any evidence
    seen: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seen = list(self.seen) or [0.0] * self.bins
        self.accepted = list(self.accepted) or [0.0] * self.bins
        if len(self.seen) != self.bins or len(self.accepted) != self.bins:
            raise ValueError(f"a calibration needs {self.bins} bins")
        self._update_ratio()

    def _bin(self, score: float) -> int:
        return min(int(score * self.bins), self.bins - 1)

    def _update_ratio(self) -> None:
        scored = sum(n * (b + 0.5) / self.bins for b, n in enumerate(self.seen))  # bin centres: no extra state
        self.ratio = (sum(self.accepted) + RATIO_PRIOR * self.cold) / (scored + RATIO_PRIOR)

    def __call__(self, score: float) -> float:
        b = self._bin(score)
        return (self.accepted[b] + self.prior * min(1.0, score * self.ratio)) / (self.seen[b] + self.prior)

    def observe(self, scores: list[float], accepted: list[bool]) -> None:
        for s, a in zip(scores, accepted, strict=True):
            b = self._bin(s)
            self.seen[b] += 1
            self.accepted[b] += a
        self._update_ratio()
