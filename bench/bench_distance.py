"""Episodic distance kernels: reference vs Numba vs the plain NumPy BLAS formulation.

Run: python -m pytest bench/bench_distance.py --benchmark-only -q

Shape letters: T tasks, Q queries, N supports/prototypes, D features. float32 throughout.

Sizes: episodic (T=32, Q=75, N=5, D=64), ProtoNet training (T=1, Q=300, N=60, D=64),
large (T=1, Q=4096, N=4096, D=256; the size where BLAS runs near its FMA peak). The reference
is skipped at the large size: its (T, Q, N, D) float64 difference tensor would take 32 GiB.

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
NumPy reference for L1 and the ProtoNet loss (the reference at the small sizes only).
"""

import numpy as np
import pytest
from _timing import median_seconds

import metacore  # noqa: F401
from metacore.kernels import distance as K

SIZES = {
    "episodic": (32, 75, 5, 64),
    "protonet": (1, 300, 60, 64),
    "large": (1, 4096, 4096, 256),
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


def calls(op, backend, q, s, g, y):
    """The zero-argument call timed for (op, backend), or None where it does not exist."""
    if backend == "blas":
        table = {"sqeuclidean": lambda: blas_sqeuclidean(q, s),
                 "cosine": lambda: blas_cosine(q, s),
                 "sqeuclidean_backward": lambda: blas_sqeuclidean_backward(g, q, s)}
        return table.get(op)
    if op == "protonet":
        return lambda: K.protonet_loss(q, s, y, backend=backend)
    if op.endswith("_backward"):
        fn = getattr(K, "pairwise_" + op)
        return lambda: fn(g, q, s, backend=backend)
    fn = getattr(K, "pairwise_" + op)
    return lambda: fn(q, s, backend=backend)


def baseline_of(op):
    return "blas" if op in ("sqeuclidean", "cosine", "sqeuclidean_backward") else "reference"


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
        ref_loss = K.protonet_loss(q.astype(np.float64), s.astype(np.float64), y,
                                   backend="reference")[0] if q.shape[1] * s.shape[1] <= 1e5 \
            else None
        if ref_loss is None:
            return
        got, want, tol = result[0], ref_loss, 1e-4 * np.abs(ref_loss).max()
    err = float(np.abs(np.asarray(got, np.float64) - want).max())
    assert err <= tol, f"{op}: max error {err:.3g} above {tol:.3g}; not timing a wrong result"


OPS = ["sqeuclidean", "l1", "cosine", "sqeuclidean_backward", "protonet"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", OPS)
def test_bench(benchmark, op, size, backend):
    if backend == "reference" and size == "large":
        pytest.skip("reference needs a 32 GiB (T, Q, N, D) float64 tensor at this size")
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
