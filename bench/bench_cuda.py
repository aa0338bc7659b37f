"""CUDA kernels ('numba-cuda', 'cupy') against the plain CuPy formulation, on a GPU.

Run: python -m pytest bench/bench_cuda.py --benchmark-only -q -s
Without a usable CUDA GPU (or without the cuda extra) the whole file skips with the reason.

Shape letters: T tasks, Q queries, N supports, D features; LRUA: T steps, B episodes,
H heads, S slots, W width. float32 throughout; every input already on the device (CuPy
arrays; the Numba CUDA backend takes them zero-copy through __cuda_array_interface__), so
no host transfer is timed. Each timed call ends with a device synchronisation.

Baselines ('plain', measured in the same run): the distance GEMM expansions through cuBLAS,
|q|^2 + |s|^2 - 2 q s^T (sqeuclidean forward, backward 2 (g 1 q - g s)) and q s^T / norms
(cosine); broadcast-and-reduce for L1 (in query chunks so the (Q, N, D) tensor fits); the
ProtoNet loss as that GEMM forward, CuPy softmax, and the GEMM backward; LRUA forward as a
Python loop over steps of batched CuPy ops (sort for the least-used threshold, matmul for
cosines and reads). There is no plain CuPy LRUA backward; its rows report the kernel alone.

Figures in benchmark.extra_info (formulas):
    GFLOP/s   nominal FLOPs / median, FLOPs as bench/bench_distance.py and bench_lrua.py:
              sqeuclidean 3 TQND, l1 3 TQND, cosine 2 TQND, sqeuclidean backward 6 TQND,
              l1 / cosine backward 6 TQND, protonet 9 TQND; LRUA forward 6 HSW T B,
              backward (rerun + sweep) 20 HSW T B
    GB/s      compulsory bytes / median: every input read once, every output written once
              (4 bytes each); LRUA adds the T + 1 memories the backward writes and reads
    roofline  GB/s as a % of the peak bandwidth from the device attributes (2 x memory
              clock x bus width) and of the measured device-to-device copy bandwidth
    ratio     median / plain median (below 1: the kernel is faster)
Every benchmark checks its result against a float64 NumPy reference on a slice first.
"""
import numpy as np
import pytest
from _timing import median_seconds

import metacore  # noqa: F401
from metacore.kernels import distance as KD
from metacore.kernels import lrua as KL
from metacore.reference import distance as RD
from metacore.reference import lrua as RL


def _usable():
    """(cupy module, {backend: distance module}, {backend: lrua module}) or a skip."""
    try:
        import cupy as cp
    except ImportError as err:
        pytest.skip(f"cupy is not installed ({err}); pip install -e '.[cuda]'",
                    allow_module_level=True)
    dmods, lmods, why = {}, {}, []
    for name in ("numba-cuda", "cupy"):
        try:
            dmods[name] = KD._backend("bench_cuda", name)
            lmods[name] = KL._backend("bench_cuda", name)
        except ImportError as err:
            why.append(str(err))
    if "cupy" not in dmods:
        pytest.skip("no usable CUDA GPU for CuPy here: " + "; ".join(why),
                    allow_module_level=True)
    return cp, dmods, lmods


cp, DMODS, LMODS = _usable()
SIZES = {"episodic": (32, 75, 5, 64), "protonet": (1, 300, 60, 64),
         "large": (1, 4096, 4096, 256)}
FLOPS = {"sqeuclidean": 3, "l1": 3, "cosine": 2, "sqeuclidean_backward": 6,
         "l1_backward": 6, "cosine_backward": 6, "protonet": 9}
LRUA = (50, 16, 4, 128, 40)                       # T, B, H, S, W (Santoro et al. Omniglot)
EPS = 1e-8


def sync():
    cp.cuda.runtime.deviceSynchronize()


def timed(fn):
    def call():
        out = fn()
        sync()
        return out
    return call


def peak_gbs():
    """(peak GB/s from the attributes or None, measured copy GB/s)."""
    attrs = cp.cuda.Device().attributes
    clock, width = attrs.get("MemoryClockRate"), attrs.get("GlobalMemoryBusWidth")
    peak = 2 * clock * 1e3 * width / 8 / 1e9 if clock and width else None
    src = cp.ones(1 << 28, cp.float32)            # 1 GiB
    dst = cp.empty_like(src)
    t = median_seconds(timed(lambda: dst.__setitem__(Ellipsis, src)), 5, warmup=True)
    return peak, 2 * src.nbytes / t / 1e9


PEAK, COPY = peak_gbs()


# ---------------------------------------------------------------- plain CuPy formulations
def _norms(x):
    return cp.maximum(cp.sqrt((x * x).sum(-1)), EPS)


def plain_forward(metric, q, s):
    if metric == "sqeuclidean":
        return ((q * q).sum(-1)[:, :, None] + (s * s).sum(-1)[:, None, :]
                - 2 * cp.matmul(q, s.transpose(0, 2, 1)))
    if metric == "cosine":
        return cp.matmul(q, s.transpose(0, 2, 1)) / (_norms(q)[:, :, None] *
                                                      _norms(s)[:, None, :])
    out = cp.empty((q.shape[0], q.shape[1], s.shape[1]), q.dtype)
    for i in range(0, q.shape[1], 64):            # (T, 64, N, D) at a time
        out[:, i:i + 64] = cp.abs(q[:, i:i + 64, None, :] - s[:, None, :, :]).sum(-1)
    return out


def plain_backward(metric, g, q, s):
    if metric == "sqeuclidean":
        return (2 * (g.sum(2)[..., None] * q - cp.matmul(g, s)),
                2 * (g.sum(1)[..., None] * s - cp.matmul(g.transpose(0, 2, 1), q)))
    if metric == "cosine":
        qn, sn = _norms(q), _norms(s)
        inv = 1 / (qn[:, :, None] * sn[:, None, :])
        c = cp.matmul(q, s.transpose(0, 2, 1)) * inv
        gi, gc = g * inv, g * c
        qon = (cp.sqrt((q * q).sum(-1)) > EPS).astype(q.dtype)
        son = (cp.sqrt((s * s).sum(-1)) > EPS).astype(q.dtype)
        return (cp.matmul(gi, s) - (gc.sum(2) * qon / qn ** 2)[..., None] * q,
                cp.matmul(gi.transpose(0, 2, 1), q) - (gc.sum(1) * son / sn ** 2)[..., None] * s)
    dq, ds = cp.empty_like(q), cp.zeros_like(s)
    for i in range(0, q.shape[1], 64):
        sg = g[:, i:i + 64, :, None] * cp.sign(q[:, i:i + 64, None, :] - s[:, None, :, :])
        dq[:, i:i + 64] = sg.sum(2)
        ds -= sg.sum(1)
    return dq, ds


def plain_protonet(metric, q, s, y):
    T, Q, _ = q.shape
    ss = 1.0 if metric == "cosine" else -1.0
    logits = ss * plain_forward(metric, q, s)
    m = logits.max(-1, keepdims=True)
    e = cp.exp(logits - m)
    z = e.sum(-1, keepdims=True)
    picked = cp.take_along_axis(logits, y[..., None], -1)
    loss = (cp.log(z) + m - picked)[..., 0].mean(1)
    p = e / z
    p[cp.arange(T)[:, None], cp.arange(Q)[None, :], y] -= 1     # softmax - onehot(y)
    dq, ds = plain_backward(metric, ss * p / Q, q, s)
    return loss, dq, ds, logits.argmax(-1)


def plain_lrua_forward(keys, g, memory0, read0, usage0, gamma):
    """Batched over B, a Python loop over T: the same step as metacore.reference.lrua."""
    T, B, H, W = keys.shape
    M, wr, wu = memory0.copy(), read0, usage0
    reads = []
    rows = cp.arange(B)
    for t in range(T):
        m = cp.sort(wu, axis=1)[:, H - 1:H]                       # (B, 1)
        wlu = (wu <= m).astype(keys.dtype)                        # (B, S)
        gt = g[t][..., None]                                      # (B, H, 1)
        ww = gt * wr + (1 - gt) * wlu[:, None, :]                 # (B, H, S)
        M[rows, cp.argmin(wu, axis=1)] = 0
        k = keys[t]                                               # (B, H, W)
        M = M + cp.matmul(ww.transpose(0, 2, 1), k)
        c = cp.matmul(k, M.transpose(0, 2, 1)) / (_norms(k)[:, :, None] *
                                                   _norms(M)[:, None, :])
        e = cp.exp(c - c.max(-1, keepdims=True))
        wr = e / e.sum(-1, keepdims=True)
        reads.append(cp.matmul(wr, M))
        wu = gamma * wu + wr.sum(1) + ww.sum(1)
    return cp.stack(reads), M


# ---------------------------------------------------------------- checks
def _check(name, got, want, tol):
    got = np.asarray(cp.asnumpy(cp.asarray(got)) if not isinstance(got, np.ndarray) else got,
                     np.float64)
    err = float(np.abs(got - want).max()) if want.size else 0.0
    bound = tol * max(float(np.abs(want).max()), 1e-30)
    assert err <= bound, f"{name}: max error {err:.3g} above {bound:.3g}; not timing it"


def make(size, seed=0):
    T, Q, N, D = SIZES[size]
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((T, Q, D)).astype(np.float32)
    s = rng.standard_normal((T, N, D)).astype(np.float32)
    g = rng.standard_normal((T, Q, N)).astype(np.float32)
    y = rng.integers(0, N, (T, Q))
    return q, s, g, y


def _record(benchmark, flops, nbytes, med, base_med):
    benchmark.extra_info["gflops"] = round(flops / med / 1e9, 2)
    gbs = nbytes / med / 1e9
    benchmark.extra_info["gbs"] = round(gbs, 1)
    if PEAK:
        benchmark.extra_info["pct_peak_bw"] = round(100 * gbs / PEAK, 1)
    benchmark.extra_info["pct_copy_bw"] = round(100 * gbs / COPY, 1)
    if base_med is not None:
        benchmark.extra_info["time_over_plain"] = round(med / base_med, 3)


OPS = ["sqeuclidean", "l1", "cosine", "sqeuclidean_backward", "l1_backward",
       "cosine_backward", "protonet"]


@pytest.mark.parametrize("backend", ["plain", "numba-cuda", "cupy"])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("op", OPS)
def test_bench_distance(benchmark, op, size, backend):
    if backend != "plain" and backend not in DMODS:
        pytest.skip(f"backend {backend!r} is not usable here")
    q, s, g, y = make(size)
    dq_, ds_, dg_, dy_ = (cp.asarray(x) for x in (q, s, g, y))
    metric = op.split("_")[0]
    T, Q, N, D = SIZES[size]

    def fn_of(name):
        if op == "protonet":
            if name == "plain":
                return lambda: plain_protonet(metric, dq_, ds_, dy_)
            return lambda: DMODS[name].protonet_loss(dq_, ds_, dy_, metric=metric)
        if op.endswith("_backward"):
            if name == "plain":
                return lambda: plain_backward(metric, dg_, dq_, ds_)
            return lambda: getattr(DMODS[name], f"pairwise_{op}")(dg_, dq_, ds_)
        if name == "plain":
            return lambda: plain_forward(metric, dq_, ds_)
        return lambda: getattr(DMODS[name], f"pairwise_{op}")(dq_, ds_)

    fn = timed(fn_of(backend))
    out = fn()                                    # the warm-up call compiles; then check
    rows = min(Q, 8)
    q64, s64, g64 = (x[:1, :rows].astype(np.float64) if x is not s else
                     x[:1].astype(np.float64) for x in (q, s, g))
    if op == "protonet":
        want = RD.protonet_loss(q64, s64, y[:1, :rows], metric=metric)
        if rows == Q:
            _check(op, cp.asarray(out[0])[:1], want[0], 1e-4)
        else:                                     # per-query losses are not returned:
            _check(op, cp.asarray(out[1])[:1, :rows], want[1] * rows / Q, 1e-3)
    elif op.endswith("_backward"):
        want = getattr(RD, f"pairwise_{op}")(g64, q64, s64)[0]    # dq of the sliced rows
        _check(op, cp.asarray(out[0])[:1, :rows], want, 1e-4)
    else:
        want = getattr(RD, f"pairwise_{op}")(q64, s64)
        _check(op, cp.asarray(out)[:1, :rows], want, 1e-4)
    large = size == "large"
    benchmark.pedantic(fn, rounds=5 if large else 50, warmup_rounds=1)
    med = benchmark.stats.stats.median
    base = None if backend == "plain" else median_seconds(timed(fn_of("plain")),
                                                          5 if large else 50, warmup=True)
    nbytes = 4 * (T * Q * D + T * N * D + T * Q * N)      # inputs read, outputs written
    if op.endswith("_backward"):
        nbytes += 4 * (T * Q * D + T * N * D)             # g, q, s in; dq, ds out
    if op == "protonet":
        nbytes = 4 * 2 * (T * Q * D + T * N * D) + 8 * T * Q
    _record(benchmark, FLOPS[op] * T * Q * N * D, nbytes, med, base)


def _lrua_inputs():
    T, B, H, S, W = LRUA
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((T, B, H, W)).astype(np.float32)
    alpha = rng.standard_normal(H).astype(np.float32)
    memory0 = np.full((B, S, W), 1e-6, np.float32)
    read0 = np.zeros((B, H, S), np.float32)
    read0[:, :, 0] = 1
    usage0 = np.zeros((B, S), np.float32)
    dreads = rng.standard_normal((T, B, H, W)).astype(np.float32)
    return keys, alpha, memory0, read0, usage0, dreads


@pytest.mark.parametrize("backend", ["plain", "numba-cuda", "cupy"])
@pytest.mark.parametrize("op", ["forward", "backward"])
def test_bench_lrua(benchmark, op, backend):
    if backend == "plain" and op == "backward":
        pytest.skip("no plain CuPy LRUA backward to compare with")
    if backend != "plain" and backend not in LMODS:
        pytest.skip(f"backend {backend!r} is not usable here")
    T, B, H, S, W = LRUA
    host = _lrua_inputs()
    keys, alpha, memory0, read0, usage0, dreads = (cp.asarray(x) for x in host)
    gam = 0.95
    g = cp.broadcast_to(0.5 * (1 + cp.tanh(0.5 * alpha)), (T, B, H))

    def fn_of(name):
        if name == "plain":
            return lambda: plain_lrua_forward(keys, g, memory0, read0, usage0, gam)
        mod = LMODS[name]
        if op == "forward":
            return lambda: mod.lrua_forward(keys, alpha, memory0, read0, usage0, gam)
        return lambda: mod.lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gam)

    fn = timed(fn_of(backend))
    out = fn()
    ref64 = [x[:, :2].astype(np.float64) if x.ndim == 4 else x for x in host]
    b2 = [x[:2].astype(np.float64) for x in host[2:5]]
    if op == "forward":
        want = RL.lrua_forward(ref64[0], host[1].astype(np.float64), *b2, gam)[0]
        _check("lrua reads", cp.asarray(out[0])[:, :2], want, 1e-4)
    else:
        want = RL.lrua_backward(ref64[5], ref64[0], host[1].astype(np.float64), *b2, gam)[0]
        _check("lrua dkeys", cp.asarray(out[0])[:, :2], want, 1e-3)
    benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    med = benchmark.stats.stats.median
    base = None
    if backend != "plain" and op == "forward":
        base = median_seconds(timed(fn_of("plain")), 10, warmup=True)
    inputs = T * B * H * W + B * S * W + B * H * S + B * S
    if op == "forward":
        flops = 6 * H * S * W * T * B
        nbytes = 4 * (inputs + T * B * H * W + 2 * T * B * H * S + 2 * T * B * S + B * S * W)
    else:
        flops = 20 * H * S * W * T * B            # rerun forward 6 + sweep 14 (bench_lrua.py)
        nbytes = 4 * (inputs + T * B * H * W + 2 * (T + 1) * B * S * W + T * B * H * W
                      + B * S * W + B * H * S)
    _record(benchmark, flops, nbytes, med, base)
