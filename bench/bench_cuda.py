"""CUDA kernels ('numba-cuda', 'cupy') against the plain CuPy formulation, on a GPU.

Run: python -m pytest bench/bench_cuda.py --benchmark-only -q -s
Without a usable CUDA GPU (or without the cuda extra) the whole file skips with the reason.

Shape letters: T tasks, Q queries, N supports, D features; LRUA: T steps, B episodes,
H heads, S slots, W width. float32 throughout; every input already on the device (CuPy
arrays; the Numba CUDA backend takes them zero-copy through __cuda_array_interface__), so
no host transfer is timed. Each timed call ends with a device synchronisation.

Baselines, both measured in the same run (once per op and size, shared by the rows):
  'plain'      the same math as plain CuPy expressions: the distance GEMM expansions
               through cuBLAS, |q|^2 + |s|^2 - 2 q s^T (sqeuclidean forward, backward
               2 (g 1 q - g s)) and q s^T / norms (cosine); broadcast-and-reduce for L1 (in
               query chunks so the (Q, N, D) tensor fits); the ProtoNet loss as that GEMM
               forward, CuPy softmax, and the GEMM backward; one LRUA step as batched CuPy
               ops (sort for the least-used threshold, einsum for the write, the cosines
               and the read r = einsum('bhs,bsw->bhw', w_r, M)), the episode as a Python
               loop over those steps. There is no plain CuPy LRUA backward.
  'numba-cpu'  the Numba CPU backend ('numba') on NumPy copies of the same inputs, with
               all the host's cores (NUMBA_NUM_THREADS), the reference every device kernel
               was written against; its thread count is in extra_info.
The LRUA rows cover the whole-episode pair and the step pair that MANN calls (one step of
B = 16 episodes).

Figures in benchmark.extra_info (formulas):
    GFLOP/s   nominal FLOPs / median, FLOPs as bench/bench_distance.py and bench_lrua.py:
              sqeuclidean 3 TQND, l1 3 TQND, cosine 2 TQND, sqeuclidean backward 6 TQND,
              l1 / cosine backward 6 TQND, protonet 9 TQND; LRUA forward 6 HSW T B,
              backward (rerun + sweep) 20 HSW T B
    GB/s      compulsory bytes / median: every input read once, every output written once
              (4 bytes each); LRUA adds the T + 1 memories the backward writes and reads
    roofline  GB/s as a % of the peak bandwidth from the device attributes (2 x memory
              clock x bus width) and of the measured device-to-device copy bandwidth
    ratios    time_over_plain = median / plain median, time_over_numba_cpu = median /
              Numba CPU median (below 1: the device kernel is faster)
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


def _numba_cpu():
    """(distance module, lrua module, threads) of the Numba CPU backend, or Nones."""
    try:
        import numba
        return (KD._backend("bench_cuda", "numba"), KL._backend("bench_cuda", "numba"),
                numba.config.NUMBA_NUM_THREADS)
    except ImportError:
        return None, None, None


CPU_D, CPU_L, CPU_THREADS = _numba_cpu()
_BASE = {}                  # (op, size, baseline) -> median seconds, measured once per run


def baseline(key, fn, repeats):
    """The median of a baseline (plain CuPy, Numba CPU) measured once per run and shared by
    every row that compares with it."""
    if key not in _BASE:
        _BASE[key] = median_seconds(fn, repeats, warmup=True)
    return _BASE[key]
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


def plain_lrua_step(k, gt, M, wr, wu, gamma):
    """One step of B episodes in plain CuPy, the same math as metacore.reference.lrua._step:
    k (B, H, W), gt (B, H) gates, M (B, S, W), wr (B, H, S), wu (B, S) -> read (B, H, W),
    M_t, w_r_t, w_w_t, w_u_t (M is not changed)."""
    B, H, _ = k.shape
    m = cp.sort(wu, axis=1)[:, H - 1:H]                           # (B, 1)
    wlu = (wu <= m).astype(k.dtype)                               # (B, S)
    g3 = gt[..., None]                                            # (B, H, 1)
    ww = g3 * wr + (1 - g3) * wlu[:, None, :]                     # (B, H, S)
    M = M.copy()
    M[cp.arange(B), cp.argmin(wu, axis=1)] = 0
    M += cp.einsum("bhs,bhw->bsw", ww, k)                         # the write
    c = cp.einsum("bhw,bsw->bhs", k, M) / (_norms(k)[:, :, None] * _norms(M)[:, None, :])
    e = cp.exp(c - c.max(-1, keepdims=True))
    wr = e / e.sum(-1, keepdims=True)                             # (B, H, S)
    read = cp.einsum("bhs,bsw->bhw", wr, M)                       # the read
    wu = gamma * wu + wr.sum(1) + ww.sum(1)
    return read, M, wr, ww, wu


def plain_lrua_forward(keys, g, memory0, read0, usage0, gamma):
    """Batched over B, a Python loop over T of plain_lrua_step -> reads (T, B, H, W), M_T."""
    T = keys.shape[0]
    M, wr, wu = memory0, read0, usage0
    reads = []
    for t in range(T):
        r, M, wr, _, wu = plain_lrua_step(keys[t], g[t], M, wr, wu, gamma)
        reads.append(r)
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


def _record(benchmark, flops, nbytes, med, base_med, cpu_med=None):
    benchmark.extra_info["gflops"] = round(flops / med / 1e9, 2)
    gbs = nbytes / med / 1e9
    benchmark.extra_info["gbs"] = round(gbs, 1)
    if PEAK:
        benchmark.extra_info["pct_peak_bw"] = round(100 * gbs / PEAK, 1)
    benchmark.extra_info["pct_copy_bw"] = round(100 * gbs / COPY, 1)
    benchmark.extra_info["median_us"] = round(med * 1e6, 1)
    if base_med is not None:
        benchmark.extra_info["time_over_plain"] = round(med / base_med, 3)
    if cpu_med is not None:
        benchmark.extra_info["time_over_numba_cpu"] = round(med / cpu_med, 3)
        benchmark.extra_info["numba_cpu_us"] = round(cpu_med * 1e6, 1)
        benchmark.extra_info["numba_cpu_threads"] = CPU_THREADS


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
    # the ProtoNet loss with its paper's metric (op "protonet" names no metric of its own)
    metric = "sqeuclidean" if op == "protonet" else op.split("_")[0]
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
    base = cpu = None
    if backend != "plain":
        base = baseline((op, size, "plain"), timed(fn_of("plain")), 5 if large else 50)
        if CPU_D is not None:
            cpu = baseline((op, size, "numba-cpu"), cpu_fn(op, metric, q, s, g, y),
                           3 if large else 20)
    nbytes = 4 * (T * Q * D + T * N * D + T * Q * N)      # inputs read, outputs written
    if op.endswith("_backward"):
        nbytes += 4 * (T * Q * D + T * N * D)             # g, q, s in; dq, ds out
    if op == "protonet":
        nbytes = 4 * 2 * (T * Q * D + T * N * D) + 8 * T * Q
    _record(benchmark, FLOPS[op] * T * Q * N * D, nbytes, med, base, cpu)


def cpu_fn(op, metric, q, s, g, y):
    """The Numba CPU backend's call of the same op on the NumPy inputs."""
    if op == "protonet":
        return lambda: CPU_D.protonet_loss(q, s, y, metric=metric)
    if op.endswith("_backward"):
        return lambda: getattr(CPU_D, f"pairwise_{op}")(g, q, s)
    return lambda: getattr(CPU_D, f"pairwise_{op}")(q, s)


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
@pytest.mark.parametrize("op", ["forward", "backward", "step_forward", "step_backward"])
def test_bench_lrua(benchmark, op, backend):
    """The whole-episode pair and the step pair (one step t = 0 of the same batch, with
    incoming dL/dM, dL/dw_r) against plain CuPy (forwards) and the Numba CPU backend."""
    if backend == "plain" and op.endswith("backward"):
        pytest.skip("no plain CuPy LRUA backward to compare with")
    if backend != "plain" and backend not in LMODS:
        pytest.skip(f"backend {backend!r} is not usable here")
    T, B, H, S, W = LRUA
    host = _lrua_inputs()
    keys, alpha, memory0, read0, usage0, dreads = (cp.asarray(x) for x in host)
    gam = 0.95
    g = cp.broadcast_to(0.5 * (1 + cp.tanh(0.5 * alpha)), (T, B, H))
    rng = np.random.default_rng(1)
    hdm = rng.standard_normal((B, S, W)).astype(np.float32)       # dL/dM_t from step t + 1
    hdw = rng.standard_normal((B, H, S)).astype(np.float32)       # dL/dw_r_t
    dm, dw = cp.asarray(hdm), cp.asarray(hdw)
    step = op.startswith("step")

    def fn_of(name):
        if name == "plain":
            if step:
                return lambda: plain_lrua_step(keys[0], g[0], memory0, read0, usage0, gam)
            return lambda: plain_lrua_forward(keys, g, memory0, read0, usage0, gam)
        mod = LMODS[name] if name != "numba-cpu" else CPU_L
        a = (keys, alpha, memory0, read0, usage0, dreads, dm, dw)
        if name == "numba-cpu":
            a = host + (hdm, hdw)
        k, al, m0, r0, u0, dr, dmm, dww = a
        if op == "forward":
            return lambda: mod.lrua_forward(k, al, m0, r0, u0, gam)
        if op == "backward":
            return lambda: mod.lrua_backward(dr, k, al, m0, r0, u0, gam)
        if op == "step_forward":
            return lambda: mod.lrua_step_forward(k[0], al, m0, r0, u0, gam)
        return lambda: mod.lrua_step_backward(dr[0], dmm, dww, k[0], al, m0, r0, u0, gam)

    fn = timed(fn_of(backend))
    out = fn()
    a64 = [x.astype(np.float64) for x in host]
    if op == "forward":
        ref64 = [x[:, :2] if x.ndim == 4 else x for x in a64]
        b2 = [x[:2] for x in a64[2:5]]
        want = RL.lrua_forward(ref64[0], a64[1], *b2, gam)[0]
        _check("lrua reads", cp.asarray(out[0])[:, :2], want, 1e-4)
    elif op == "backward":
        ref64 = [x[:, :2] if x.ndim == 4 else x for x in a64]
        b2 = [x[:2] for x in a64[2:5]]
        want = RL.lrua_backward(ref64[5], ref64[0], a64[1], *b2, gam)[0]
        _check("lrua dkeys", cp.asarray(out[0])[:, :2], want, 1e-3)
    elif op == "step_forward":
        want = RL.lrua_step_forward(a64[0][0], a64[1], *a64[2:5], gam)[0]
        _check("lrua step read", cp.asarray(out[0]), want, 1e-4)
    else:
        want = RL.lrua_step_backward(a64[5][0], hdm.astype(np.float64),
                                     hdw.astype(np.float64), a64[0][0], a64[1], *a64[2:5],
                                     gam)[2]
        _check("lrua step dmemory_prev", cp.asarray(out[2]), want, 1e-4)
    benchmark.pedantic(fn, rounds=50 if step else 10, warmup_rounds=1)
    med = benchmark.stats.stats.median
    base = cpu = None
    if backend != "plain":
        if not op.endswith("backward"):
            base = baseline(("lrua_" + op, "paper", "plain"), timed(fn_of("plain")),
                            50 if step else 10)
        if CPU_L is not None:
            cpu = baseline(("lrua_" + op, "paper", "numba-cpu"), fn_of("numba-cpu"),
                           50 if step else 10)
    inputs = T * B * H * W + B * S * W + B * H * S + B * S
    if op == "forward":
        flops = 6 * H * S * W * T * B
        nbytes = 4 * (inputs + T * B * H * W + 2 * T * B * H * S + 2 * T * B * S + B * S * W)
    elif op == "backward":
        flops = 20 * H * S * W * T * B            # rerun forward 6 + sweep 14 (bench_lrua.py)
        nbytes = 4 * (inputs + T * B * H * W + 2 * (T + 1) * B * S * W + T * B * H * W
                      + B * S * W + B * H * S)
    elif op == "step_forward":                    # key, M_{t-1}, w_r, w_u in; 5 outputs
        flops = 6 * H * S * W * B
        nbytes = 4 * (2 * B * H * W + 2 * B * S * W + 3 * B * H * S + 2 * B * S)
    else:                                         # + dread, dM, dw_r in; 4 gradients out
        flops = 20 * H * S * W * B
        nbytes = 4 * (3 * B * H * W + 4 * B * S * W + 4 * B * H * S + B * S + H)
    _record(benchmark, flops, nbytes, med, base, cpu)
