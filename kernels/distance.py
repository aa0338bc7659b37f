"""Episodic distances and the ProtoNet loss: one entry point per op, backends side by side.

Shape letters (this module):
    T tasks, Q queries per task, N supports (or prototypes) per task, D features.

Ops (each checks its inputs, then calls the chosen backend):
    pairwise_sqeuclidean(q, s)            -> d: (T, Q, N)   sum_k (q - s)^2
    pairwise_sqeuclidean_backward(g, q, s) -> dq: (T, Q, D), ds: (T, N, D)
    pairwise_l1(q, s), pairwise_l1_backward(g, q, s)          sign(0) = 0
    pairwise_cosine(q, s), pairwise_cosine_backward(g, q, s)  norms clamped at EPS = 1e-8
    protonet_loss(q, s, y, gloss=None, metric="sqeuclidean", scale=1.0)
                                          -> loss: (T,), dq, ds, pred: (T, Q) int64
All take backend="auto" | "reference" | "numba" | "numba-cuda" | "cupy"; conventions are in
the docstring of `metacore.reference.distance`.

Backends:
    reference  metacore.reference.distance   float64 NumPy, direct formulas; the ground truth.
    numba      metacore.kernels.distance_numba  Numba CPU: serial kernels and a fused
               ProtoNet loss at 5-way episodic sizes, parallel tiled kernels above, and
               from the 20-way episode up BLAS GEMMs (squared Euclidean forward, backward
               and loss: centred, cancelling pairs and rows recomputed by the direct
               formula); input-dtype accumulation. See its docstring.
    numba-cuda metacore.kernels.distance_cuda  Numba @cuda.jit kernels      } registered by
    cupy       metacore.kernels.distance_cupy  CUDA C raw kernels (.cu)     } _dispatch
    auto       NumPy arrays: the first importable of AUTO_ORDER; CuPy arrays: cupy; other
               CUDA device arrays: numba-cuda (kernels/_dispatch.py, docs/BACKENDS.md).
Device arrays pass the same type, rank, shape and dtype checks as NumPy arrays, but no
finiteness or label-range scan (a device reduction and a synchronisation per call); a host
backend named for device arrays raises TypeError instead of copying them back.

Adding a host backend is one line in BACKENDS, naming a module that defines the seven
functions above with the reference's signatures, and the package it needs; a device backend
is one line in _dispatch.DEVICE_BACKENDS. Device backends never join AUTO_ORDER.
"""

import numpy as np

from . import _nonfinite
from ._dispatch import Backends, array_kind, check_float_array, check_int_array

EPS = 1e-8
METRICS = ("sqeuclidean", "l1", "cosine")

# name -> (module implementing the ops, the optional package it needs or None)
BACKENDS = {
    "reference": ("metacore.reference.distance", None),
    "numba": ("metacore.kernels.distance_numba", "numba"),
}
AUTO_ORDER = ("numba", "reference")

_BACKENDS = Backends(BACKENDS, AUTO_ORDER)
_backend = _BACKENDS.get                      # (op, name, *arrays) -> module (by array kind)
available_backends = _BACKENDS.available      # () -> names that import on this machine


# ---------------------------------------------------------------- input checks
def _finite(op, name, x):
    """Reject NaN/Inf with check_float_array's message. One reduction on the fast path: the
    sum of finite values is finite unless it overflows, and only then (or for a real NaN or
    Inf) does the elementwise check run, so episodic calls pay one NumPy call, not three.
    Device arrays are not scanned (see the module docstring)."""
    if type(x) is not np.ndarray and array_kind(x) != "host":
        return
    if x.size and not np.isfinite(x.sum()):
        check_float_array(op, name, x)


def _check_pair(op, q, s):
    """q: (T, Q, D), s: (T, N, D), same float dtype, finite."""
    check_float_array(op, "q", q, ndim=3, finite=False)
    T, _, D = q.shape
    check_float_array(op, "s", s, ndim=3, dtype=q.dtype, finite=False)
    if s.shape[0] != T or s.shape[2] != D:
        raise ValueError(f"{op}: s must have shape ({T}, *, {D}) to match q of shape "
                         f"{q.shape} (same tasks T and features D), got {s.shape}")
    _finite(op, "q", q)
    _finite(op, "s", s)


def _check_cosine_d(op, q):
    """A cosine of vectors with no features is 0 / 0, which the EPS clamp would silently turn
    into 0 (and its gradient into 0): refused."""
    if q.shape[2] == 0:
        raise ValueError(f"{op}: cosine similarity needs D >= 1 features, got q of shape "
                         f"{q.shape}")


def _check_grad(op, g, q, s):
    _check_pair(op, q, s)
    check_float_array(op, "g", g, shape=(q.shape[0], q.shape[1], s.shape[1]), dtype=q.dtype)


# The host fast path. At episodic sizes the general checks above and the backend lookup
# cost as much as the kernels (about 3 us per NumPy reduction, 1.5 us per lookup), so a
# backend="auto" call on NumPy arrays whose types, ranks, dtypes and shapes already fit
# (tested here by identity and integer compares only) skips them: it uses the auto backend
# resolved once, and one finiteness probe over all arrays (the backend's compiled
# all_finite when it has one, else _finite per array). Anything else, and any non-finite
# value, goes through the general checks, so errors and their messages are unchanged.
_FAST_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_AUTO_HOST = []                               # [module] once resolved


def _fast_pair(q, s):
    return (type(q) is np.ndarray and type(s) is np.ndarray and q.ndim == 3 and s.ndim == 3
            and (q.dtype is _FAST_DTYPES[0] or q.dtype is _FAST_DTYPES[1])
            and s.dtype is q.dtype and s.shape[0] == q.shape[0]
            and s.shape[2] == q.shape[2])


def _fast_grad(g, q, s):
    return (_fast_pair(q, s) and type(g) is np.ndarray and g.dtype is q.dtype
            and g.shape == (q.shape[0], q.shape[1], s.shape[1]))


def _auto_host(op):
    if not _AUTO_HOST:
        _AUTO_HOST.append(_backend(op, "auto"))
    return _AUTO_HOST[0]


def _fast_finite(op, mod, names, arrays):
    """True if every array is finite; raises the general check's error otherwise."""
    probe = getattr(mod, "all_finite", None)
    if probe is not None and probe(*arrays):
        return
    for name, x in zip(names, arrays):
        _finite(op, name, x)


def _host_finite(op, names, result, hint="input scale"):
    """A non-finite distance, loss or gradient is never returned silently (kernels/
    _nonfinite.py: FloatingPointError, or a warning under the policy 'warn'); host arrays
    only (a device result stays on its device). names: one per checked output, in order."""
    outs = result if isinstance(result, tuple) else (result,)
    arrays = dict(zip(names, outs))
    if all(type(a) is np.ndarray for a in arrays.values()):
        _nonfinite.check_outputs(op, outs[0].dtype, arrays, hint=hint)
    return result


# ---------------------------------------------------------------- ops
def pairwise_sqeuclidean(q, s, backend="auto"):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N), d = sum_k (q_ik - s_jk)^2."""
    op = "pairwise_sqeuclidean"
    if backend == "auto" and _fast_pair(q, s):
        mod = _auto_host(op)
        _fast_finite(op, mod, ("q", "s"), (q, s))
        return _host_finite(op, ("d",), mod.pairwise_sqeuclidean(q, s))
    _check_pair(op, q, s)
    return _host_finite(op, ("d",), _backend(op, backend, q, s).pairwise_sqeuclidean(q, s))


def pairwise_sqeuclidean_backward(g, q, s, backend="auto"):
    """g: (T, Q, N) upstream -> dq: (T, Q, D), ds: (T, N, D)."""
    op = "pairwise_sqeuclidean_backward"
    if backend == "auto" and _fast_grad(g, q, s):
        mod = _auto_host(op)
        _fast_finite(op, mod, ("q", "s", "g"), (q, s, g))
        return _host_finite(op, ("dq", "ds"), mod.pairwise_sqeuclidean_backward(g, q, s))
    _check_grad(op, g, q, s)
    mod = _backend(op, backend, g, q, s)
    return _host_finite(op, ("dq", "ds"), mod.pairwise_sqeuclidean_backward(g, q, s))


def pairwise_l1(q, s, backend="auto"):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N), d = sum_k |q_ik - s_jk|."""
    _check_pair("pairwise_l1", q, s)
    mod = _backend("pairwise_l1", backend, q, s)
    return _host_finite("pairwise_l1", ("d",), mod.pairwise_l1(q, s))


def pairwise_l1_backward(g, q, s, backend="auto"):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D); subgradient sign(0) = 0."""
    _check_grad("pairwise_l1_backward", g, q, s)
    mod = _backend("pairwise_l1_backward", backend, g, q, s)
    return _host_finite("pairwise_l1_backward", ("dq", "ds"), mod.pairwise_l1_backward(g, q, s))


def pairwise_cosine(q, s, backend="auto"):
    """q: (T, Q, D), s: (T, N, D) -> c: (T, Q, N) = q.s / (max(|q|,EPS) max(|s|,EPS))."""
    _check_pair("pairwise_cosine", q, s)
    _check_cosine_d("pairwise_cosine", q)
    mod = _backend("pairwise_cosine", backend, q, s)
    return _host_finite("pairwise_cosine", ("c",), mod.pairwise_cosine(q, s))


def pairwise_cosine_backward(g, q, s, backend="auto"):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D)."""
    _check_grad("pairwise_cosine_backward", g, q, s)
    _check_cosine_d("pairwise_cosine_backward", q)
    mod = _backend("pairwise_cosine_backward", backend, g, q, s)
    return _host_finite("pairwise_cosine_backward", ("dq", "ds"),
                        mod.pairwise_cosine_backward(g, q, s))


def protonet_loss(q, s, y, gloss=None, metric="sqeuclidean", scale=1.0, backend="auto"):
    """ProtoNet loss: softmax over logits = -scale*d (sqeuclidean, l1) or +scale*c (cosine),
    cross-entropy against y, mean over the Q queries of each task.

    q: (T, Q, D), s: (T, N, D), y: (T, Q) ints in [0, N), gloss: (T,) upstream gradient of
    the losses (None = ones, i.e. the gradient of loss.sum()).
    Returns loss: (T,), dq: (T, Q, D), ds: (T, N, D) (gradients of sum_t gloss_t loss_t),
    pred: (T, Q) int64 argmax of the logits (first index on ties); accuracy = pred == y."""
    op = "protonet_loss"
    fast = backend == "auto" and _fast_pair(q, s)
    if fast:
        _fast_finite(op, _auto_host(op), ("q", "s"), (q, s))
    else:
        _check_pair(op, q, s)
    T, Q, _ = q.shape
    N = s.shape[1]
    if T < 1 or Q < 1 or N < 1:
        raise ValueError(f"{op}: needs at least one query and one prototype per task, and "
                         f"at least one task, got q of shape {q.shape} and s of shape "
                         f"{s.shape}")
    check_int_array(op, "y", y, shape=(T, Q), low=0, high=N)
    if metric not in METRICS:
        raise ValueError(f"{op}: unknown metric {metric!r}; choose one of {METRICS}")
    if isinstance(scale, (bool, np.bool_)) or not (
            isinstance(scale, (int, float, np.integer, np.floating)) and np.isfinite(scale)
            and scale > 0):
        # scale <= 0 turns the nearest prototype into the least likely class
        raise ValueError(f"{op}: scale must be a finite number > 0, got {scale!r}")
    if metric == "cosine":
        _check_cosine_d(op, q)
    if gloss is not None:
        check_float_array(op, "gloss", gloss, shape=(T,), dtype=q.dtype)
    mod = _auto_host(op) if fast and type(y) is np.ndarray and (
        gloss is None or type(gloss) is np.ndarray) else _backend(op, backend, q, s, y, gloss)
    return _host_finite(op, ("loss", "dq", "ds"),
                        mod.protonet_loss(q, s, y, gloss=gloss, metric=metric,
                                          scale=float(scale)))
