"""ProtoNet loss + gradient at Q = N = 2000, D = 1600 (T = 1, float32, 1 thread): metacore's
BLAS route against the plain NumPy BLAS expansion (the peer), issue 17 item 4.

    taskset -c 1 python bench/bench_protonet_blas.py [--rounds 7]

Rows, each checked first against a float64 direct formula (bench_distance.check), then timed
in interleaved rounds (one call of each per round, the order rotated every round):
  blas-route   metacore.kernels.distance.protonet_loss (Numba backend; from Q N D >= 2^24
               its BLAS route: 3 GEMMs through NumPy, NumPy softmax, the centred route's
               a-priori tests)
  gemm-route   the previous route (the same GEMMs called by np.dot inside Numba, Numba
               softmax), BLAS_TERMS raised so that it is taken
  numpy-blas   bench_distance.blas_protonet_loss: |q|^2 + |s|^2 - 2 q s^T, NumPy softmax,
               backward 2 (rowsum(G) q - G s), 2 (colsum(G) s - G^T q)
Reported: per row the median wall time and median CPU time (time.thread_time: fair on a
shared core), and the median over rounds of the per-round ratio numpy-blas / row (> 1: the
row is faster). FLOPs: 6 Q N D (three GEMMs of 2 Q N D).
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_distance import blas_protonet_loss, check, make  # noqa: E402

from metacore.kernels import distance as K  # noqa: E402


def main(rounds=7):
    mod = K._backend("route", "numba")
    q, s, g, y = make("large")
    T, Q, D = q.shape
    N = s.shape[1]

    def gemm_route():
        old = mod.BLAS_TERMS
        mod.BLAS_TERMS = 1 << 62
        try:
            return K.protonet_loss(q, s, y)
        finally:
            mod.BLAS_TERMS = old

    rows = {"blas-route": lambda: K.protonet_loss(q, s, y), "gemm-route": gemm_route,
            "numpy-blas": lambda: blas_protonet_loss(q, s, y)}
    for name, fn in rows.items():
        check("protonet", fn(), q, s, g, y)                    # warm-up and correctness
    wall = {n: [] for n in rows}
    cpu = {n: [] for n in rows}
    names = list(rows)
    for r in range(rounds):
        for n in names[r % 3:] + names[:r % 3]:
            t0, c0 = time.perf_counter(), time.thread_time()
            rows[n]()
            cpu[n].append(time.thread_time() - c0)
            wall[n].append(time.perf_counter() - t0)
    fl = 6 * T * Q * N * D
    print(f"ProtoNet loss + gradient, Q = {Q}, N = {N}, D = {D}, float32, 1 thread, "
          f"{rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    print("| row | wall median | CPU median | GFLOP/s (CPU) | numpy-blas / row (wall, "
          "median of per-round ratios) | same, CPU |")
    print("|---|---|---|---|---|---|")
    for n in names:
        rw = np.median(np.array(wall["numpy-blas"]) / np.array(wall[n]))
        rc = np.median(np.array(cpu["numpy-blas"]) / np.array(cpu[n]))
        print(f"| {n} | {np.median(wall[n]) * 1e3:.1f} ms | {np.median(cpu[n]) * 1e3:.1f} ms "
              f"| {fl / np.median(cpu[n]) / 1e9:.1f} | {rw:.3f}x | {rc:.3f}x |")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    main(ap.parse_args().rounds)
