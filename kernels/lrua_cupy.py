"""LRUA memory of MANN (Santoro et al. 2016): CuPy raw-kernel backend ('cupy').

Shape letters (this module):
    T time steps, B episodes, H heads (n = H reads), S memory slots, W slot width.

The kernels are CUDA C in `lrua.cu` beside this file: the same kernels (one thread block
per episode; the whole-episode pair with the time loop inside, the step pair for one step)
as the Numba CUDA backend `lrua_cuda.py`, whose docstring says how they work. This wrapper
checks dtypes, shapes and contiguity, casts every scalar, allocates outputs and scratch,
and launches.

Arrays in, arrays out of the same kind: CuPy arrays (or any __cuda_array_interface__
array) stay on the device and the results are CuPy arrays; NumPy arrays are copied to the
device and the results back. Non-contiguous device inputs are made contiguous on the device.
"""
import os

import cupy as cp
import numpy as np

EPS = 1e-8
THREADS = 128                             # threads per block (one block per episode)
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lrua.cu")
OPTIONS = ("--std=c++11",)
ENTRY_POINTS = ("lrua_gates", "lrua_forward", "lrua_backward", "lrua_sum_tb",
                "lrua_step_forward", "lrua_step_backward")
_SUFFIX = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_module = None


def unavailable():
    """None when a CUDA device is usable through CuPy, else what is missing."""
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as err:
        return f"CuPy cannot reach a CUDA device ({type(err).__name__}: {err})"
    return None if n > 0 else "CuPy sees no CUDA device"


def _fn(name, dtype):
    global _module
    if _module is None:
        with open(SOURCE, encoding="utf-8") as f:
            _module = cp.RawModule(code=f.read(), options=OPTIONS)
    return _module.get_function(f"{name}_{_SUFFIX[np.dtype(dtype)]}")


def _dev(op, name, x, dtype):
    if not isinstance(x, np.ndarray):
        x = cp.asarray(x)
        if x.dtype != np.dtype(dtype):
            raise TypeError(f"{op}: {name} has dtype {x.dtype}, expected {np.dtype(dtype)}")
        return cp.ascontiguousarray(x)
    return cp.asarray(np.ascontiguousarray(x, dtype=dtype))


def to_device(x):
    """A NumPy array -> a fresh CuPy array (C-contiguous)."""
    return cp.array(np.ascontiguousarray(x))


def to_host(x):
    """A CuPy array -> a fresh NumPy array."""
    return cp.asnumpy(x)


def _per_head(op, write_rule):
    if write_rule not in ("shared", "per_head"):
        raise ValueError(f"{op}: write_rule must be 'shared' or 'per_head', got "
                         f"{write_rule!r}")
    return np.int32(write_rule == "per_head")


def _run_forward(op, keys, alpha, memory0, read0, usage0, gamma, keep, write_rule):
    host = all(isinstance(a, np.ndarray) for a in (keys, alpha, memory0, read0, usage0))
    dt = np.dtype(keys.dtype)
    if dt not in _SUFFIX:
        raise TypeError(f"{op}: keys must be float32 or float64, got dtype {dt}")
    keys, alpha, memory0, read0, usage0 = (
        _dev(op, n, a, dt) for n, a in (("keys", keys), ("alpha", alpha),
                                        ("memory0", memory0), ("read0", read0),
                                        ("usage0", usage0)))
    T, B, H, W = keys.shape
    S = memory0.shape[1]
    i32 = np.int32
    g = cp.empty((T, B, H), dt)
    n = T * B * H
    _fn("lrua_gates", dt)(((n + THREADS - 1) // THREADS,), (THREADS,),
                          (alpha, i32(alpha.ndim == 3), i32(T), i32(B), i32(H), g))
    K = T + 1 if keep else 2
    reads, w_r, w_w = cp.empty((T, B, H, W), dt), cp.empty((T, B, H, S), dt), \
        cp.empty((T, B, H, S), dt)
    w_u, w_lu = cp.empty((T, B, S), dt), cp.empty((T, B, S), dt)
    Ms = cp.empty((B, K, S, W), dt)
    wlu_prev, zs, memory = cp.empty((B, T, H, S), dt), cp.empty((B, T), cp.int64), \
        cp.empty((B, S, W), dt)
    _fn("lrua_forward", dt)((B,), (THREADS,),
                            (keys, g, memory0, read0, usage0, dt.type(gamma), dt.type(EPS),
                             _per_head(op, write_rule), i32(T), i32(B), i32(H), i32(S),
                             i32(W), i32(K), reads, w_r, w_w,
                             w_u, w_lu, Ms, wlu_prev, zs, memory, cp.empty((B, H), dt),
                             cp.empty((B, S), dt), cp.empty((B, H, S), dt)))
    return host, keys, alpha, read0, g, reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs, memory


def lrua_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_forward (no add vector):
    -> reads (T, B, H, W), w_r, w_w (T, B, H, S), w_u, w_lu (T, B, S), memory (B, S, W)."""
    out = _run_forward("lrua_forward", keys, alpha, memory0, read0, usage0, gamma, False,
                       write_rule)
    host, _, _, _, _, reads, w_r, w_w, w_u, w_lu, _, _, _, memory = out
    res = (reads, w_r, w_w, w_u, w_lu, memory)
    return tuple(cp.asnumpy(a) for a in res) if host else res


def lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gamma, write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_backward (no add vector):
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S)."""
    op = "lrua_backward"
    out = _run_forward(op, keys, alpha, memory0, read0, usage0, gamma, True, write_rule)
    host, keys, alpha, read0, g, _, w_r, w_w, _, _, Ms, wlu_prev, zs, _ = out
    host = host and isinstance(dreads, np.ndarray)
    dt = keys.dtype
    dreads = _dev(op, "dreads", dreads, dt)
    T, B, H, W = keys.shape
    S = Ms.shape[2]
    i32 = np.int32
    e = cp.empty
    dkeys, dalpha = e((T, B, H, W), dt), e((T, B, H), dt)
    dmemory0, dread0 = e((B, S, W), dt), e((B, H, S), dt)
    _fn("lrua_backward", dt)((B,), (THREADS,),
                             (dreads, keys, g, read0, w_r, w_w, Ms, wlu_prev, zs,
                              dt.type(EPS), i32(T), i32(B), i32(H), i32(S), i32(W),
                              dkeys, dalpha, dmemory0, dread0,
                              e((B, S, W), dt), e((B, H, S), dt), e((B, H, S), dt),
                              e((B, H, S), dt), e((B, H), dt), e((B, H), dt), e((B, H), dt),
                              e((B, S), dt), e((B, S), dt), e((B, S), dt)))
    if alpha.ndim == 1:
        da = e((H,), dt)
        _fn("lrua_sum_tb", dt)(((H + THREADS - 1) // THREADS,), (THREADS,),
                               (dalpha, i32(T), i32(B), i32(H), da))
        dalpha = da
    res = (dkeys, dalpha, dmemory0, dread0)
    return tuple(cp.asnumpy(a) for a in res) if host else res


# ---------------------------------------------------------------- one step, a batch
def _step_dev(op, name, x, dtype, shape):
    """_dev, and the shape the kernels index by (CuPy checks nothing at launch)."""
    x = _dev(op, name, x, dtype)
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    return x


def _step_inputs(op, key, alpha, memory_prev, w_r_prev, w_u_prev):
    """-> host flag, dtype, contiguous device arrays and the gates g (B, H) of one step."""
    host = all(isinstance(a, np.ndarray)
               for a in (key, alpha, memory_prev, w_r_prev, w_u_prev))
    dt = np.dtype(key.dtype)
    if dt not in _SUFFIX:
        raise TypeError(f"{op}: key must be float32 or float64, got dtype {dt}")
    if len(key.shape) != 3 or len(memory_prev.shape) != 3:
        raise ValueError(f"{op}: key (B, H, W) and memory_prev (B, S, W) must have 3 "
                         f"dimensions, got {tuple(key.shape)} and {tuple(memory_prev.shape)}")
    B, H, W = key.shape
    S = memory_prev.shape[1]
    if tuple(alpha.shape) not in ((H,), (B, H)):
        raise ValueError(f"{op}: alpha must have shape ({H},) or ({B}, {H}), got "
                         f"{tuple(alpha.shape)}")
    key = _step_dev(op, "key", key, dt, (B, H, W))
    alpha = _step_dev(op, "alpha", alpha, dt, alpha.shape)
    memory_prev = _step_dev(op, "memory_prev", memory_prev, dt, (B, S, W))
    w_r_prev = _step_dev(op, "w_r_prev", w_r_prev, dt, (B, H, S))
    w_u_prev = _step_dev(op, "w_u_prev", w_u_prev, dt, (B, S))
    i32 = np.int32
    g = cp.empty((B, H), dt)
    n = B * H
    _fn("lrua_gates", dt)(((n + THREADS - 1) // THREADS,), (THREADS,),
                          (alpha, i32(alpha.ndim == 2), i32(1), i32(B), i32(H), g))
    return host, dt, key, alpha, memory_prev, w_r_prev, w_u_prev, g


def lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma,
                      write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_step_forward (no add vector):
    -> read (B, H, W), memory (B, S, W), w_r (B, H, S), w_w (B, H, S), w_u (B, S).
    One launch of lrua_step_forward (one block per episode) after the gates."""
    op = "lrua_step_forward"
    host, dt, key, alpha, memory_prev, w_r_prev, w_u_prev, g = _step_inputs(
        op, key, alpha, memory_prev, w_r_prev, w_u_prev)
    B, H, W = key.shape
    S = memory_prev.shape[1]
    i32 = np.int32
    e = cp.empty
    read, memory = e((B, H, W), dt), e((B, S, W), dt)
    w_r, w_w, w_u = e((B, H, S), dt), e((B, H, S), dt), e((B, S), dt)
    _fn("lrua_step_forward", dt)((B,), (THREADS,),
                                 (key, g, memory_prev, w_r_prev, w_u_prev, dt.type(gamma),
                                  dt.type(EPS), _per_head(op, write_rule), i32(B), i32(H),
                                  i32(S), i32(W), read, memory, w_r, w_w, w_u,
                                  e((B, H, S), dt), e((B,), cp.int64),
                                  e((B, H), dt), e((B, S), dt), e((B, H, S), dt)))
    res = (read, memory, w_r, w_w, w_u)
    return tuple(cp.asnumpy(a) for a in res) if host else res


def lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev, w_u_prev,
                       gamma, write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_step_backward (no add vector):
    -> dkey (B, H, W), dalpha (shape of alpha), dmemory_prev (B, S, W), dw_r_prev (B, H, S).
    One launch of lrua_step_backward (the step's forward rerun, then its reverse, one block
    per episode), and lrua_sum_tb over the episodes when alpha is (H,)."""
    op = "lrua_step_backward"
    host, dt, key, alpha, memory_prev, w_r_prev, w_u_prev, g = _step_inputs(
        op, key, alpha, memory_prev, w_r_prev, w_u_prev)
    host = host and all(isinstance(a, np.ndarray) for a in (dread, dmemory, dw_r))
    B, H, W = key.shape
    S = memory_prev.shape[1]
    dread = _step_dev(op, "dread", dread, dt, (B, H, W))
    dmemory = _step_dev(op, "dmemory", dmemory, dt, (B, S, W))
    dw_r = _step_dev(op, "dw_r", dw_r, dt, (B, H, S))
    i32 = np.int32
    e = cp.empty
    dkey, dalpha = e((B, H, W), dt), e((B, H), dt)
    dmemory_prev, dw_r_prev = e((B, S, W), dt), e((B, H, S), dt)
    _fn("lrua_step_backward", dt)(
        (B,), (THREADS,),
        (dread, dmemory, dw_r, key, g, memory_prev, w_r_prev, w_u_prev, dt.type(gamma),
         dt.type(EPS), _per_head(op, write_rule), i32(B), i32(H), i32(S), i32(W), dkey, dalpha,
         dmemory_prev, dw_r_prev,
         e((B, S, W), dt), e((B, H, S), dt), e((B, H, S), dt), e((B, S), dt), e((B, H, S), dt),
         e((B,), cp.int64), e((B, H, S), dt), e((B, H, S), dt), e((B, H), dt), e((B, H), dt),
         e((B, H), dt), e((B, S), dt), e((B, S), dt), e((B, S), dt)))
    if alpha.ndim == 1:
        da = e((H,), dt)
        _fn("lrua_sum_tb", dt)(((H + THREADS - 1) // THREADS,), (THREADS,),
                               (dalpha, i32(1), i32(B), i32(H), da))
        dalpha = da
    res = (dkey, dalpha, dmemory_prev, dw_r_prev)
    return tuple(cp.asnumpy(a) for a in res) if host else res
