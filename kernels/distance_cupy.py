"""Episodic distances and the ProtoNet loss: CuPy raw-kernel backend ('cupy').

Shape letters (this module):
    T tasks, Q queries per task, N supports (or prototypes) per task, D features.

The kernels are CUDA C in `distance.cu` beside this file (compiled once per process by
NVRTC through cupy.RawModule); they are the same kernels, with the same tiles and the same
order of every sum, as the Numba CUDA backend `distance_cuda.py` (read its docstring).
This wrapper is thin: it checks dtype, shape and contiguity, casts every scalar to the
width the kernel declares (a raw kernel checks nothing), allocates, and launches.

Arrays in, arrays out of the same kind: CuPy arrays (or any __cuda_array_interface__ array,
taken zero-copy by cupy.asarray) stay on the device and the results are CuPy arrays;
NumPy arrays are copied to the device and the results back (the caller asked for this
backend by name). Non-contiguous device inputs are made contiguous on the device.
"""
import os

import cupy as cp
import numpy as np

EPS = 1e-8
TILE = 16                                 # must match the TILE the source is compiled with
ROWS = 128                                # threads per block, one-thread-per-row kernels
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distance.cu")
OPTIONS = ("--std=c++11", f"-DTILE={TILE}")
ENTRY_POINTS = ("pair_fwd", "pair_grad", "row_norms", "cos_div", "cos_prep", "cos_fix",
                "softmax_ce", "row_mean")   # each exists as <name>_f32 and <name>_f64
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_module = None


def unavailable():
    """None when a CUDA device is usable through CuPy, else what is missing."""
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as err:          # no driver, or one too old for this CuPy's runtime
        return f"CuPy cannot reach a CUDA device ({type(err).__name__}: {err})"
    return None if n > 0 else "CuPy sees no CUDA device"


def _fn(name, dtype):
    global _module
    if _module is None:
        with open(SOURCE, encoding="utf-8") as f:
            _module = cp.RawModule(code=f.read(), options=OPTIONS)
    return _module.get_function(f"{name}_{_SUFFIX[np.dtype(dtype)]}")


def _dev(op, name, x, dtype):
    """x as a C-contiguous CuPy array of `dtype` (device arrays must already have it)."""
    if not isinstance(x, np.ndarray):
        x = cp.asarray(x)                 # zero copy for device arrays
        if x.dtype != np.dtype(dtype):
            raise TypeError(f"{op}: {name} has dtype {x.dtype}, expected {np.dtype(dtype)}")
        return cp.ascontiguousarray(x)
    return cp.asarray(np.ascontiguousarray(x, dtype=dtype))


def _i32(n, what):
    if n > np.iinfo(np.int32).max:
        raise ValueError(f"distance_cupy: {what} = {n} exceeds the int32 the kernels take")
    return np.int32(n)


def _grid1(n):
    return (max(1, (n + ROWS - 1) // ROWS),)


def _tiles(cols, rows, T):
    if T > 65535:
        raise ValueError(f"distance_cupy: T = {T} tasks exceeds the grid's z limit 65535")
    return ((cols + TILE - 1) // TILE, (rows + TILE - 1) // TILE, T)


# ---------------------------------------------------------------- device pipelines
def _fwd_dev(q, s, mode):
    """q: (T, Q, D), s: (T, N, D) -> out: (T, Q, N), term `mode` summed over k."""
    T, Q, D = q.shape
    N = s.shape[1]
    out = cp.empty((T, Q, N), dtype=q.dtype)
    if out.size:
        _fn("pair_fwd", q.dtype)(_tiles(N, Q, T), (TILE, TILE),
                                 (q, s, _i32(Q, "Q"), _i32(N, "N"), _i32(D, "D"),
                                  np.int32(mode), out))
    return out


def _grad_dev(g, gtrans, a, b, mode):
    """-> out: (T, A, D), out[t,i,k] = sum_j G[t,i,j] f(a_ik, b_jk) (see distance.cu)."""
    T, A, D = a.shape
    B = b.shape[1]
    out = cp.empty_like(a)
    if out.size:
        _fn("pair_grad", a.dtype)(_tiles(D, A, T), (TILE, TILE),
                                  (g, np.int32(gtrans), a, b, _i32(A, "A"), _i32(B, "B"),
                                   _i32(D, "D"), np.int32(mode), out))
    return out


def _norms_dev(x):
    T, M, D = x.shape
    n, on = cp.empty((T, M), x.dtype), cp.empty((T, M), x.dtype)
    if n.size:
        _fn("row_norms", x.dtype)(_grid1(T * M), (ROWS,),
                                  (x, np.int64(T * M), _i32(D, "D"), x.dtype.type(EPS), n, on))
    return n, on


def _cosine_dev(q, s):
    T, Q, _ = q.shape
    N = s.shape[1]
    qn, qon = _norms_dev(q)
    sn, son = _norms_dev(s)
    c = _fwd_dev(q, s, 2)
    if c.size:
        _fn("cos_div", q.dtype)(_grid1(c.size), (ROWS,),
                                (c, np.int32(T), np.int32(Q), np.int32(N), qn, sn))
    return c, qn, qon, sn, son


def _cos_bwd_dev(g, q, s):
    T, Q, D = q.shape
    N = s.shape[1]
    c, qn, qon, sn, son = _cosine_dev(q, s)
    gi, gc = cp.empty_like(c), cp.empty_like(c)
    if c.size:
        _fn("cos_prep", q.dtype)(_grid1(c.size), (ROWS,),
                                 (g, c, np.int32(T), np.int32(Q), np.int32(N), qn, sn, gi, gc))
    dq = _grad_dev(gi, 0, q, s, 2)
    ds = _grad_dev(gi, 1, s, q, 2)
    fix = _fn("cos_fix", q.dtype)
    if T * Q:
        fix(_grid1(T * Q), (ROWS,), (gc, np.int32(0), np.int32(T), np.int32(Q), np.int32(N),
                                     np.int32(D), qon, qn, q, dq))
    if T * N:
        fix(_grid1(T * N), (ROWS,), (gc, np.int32(1), np.int32(T), np.int32(N), np.int32(Q),
                                     np.int32(D), son, sn, s, ds))
    return dq, ds


_MODE = {"sqeuclidean": 0, "l1": 1, "cosine": 2}


def _forward_dev(q, s, metric):
    if metric == "cosine":
        return _cosine_dev(q, s)[0]
    return _fwd_dev(q, s, _MODE[metric])


def _backward_dev(g, q, s, metric):
    if metric == "cosine":
        return _cos_bwd_dev(g, q, s)
    mode = _MODE[metric]
    # f(s - q) = -f(q - s) for modes 0 and 1: ds is the same kernel with a, b swapped
    return _grad_dev(g, 0, q, s, mode), _grad_dev(g, 1, s, q, mode)


# ---------------------------------------------------------------- public functions
def _pair(op, q, s):
    host = isinstance(q, np.ndarray) and isinstance(s, np.ndarray)
    dt = np.dtype(q.dtype)
    if dt not in _SUFFIX:
        raise TypeError(f"{op}: q must be float32 or float64, got dtype {dt}")
    return host, _dev(op, "q", q, dt), _dev(op, "s", s, dt)


def _out(host, *arrays):
    res = tuple(cp.asnumpy(a) if host else a for a in arrays)
    return res[0] if len(res) == 1 else res


def _forward(op, metric, q, s):
    host, q, s = _pair(op, q, s)
    return _out(host, _forward_dev(q, s, metric))


def _backward(op, metric, g, q, s):
    host, q, s = _pair(op, q, s)
    host = host and isinstance(g, np.ndarray)
    return _out(host, *_backward_dev(_dev(op, "g", g, q.dtype), q, s, metric))


def pairwise_sqeuclidean(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N), direct difference formula."""
    return _forward("pairwise_sqeuclidean", "sqeuclidean", q, s)


def pairwise_sqeuclidean_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D); fresh arrays."""
    return _backward("pairwise_sqeuclidean_backward", "sqeuclidean", g, q, s)


def pairwise_l1(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N) = sum_k |q - s|."""
    return _forward("pairwise_l1", "l1", q, s)


def pairwise_l1_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D), sign(0) = 0; fresh arrays."""
    return _backward("pairwise_l1_backward", "l1", g, q, s)


def pairwise_cosine(q, s):
    """q: (T, Q, D), s: (T, N, D) -> c: (T, Q, N) = q.s / (max(|q|,EPS) max(|s|,EPS))."""
    return _forward("pairwise_cosine", "cosine", q, s)


def pairwise_cosine_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D); see the reference for the formula."""
    return _backward("pairwise_cosine_backward", "cosine", g, q, s)


def protonet_loss(q, s, y, gloss=None, metric="sqeuclidean", scale=1.0):
    """Same contract as metacore.reference.distance.protonet_loss:
    -> loss: (T,), dq: (T, Q, D), ds: (T, N, D), pred: (T, Q) int64. Everything between
    the distance and its backward (softmax, cross-entropy, logits gradient) is on the
    device; labels outside [0, N) on a device y give NaN (the host path checks them)."""
    op = "protonet_loss"
    host, q, s = _pair(op, q, s)
    host = host and isinstance(y, np.ndarray) and (gloss is None or
                                                   isinstance(gloss, np.ndarray))
    T, Q, _ = q.shape
    N = s.shape[1]
    dt = q.dtype
    yd = cp.asarray(y) if not isinstance(y, np.ndarray) else cp.asarray(np.asarray(y))
    yd = cp.ascontiguousarray(yd.astype(cp.int64, copy=False))      # on the device
    gl = cp.ones(T, dtype=dt) if gloss is None else _dev(op, "gloss", gloss, dt)
    ss = dt.type((1.0 if metric == "cosine" else -1.0) * scale)
    d = _forward_dev(q, s, metric)                                   # (T, Q, N)
    loss_rows = cp.empty((T, Q), dt)
    dlogits = cp.empty((T, Q, N), dt)
    pred = cp.empty((T, Q), cp.int64)
    loss = cp.empty((T,), dt)
    if T * Q:
        _fn("softmax_ce", dt)(_grid1(T * Q), (ROWS,),
                              (d, np.int32(T), np.int32(Q), np.int32(N), ss, yd, gl,
                               loss_rows, dlogits, pred))
    if T:
        _fn("row_mean", dt)(_grid1(T), (ROWS,), (loss_rows, np.int32(T), np.int32(Q), loss))
    dq, ds = _backward_dev(dlogits, q, s, metric)
    return _out(host, loss, dq, ds, pred)
