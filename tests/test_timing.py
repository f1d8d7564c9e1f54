"""The interleaved timing loop shared by the cost curves (drafter, server, benchmark)."""
from __future__ import annotations

from lookahead.timing import interleaved


def test_every_case_is_timed_once_per_round_in_shuffled_order_and_warm_up_is_dropped():
    calls: list[str] = []

    def timed(case: str) -> float:
        calls.append(case)
        return float(len(calls))  # the call's rank stands in for its duration

    runs = interleaved(["a", "b", "c"], timed, reps=3, warmup=2)
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 5 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert {len(v) for v in runs.values()} == {3}
    assert min(min(v) for v in runs.values()) == 7.0     # the 6 warm-up calls are not kept
    assert len({tuple(r) for r in rounds}) > 1            # the order changes between rounds (seeded)
