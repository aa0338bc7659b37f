"""The FMA roofline the benchmark tables measure against: the core's float32 and float64
peak of fused multiply-adds, measured, not taken from a data sheet.

    python -m bench.peers.roofline     prints one JSON line {"float32": GFLOP/s, "float64": ...}

How: 12 independent vector accumulators (kernels/simd.py, 256-bit), each updated by one
fused multiply-add per loop iteration: enough independent chains to cover the FMA latency
on any current x86 core, so the loop runs at the FMA units' throughput. 2 FLOPs per lane
per FMA. The runner calls it pinned to core 0 (taskset), like the 1-thread measurements;
the 2-thread roofline is twice the 1-core peak. The achieved rate of a workload over this
peak says how far from the hardware limit it runs; its FLOP count is the workload's own
(bench/peers/workloads.py: multiply-adds of the algorithm, 2 FLOPs each).
"""
import json
import os
import time

import numpy as np


def _kernel():
    from numba import njit

    from metacore.kernels.simd import vadd, vfma, vload, vstore, vzero

    @njit(cache=False)
    def fma_loop(x, n):
        a, b = vload(x, 0), vload(x, 0)
        c0 = c1 = c2 = c3 = c4 = c5 = c6 = c7 = c8 = c9 = c10 = c11 = vzero(x)
        for _ in range(n):
            c0, c1, c2, c3 = vfma(a, b, c0), vfma(a, b, c1), vfma(a, b, c2), vfma(a, b, c3)
            c4, c5, c6, c7 = vfma(a, b, c4), vfma(a, b, c5), vfma(a, b, c6), vfma(a, b, c7)
            c8, c9, c10, c11 = vfma(a, b, c8), vfma(a, b, c9), vfma(a, b, c10), vfma(a, b, c11)
        s = vadd(vadd(vadd(c0, c1), vadd(c2, c3)), vadd(vadd(c4, c5), vadd(c6, c7)))
        vstore(x, 0, vadd(s, vadd(vadd(c8, c9), vadd(c10, c11))))  # keeps the loop alive
    return fma_loop


def fma_peak(dtype, n=2_000_000, repeats=7):
    """Best of `repeats` runs of the FMA loop, in GFLOP/s (one core, this process)."""
    fma_loop = _kernel()
    x = np.full(64, 1e-3, dtype)
    lanes = 32 // x.itemsize
    fma_loop(x, 10)                                   # compile
    # the runner's --clock cpu: this thread's CPU time (on a shared core the wall time of
    # a few milliseconds counts other processes' slices)
    clock = time.thread_time if os.environ.get("METACORE_BENCH_CLOCK") == "cpu" \
        else time.perf_counter
    best = float("inf")
    for _ in range(repeats):
        x[:] = 1e-3
        t0 = clock()
        fma_loop(x, n)
        best = min(best, clock() - t0)
    return 12 * lanes * 2 * n / best / 1e9


def main():
    print(json.dumps({"float32": fma_peak(np.float32), "float64": fma_peak(np.float64)}))


if __name__ == "__main__":
    main()
