"""Threads over the tasks of a meta-batch, for the algorithms whose tasks are independent
until the final mean (MAML and its first-order variant).

Why threads and not BLAS threads: a Conv-4 meta-batch is a sequence of small per-task GEMMs
and memory-bound elementwise kernels. A multithreaded OpenBLAS splits each small GEMM and
leaves the elementwise passes on one core: in the peer benchmark run before this module
(Conv-4 second-order MAML, T = 4), two BLAS threads made the step slower than one (259
against 154 ms); two task threads make it faster (BENCHMARKS.md). Splitting the tasks instead
gives each thread whole tasks: its GEMMs, and its elementwise kernels, which are compiled
with nogil=True (metacore.kernels.convnet_numba) and so run beside each other.

While the threads run, OpenBLAS is held at one thread (metacore.blas), a process-wide
setting that is restored afterwards.
"""
from concurrent.futures import ThreadPoolExecutor
import numbers

import numpy as np

from metacore.blas import blas_threads


def block_bounds(T, R):
    """Block r of R covers tasks [b[r], b[r+1]) of T: contiguous blocks whose sizes differ by
    at most one, the larger ones first (numpy.array_split's rule). -> b, (R + 1,) ints."""
    sizes = [T // R + (1 if r < T % R else 0) for r in range(R)]
    return np.concatenate([[0], np.cumsum(sizes)]).astype(int)


def check_workers(op, workers):
    """workers: an int >= 1 (returned as int)."""
    if isinstance(workers, bool) or not isinstance(workers, numbers.Integral) or workers < 1:
        raise ValueError(f"{op}: workers must be an int >= 1, got {workers!r}")
    return int(workers)


def map_task_blocks(fn, T, workers):
    """Split T tasks into min(workers, T) contiguous blocks and run fn(lo, hi) for each, one
    thread per block, with OpenBLAS at one thread. -> [(lo, hi, fn(lo, hi)), ...] in task
    order. An exception in any block is raised here (the first block's first)."""
    b = block_bounds(T, min(workers, T))
    spans = [(int(b[r]), int(b[r + 1])) for r in range(len(b) - 1)]
    if len(spans) == 1:
        return [(0, T, fn(0, T))]
    with blas_threads(1), ThreadPoolExecutor(max_workers=len(spans)) as pool:
        futures = [pool.submit(fn, lo, hi) for lo, hi in spans]
        return [(lo, hi, f.result()) for (lo, hi), f in zip(spans, futures)]
