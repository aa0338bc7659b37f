"""Episodic distance kernels: reference vs Numba vs the plain NumPy BLAS formulation.

Run: python -m pytest bench/bench_distance.py --benchmark-only -q

Shape letters: T tasks, Q queries, N supports/prototypes, D features. float32 throughout.

Sizes (issue 4, item 7): episodic 5-way (T=1, Q=75, N=5, D=64), episodic 20-way (T=1,
Q=300, N=20, D=64), large (T=1, Q=2000, N=2000, D=1600; BLAS runs near its FMA peak there),
plus ProtoNet's 60-way training episode (T=1, Q=300, N=60, D=64). The reference is skipped
at the large size: its (T, Q, N, D) float64 difference tensor would take 51 GB.

Two ways to run it:
    python -m pytest bench/bench_distance.py --benchmark-only -q      (pytest-benchmark)
    python bench/bench_distance.py [--cpu] [--rounds R] [--episodes E]
the second prints one table: for each op and size the median time of the Numba kernel and
of its baseline, measured in interleaved rounds (kernel, baseline, kernel, ...) so that a
change of machine load hits both alike, their ratio, GFLOP/s, and the load average; --cpu
times with time.thread_time (CPU time of the calling thread: fair on a loaded machine when
NUMBA_NUM_THREADS=1 and OPENBLAS_NUM_THREADS=1). It ends with ProtoNet training episodes per
second (60-way 1-shot 5-query, Conv-4, float32, the paper's episode) with each distance
backend.

Nominal FLOP counts, the same for every backend so that GFLOP/s ratios are time ratios:
    sqeuclidean forward   3 T Q N D   (subtract, multiply, add per term)
    l1 forward            3 T Q N D   (subtract, abs, add)
    cosine forward        2 T Q N D   (multiply, add; the norms are O((Q + N) D))
    sqeuclidean backward  6 T Q N D   (dq and ds, each subtract, multiply, add per term)
    protonet loss         9 T Q N D   (sqeuclidean forward + backward; softmax is O(T Q N))
Every benchmark checks its result against a float64 direct formula first, warms up (the
first call compiles), and records GFLOP/s and the ratio of its median to the baseline's
median, both measured in this run, in benchmark.extra_info. Baselines: the BLAS expansion
|q|^2 + |s|^2 - 2 q s^T via matmul for sqeuclidean (forward and backward) and cosine; the
NumPy reference for L1; for the ProtoNet loss the same BLAS expansion, NumPy softmax
cross-entropy and the BLAS backward (blas_protonet_loss).
"""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # script use
from _timing import median_seconds  # noqa: E402

import metacore  # noqa: F401,E402
from metacore.kernels import distance as K  # noqa: E402

SIZES = {
    "episodic": (1, 75, 5, 64),
    "episodic20": (1, 300, 20, 64),
    "protonet": (1, 300, 60, 64),
    "large": (1, 2000, 2000, 1600),
}
FLOPS_PER_TERM = {"sqeuclidean": 3, "l1": 3, "cosine": 2, "sqeuclidean_backward": 6,
                  "protonet": 9}
BACKENDS = ["reference", "numba", "blas"]


def make(size, seed=0):
    T, Q, N, D = SIZES[size]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, Q, D)).astype(np.float32)     # (T, Q, D)
    s = rng.standard_normal((T, N, D)).astype(np.float32)     # (T, N, D)
    g = rng.standard_normal((T, Q, N)).astype(np.float32)     # (T, Q, N)
    y = rng.integers(0, N, (T, Q))                             # (T, Q)
    return q, s, g, y


# ---------------------------------------------------------------- BLAS formulations
def blas_sqeuclidean(q, s):
    sT = s.transpose(0, 2, 1)
    return ((q * q).sum(-1)[:, :, None] + (s * s).sum(-1)[:, None, :]
            - 2 * np.matmul(q, sT))


def blas_sqeuclidean_backward(g, q, s):
    dq = 2 * (g.sum(2)[..., None] * q - np.matmul(g, s))
    ds = 2 * (g.sum(1)[..., None] * s - np.matmul(g.transpose(0, 2, 1), q))
    return dq, ds


def blas_cosine(q, s):
    qn = np.maximum(np.linalg.norm(q, axis=-1), K.EPS)
    sn = np.maximum(np.linalg.norm(s, axis=-1), K.EPS)
    return np.matmul(q / qn[..., None], (s / sn[..., None]).transpose(0, 2, 1))


def blas_protonet_loss(q, s, y):
    """The ProtoNet loss the plain NumPy/BLAS way: logits = -(|q|^2 + |s|^2 - 2 q s^T),
    log-softmax cross-entropy (mean over queries), its gradient, the BLAS backward."""
    T, Q = q.shape[:2]
    logits = -blas_sqeuclidean(q, s)                                  # (T, Q, N)
    m = logits.max(-1, keepdims=True)
    e = np.exp(logits - m)
    z = e.sum(-1, keepdims=True)
    ly = np.take_along_axis(logits, y[..., None], -1)[..., 0]        # (T, Q)
    loss = (np.log(z[..., 0]) + m[..., 0] - ly).mean(1)              # (T,)
    p = e / z
    p[np.arange(T)[:, None], np.arange(Q)[None, :], y] -= 1          # softmax - onehot
    dq, ds = blas_sqeuclidean_backward(p / -Q, q, s)                  # d logits / d d = -1
    return loss, dq, ds, logits.argmax(-1)


def calls(op, backend, q, s, g, y):
    """The zero-argument call timed for (op, backend), or None where it does not exist."""
    if backend == "blas":
        table = {"sqeuclidean": lambda: blas_sqeuclidean(q, s),
                 "cosine": lambda: blas_cosine(q, s),
                 "sqeuclidean_backward": lambda: blas_sqeuclidean_backward(g, q, s),
                 "protonet": lambda: blas_protonet_loss(q, s, y)}
        return table.get(op)
    if op == "protonet":
        return lambda: K.protonet_loss(q, s, y, backend=backend)
    if op.endswith("_backward"):
        fn = getattr(K, "pairwise_" + op)
        return lambda: fn(g, q, s, backend=backend)
    fn = getattr(K, "pairwise_" + op)
    return lambda: fn(q, s, backend=backend)


def baseline_of(op):
    return "reference" if op == "l1" else "blas"


# ---------------------------------------------------------------- result check
def check(op, result, q, s, g, y):
    """Compare with a float64 direct formula on the first (up to) 16 queries of task 0."""
    rows = min(16, q.shape[1])
    q64, s64, g64 = (x[:1].astype(np.float64) for x in (q, s, g))
    diff = q64[:, :rows, None, :] - s64[:, None, :, :]       # (1, rows, N, D)
    if op == "sqeuclidean":
        got, want = result[:1, :rows], (diff ** 2).sum(-1)
        tol = 1e-4 * np.abs(want).max()
    elif op == "l1":
        got, want = result[:1, :rows], np.abs(diff).sum(-1)
        tol = 1e-4 * np.abs(want).max()
    elif op == "cosine":
        qn = np.linalg.norm(q64[:, :rows], axis=-1)[..., None]
        sn = np.linalg.norm(s64, axis=-1)[:, None, :]
        got, want = result[:1, :rows], np.matmul(q64[:, :rows], s64.transpose(0, 2, 1)) / (qn * sn)
        tol = 1e-5
    elif op == "sqeuclidean_backward":
        got = result[0][:1, :rows]
        want = (2 * g64[:, :rows, :, None] * diff).sum(2)
        tol = 1e-4 * np.abs(want).max()
    else:   # protonet: the loss against the reference at these sizes, or skip at large
        if q.shape[1] * s.shape[1] * q.shape[2] > 1e7:
            return
        ref_loss = K.protonet_loss(q.astype(np.float64), s.astype(np.float64), y,
                                   backend="reference")[0]
        got, want, tol = result[0], ref_loss, 1e-4 * np.abs(ref_loss).max()
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= tol, f"{op}: max error {err:.3g} above {tol:.3g}; not timing a wrong result"


OPS = ["sqeuclidean", "l1", "cosine", "sqeuclidean_backward", "protonet"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, op, size, backend):
    if backend == "reference" and size == "large":
        pytest.skip("reference needs a 51 GB (T, Q, N, D) float64 tensor at this size")
    if backend == "numba" and "numba" not in K.available_backends():
        pytest.skip("numba not installed")
    q, s, g, y = make(size)
    fn = calls(op, backend, q, s, g, y)
    if fn is None:
        pytest.skip(f"no {backend} formulation of {op}")
    check(op, fn(), q, s, g, y)                  # also the warm-up (compiles numba)
    large = size == "large"
    result = benchmark.pedantic(fn, rounds=3 if large else 20, warmup_rounds=1)
    check(op, result, q, s, g, y)
    T, Q, N, D = SIZES[size]
    flops = FLOPS_PER_TERM[op] * T * Q * N * D
    med = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = round(flops / med / 1e9, 3)
    base = baseline_of(op)
    if base != backend and not (base == "reference" and large):
        base_fn = calls(op, base, q, s, g, y)
        base_med = median_seconds(base_fn, 3 if large else 10, warmup=True)
        benchmark.extra_info["baseline"] = base
        benchmark.extra_info["time_over_baseline"] = round(med / base_med, 3)


# ---------------------------------------------------------------- the table (python bench/...)
def _once(fn, timer):
    t0 = timer()
    fn()
    return timer() - t0


def table(rounds=7, cpu=False, sizes=tuple(SIZES)):
    """Interleaved medians of numba vs its baseline for every op and size -> rows (dicts)."""
    import time
    timer = time.thread_time if cpu else time.perf_counter
    rows = []
    for size in sizes:
        q, s, g, y = make(size)
        T, Q, N, D = SIZES[size]
        for op in OPS:
            base = baseline_of(op)
            if base == "reference" and size == "large":
                continue
            fn, bfn = calls(op, "numba", q, s, g, y), calls(op, base, q, s, g, y)
            check(op, fn(), q, s, g, y)                      # warm-up and correctness
            bfn()
            r = 3 if size == "large" else rounds
            inner = 1 if size == "large" else max(1, int(2e6 // (T * Q * N * D)))
            tk, tb = [], []
            for _ in range(r):
                tk.append(sum(_once(fn, timer) for _ in range(inner)) / inner)
                tb.append(sum(_once(bfn, timer) for _ in range(inner)) / inner)
            mk, mb = float(np.median(tk)), float(np.median(tb))
            rows.append(dict(op=op, size=size, shape=(T, Q, N, D), numba_s=mk, base=base,
                             base_s=mb, speed_vs_base=mb / mk,
                             gflops=FLOPS_PER_TERM[op] * T * Q * N * D / mk / 1e9,
                             load=os.getloadavg()[0]))
            print(f"{op:<21} {size:<10} numba {mk * 1e6:>11.1f} us  {base:<9} "
                  f"{mb * 1e6:>11.1f} us  speed x{mb / mk:5.2f}  "
                  f"{rows[-1]['gflops']:6.2f} GFLOP/s  load {rows[-1]['load']:.1f}",
                  flush=True)
    return rows


def protonet_episodes_per_second(episodes=5, cpu=False):
    """Training episodes per second of ProtoNet 60-way 1-shot 5-query on Omniglot (Conv-4,
    float32, gradient of one episode) with each distance backend, interleaved."""
    import time
    from metacore.algorithms.protonet import ProtoNet
    from metacore.data.omniglot import EpisodeSampler, load_omniglot, split_characters
    timer = time.thread_time if cpu else time.perf_counter
    data = load_omniglot()
    sampler = EpisodeSampler(data.images, split_characters(data, "vinyals", "train"), 60, 1, 5,
                             seed=0)
    eps = [sampler.sample(1) for _ in range(episodes)]
    nets = {b: ProtoNet(backend=b) for b in ("numba", "reference")}
    params = nets["numba"].init_params(np.random.default_rng(0), np.float32)
    times = {b: [] for b in nets}
    for i, e in enumerate([eps[0]] + eps):
        for b, net in nets.items():
            t0 = timer()
            net.episode_loss_and_grad(params, e.support_x, e.support_y, e.query_x, e.query_y)
            if i:                                             # the first round warms up
                times[b].append(timer() - t0)
    for b, ts in times.items():
        print(f"ProtoNet 60-way 1-shot training episode, distance backend {b:<9}: "
              f"{1 / np.median(ts):.2f} episodes/s (median of {len(ts)})", flush=True)
    return {b: 1 / float(np.median(ts)) for b, ts in times.items()}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="distance kernels: numba vs BLAS table")
    ap.add_argument("--cpu", action="store_true", help="time with time.thread_time")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--episodes", type=int, default=5)
    ap.add_argument("--sizes", default=",".join(SIZES))
    a = ap.parse_args()
    table(a.rounds, a.cpu, tuple(a.sizes.split(",")))
    if a.episodes:
        protonet_episodes_per_second(a.episodes, a.cpu)
