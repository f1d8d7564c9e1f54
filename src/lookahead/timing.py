"""Timing forwards on a shared, noisy machine.

Every case is timed once per round, in a shuffled order, so a slow spell (another process, a
frequency change) spreads over all cases instead of bending one of them; warm-up rounds are run
and dropped. Each caller times only its own critical section (`timed(case)` returns seconds),
so set-up such as copying a cache stays out of the figures.
"""
from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

Case = TypeVar("Case", bound=Hashable)


def interleaved(cases: Sequence[Case], timed: Callable[[Case], float], reps: int, warmup: int = 1, seed: int = 0,
                progress: Callable[[], None] | None = None) -> dict[Case, list[float]]:
    """{case: the `reps` timings of `timed(case)`}, cases shuffled anew each round."""
    rng = random.Random(seed)
    runs: dict[Case, list[float]] = {case: [] for case in cases}
    for rnd in range(warmup + reps):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            seconds = timed(case)
            if rnd >= warmup:
                runs[case].append(seconds)
        if progress:
            progress()
    return runs


def stopwatch(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn()` takes, waiting for the accelerator's queue to drain."""
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start
