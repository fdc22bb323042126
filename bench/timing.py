"""Best-of timing for the benchmarks; standard library only, so the peer environment's workers
(bench/peer/) can use it too."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def best_of(fn: Callable[[], T], repeats: int = 3) -> tuple[T, float]:
    """One warm-up call, then ``repeats`` timed calls: (the last result, the fastest seconds).
    The best of several damps noise from other processes on a shared machine."""
    fn()
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best
