"""The one timing rule of the benchmarks here: one warm-up call, then the median of N timed calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, sync: Callable[[], Any]) -> float:
    """Median wall seconds of `repeats` calls of `fn` after one untimed warm-up call.

    `sync` waits for queued device work (torch.cuda.synchronize on a GPU), so asynchronous
    kernels are counted in the call that launched them.
    """
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
