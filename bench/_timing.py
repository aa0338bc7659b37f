"""The one timing helper of the benches: median wall time of repeated calls."""
import time

import numpy as np


def median_seconds(fn, repeats, warmup=False):
    """Median of `repeats` timed calls of fn(); warmup=True first makes one untimed call
    (compilation, caches), which must never be timed."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))
