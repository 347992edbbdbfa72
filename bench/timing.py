"""The benchmarks' timer: the median of repeated calls, after one untimed warm-up call."""
from __future__ import annotations

import statistics
import time


def median_time(fn, repeats: int, *, warm_up: bool = True) -> float:
    """Median seconds of `repeats` calls of fn (a first call, untimed, unless warm_up=False)."""
    if warm_up:
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
