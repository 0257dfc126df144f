"""Shared benchmark helpers."""

import statistics
import time
from typing import Callable


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of each function, after one warm-up call each. The calls are interleaved (round
    robin), so drifting load on a shared machine affects every contender alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per call of each function (see `interleaved_times`)."""
    return {name: statistics.median(t) for name, t in interleaved_times(fns, repeats).items()}
