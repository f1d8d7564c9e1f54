"""Calibration: what fraction of draft nodes with a given score the model accepted.

Scores are rough estimates (trie frequencies, a source's own probability); acceptance is a fact.
A calibration learns, per score bin, the observed acceptance rate, pulled towards the score itself
while a bin has seen little. The drafter keeps one for fused scores (what the sizing policy reads)
and one per source (its trust curve).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Calibration:
    """Observed acceptance rate per score bin, with a prior pulling towards the score itself."""
    bins: int = 10
    prior: float = 4.0
    seen: list[float] = field(default_factory=list)
    accepted: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.seen = list(self.seen) or [0.0] * self.bins
        self.accepted = list(self.accepted) or [0.0] * self.bins
        if len(self.seen) != self.bins or len(self.accepted) != self.bins:
            raise ValueError(f"a calibration needs {self.bins} bins")

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
