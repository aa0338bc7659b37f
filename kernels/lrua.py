"""LRUA memory of MANN (Santoro et al. 2016): one entry point per op, backends side by side.

Shape letters (this module):
    T time steps, B episodes, H heads (n = H reads), S memory slots, W slot width.

Ops (each checks its inputs, then calls the chosen backend; every op also takes the keyword
settings write_rule and adds / add, below):
    lrua_forward(keys, alpha, memory0, read0, usage0, gamma)
        -> reads (T, B, H, W), w_r (T, B, H, S), w_w (T, B, H, S), w_u (T, B, S),
           w_lu (T, B, S), memory (B, S, W) (M_T)
    lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gamma)
        -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S)
    lrua_forward_tape(keys, alpha, memory0, read0, usage0, gamma)
        -> reads, w_r, w_w, w_u, w_lu, memory (as lrua_forward), tape (an LruaTape)
    lrua_backward_tape(dreads, tape)
        -> dkeys, dalpha, dmemory0, dread0 (as lrua_backward), from the tape: no second
           forward pass (the fast path for a training step; reference and numba only)
    lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma)
        -> read (B, H, W) r_t, memory (B, S, W) M_t, w_r (B, H, S), w_w (B, H, S), w_u (B, S)
    lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev, w_u_prev,
                       gamma)
        -> dkey (B, H, W), dalpha (shape of alpha), dmemory_prev (B, S, W),
           dw_r_prev (B, H, S)
The whole-episode pair needs every key up front. MANN's key k_t depends on r_{t-1} through
its controller, so it runs the memory one step at a time with the step pair: key (B, H, W),
alpha (H,) or (B, H), memory_prev (B, S, W) M_{t-1}, w_r_prev (B, H, S), w_u_prev (B, S);
the backward takes dL/dr_t, dL/dM_t and dL/dw_r_t (the last two from step t + 1, zero after
the last step) and returns them one step earlier. Chained, the step pair gives the
whole-episode results (tests/test_lrua.py checks it).
Settings (keyword arguments of every op; metacore.reference.lrua has the formulas):
    write_rule="shared" | "per_head"  which least-used slots head h writes to: "shared" (the
               ops' default, kept so that existing callers and the benchmarks are unchanged)
               marks the n = H least-used slots in one n-hot vector that every head writes
               into; "per_head" gives head h its own h-th least-used slot (MANN's default).
               Ties in usage go to the lower slot index, in every backend.
    adds=None | (T, B, H, W) (add=None | (B, H, W) for the step pair)  a separate write
               content a_t per head instead of the key; the backwards then return its
               gradient dadds (dadd) last. Host backends only ('reference', 'numba'); the
               device backends raise NotImplementedError for it.
with keys (T, B, H, W), alpha (H,) (the paper's scalar gate per head) or (T, B, H) (a gate
per step from the controller), memory0 (B, S, W), read0 (B, H, S), usage0 (B, S), gamma a
float in [0, 1], 1 <= H <= S. All but lrua_backward_tape (which runs on the backend that
made its tape) take backend="auto" | "reference" | "numba" (and the whole-episode pair
lrua_forward / lrua_backward and the step pair also "numba-cuda" | "cupy"); the order of
operations in a step, EPS, ties and what is non-differentiable (the least-used selection
and the zeroed slot; so gamma and usage0 get no gradient) are in the docstring of
`metacore.reference.lrua`.

Backends:
    reference  metacore.reference.lrua       float64 NumPy, loops over batch and time; the
               ground truth.
    numba      metacore.kernels.lrua_numba   Numba CPU, parallel over episodes, the time loop
               inside each work item, input-dtype accumulation, the memory kept
               transposed, sums reordered (fastmath reassoc/contract only) so that they
               vectorize; lrua_backward reruns the forward keeping M_t, lrua_forward_tape
               keeps it for lrua_backward_tape.
    numba-cuda metacore.kernels.lrua_cuda     Numba @cuda.jit kernels, one block per
               episode: the whole-episode pair with the time loop inside, and the step
               pair (one launch per step; the backward reruns the step's forward in the
               same kernel), both built on one step's forward and reverse as device
               functions. No tape pair.
    cupy       metacore.kernels.lrua_cupy     the same kernels in CUDA C (lrua.cu).
    auto       NumPy arrays: the first importable of AUTO_ORDER; CuPy arrays: cupy; other
               CUDA device arrays: numba-cuda (kernels/_dispatch.py, docs/BACKENDS.md).
The two device backends are registered by kernels/_dispatch.py (DEVICE_BACKENDS). Device
arrays get the type, rank, shape and dtype checks but no finiteness scan; a host backend
named for device arrays raises TypeError instead of copying them back.

Adding a host backend is one line in BACKENDS, naming a module that defines the six
functions above with the reference's signatures (the backend's lrua_forward_tape returns
its own tape data last; the entry point wraps it in an LruaTape), and the package it needs.
A backend with only the whole-episode pair also works: the step and tape ops' 'auto' passes
over it for NumPy arrays, and for device arrays (or naming it) says what is missing.
"""
import numbers

import numpy as np

from . import _nonfinite
from ._dispatch import Backends, check_float_array, device_kind

EPS = 1e-8

# name -> (module implementing the ops, the optional package it needs or None)
BACKENDS = {
    "reference": ("metacore.reference.lrua", None),
    "numba": ("metacore.kernels.lrua_numba", "numba"),
}
AUTO_ORDER = ("numba", "reference")

_BACKENDS = Backends(BACKENDS, AUTO_ORDER)
_backend = _BACKENDS.get                      # (op, name, *arrays) -> module (by array kind)
available_backends = _BACKENDS.available      # () -> names that import on this machine


def backend_names():
    """Every registered backend name (host and device), sorted; 'auto' is not one."""
    return sorted(_BACKENDS.registry)


def require_backend(op, backend):
    """Resolve a backend name now (for a caller that wants to fail before its work starts,
    e.g. MANN's make_config) -> its module; the dispatch's errors otherwise: ImportError
    naming the missing package, BackendUnavailable saying what a device backend lacks here
    (no GPU, no driver), ValueError for an unknown name."""
    return _backend(op, backend)


def is_device_backend(backend):
    """True for the names of the device backends ('numba-cuda', 'cupy')."""
    return backend in _BACKENDS.device


def to_device(backend, *arrays):
    """NumPy arrays -> the device backend's own arrays (fresh copies), for state that a
    caller keeps on the device between step calls (MANN's memory, read and usage weights).
    Raises BackendUnavailable (an ImportError) saying what is missing where it cannot run."""
    mod = _backend("to_device", backend)
    return tuple(mod.to_device(a) for a in arrays)


def to_host(backend, *arrays):
    """The device backend's arrays -> fresh NumPy arrays."""
    mod = _backend("to_host", backend)
    return tuple(mod.to_host(a) for a in arrays)


# ---------------------------------------------------------------- input checks
WRITE_RULES = ("shared", "per_head")


def _check_settings(op, write_rule, adds, name, shape, dtype):
    """write_rule one of WRITE_RULES; adds None or a finite float array of the keys' shape
    and dtype; a device backend given adds -> NotImplementedError."""
    if not isinstance(write_rule, str) or write_rule not in WRITE_RULES:
        raise ValueError(f"{op}: write_rule must be one of {WRITE_RULES}, got {write_rule!r}")
    if adds is not None:
        check_float_array(op, name, adds, shape=shape, dtype=dtype)


def _no_adds_on_device(op, mod, adds, name):
    if adds is not None and _backend_name(mod) not in BACKENDS:
        raise NotImplementedError(
            f"{op}: backend {_backend_name(mod)!r} does not support a separate add vector "
            f"({name}); use backend 'numba' or 'reference'")


def _check(op, keys, alpha, memory0, read0, usage0, gamma):
    """keys (T, B, H, W), alpha (H,) or (T, B, H), memory0 (B, S, W), read0 (B, H, S),
    usage0 (B, S): one float dtype, finite; gamma a finite float in [0, 1]; 1 <= H <= S."""
    check_float_array(op, "keys", keys, ndim=4)
    T, B, H, W = keys.shape
    dt = keys.dtype
    if T < 1 or B < 1 or H < 1 or W < 1:
        raise ValueError(f"{op}: keys (T, B, H, W) needs at least one step, episode, head "
                         f"and feature, got shape {keys.shape}")
    check_float_array(op, "memory0", memory0, ndim=3, dtype=dt)
    S = memory0.shape[1]
    check_float_array(op, "memory0", memory0, shape=(B, None, W))
    if S < H:
        raise ValueError(f"{op}: memory0 has S = {S} slots, fewer than the H = {H} heads; "
                         f"the least-used rule marks the n = H least-used slots, so S >= H")
    check_float_array(op, "alpha", alpha, dtype=dt)
    if alpha.shape not in ((H,), (T, B, H)):
        raise ValueError(f"{op}: alpha must have shape ({H},) (one gate per head) or "
                         f"({T}, {B}, {H}) (one per step), got {alpha.shape}")
    check_float_array(op, "read0", read0, shape=(B, H, S), dtype=dt)
    check_float_array(op, "usage0", usage0, shape=(B, S), dtype=dt)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"{op}: gamma must be a real number, got {type(gamma).__name__}")
    if not (np.isfinite(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"{op}: gamma must be a finite number in [0, 1], got {gamma!r}")


# ---------------------------------------------------------------- ops
def _extra(arrays, adds):
    return arrays if adds is None else arrays + (adds,)


def _kw(write_rule, adds, name="adds"):
    """The settings as a backend's keyword arguments: adds only when given (a device
    backend has no such argument)."""
    return {"write_rule": write_rule} if adds is None else {"write_rule": write_rule,
                                                             name: adds}


def lrua_forward(keys, alpha, memory0, read0, usage0, gamma, backend="auto",
                 write_rule="shared", adds=None):
    """Run the LRUA memory over T steps of B episodes; see the module docstring.
    -> reads (T, B, H, W), w_r (T, B, H, S), w_w (T, B, H, S), w_u (T, B, S),
       w_lu (T, B, S), memory (B, S, W); fresh arrays in the dtype of keys."""
    op = "lrua_forward"
    _check(op, keys, alpha, memory0, read0, usage0, gamma)
    _check_settings(op, write_rule, adds, "adds", keys.shape, keys.dtype)
    mod = _backend(op, backend, *_extra((keys, alpha, memory0, read0, usage0), adds))
    _no_adds_on_device(op, mod, adds, "adds")
    return _host_finite(op, ("reads", "w_r", "w_w", "w_u", "w_lu", "memory"),
                        mod.lrua_forward(keys, alpha, memory0, read0, usage0, float(gamma),
                                         **_kw(write_rule, adds)))


def _host_finite(op, names, result):
    """A non-finite output is never returned silently (kernels/_nonfinite.py); host arrays
    only (a device result stays on its device)."""
    arrays = dict(zip(names, result))
    if all(type(a) is np.ndarray for a in arrays.values()):
        _nonfinite.check_outputs(op, result[0].dtype, arrays, hint="key scale")
    return result


def lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gamma, backend="auto",
                  write_rule="shared", adds=None):
    """Backpropagation through time of dL/dreads = dreads: (T, B, H, W).
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S),
    and dadds (T, B, H, W) last when adds is given; fresh arrays. The forward pass is
    recomputed inside (nothing is kept between calls)."""
    op = "lrua_backward"
    _check(op, keys, alpha, memory0, read0, usage0, gamma)
    _check_settings(op, write_rule, adds, "adds", keys.shape, keys.dtype)
    check_float_array(op, "dreads", dreads, shape=keys.shape, dtype=keys.dtype)
    mod = _backend(op, backend, *_extra((dreads, keys, alpha, memory0, read0, usage0), adds))
    _no_adds_on_device(op, mod, adds, "adds")
    return _host_finite(op, _extra(("dkeys", "dalpha", "dmemory0", "dread0"),
                                   None if adds is None else "dadds"),
                        mod.lrua_backward(dreads, keys, alpha, memory0, read0, usage0,
                                          float(gamma), **_kw(write_rule, adds)))


def _backend_with(op, backend, arrays, lacks):
    """The module for an op that a backend may lack: 'auto' with NumPy arrays takes the first
    importable backend of AUTO_ORDER that has it, and naming one without it (or 'auto' with
    device arrays, whose backends lack it) raises NotImplementedError: 'backend X ' + lacks."""
    on_device = device_kind(arrays) != "host"
    if backend == "auto" and not on_device:
        for name in AUTO_ORDER:
            try:
                mod = _backend(op, name)
            except ImportError:
                continue
            if hasattr(mod, op):
                return mod
        raise ImportError(f"{op}: no importable backend among {AUTO_ORDER} has {op}")
    mod = _backend(op, backend, *arrays) if on_device else _backend(op, backend)
    if not hasattr(mod, op):
        name = mod.__name__ if backend == "auto" else repr(backend)
        raise NotImplementedError(f"{op}: backend {name} {lacks}")
    return mod


def _step_backend(op, backend, *arrays):
    """The module for a step op. A backend may implement only the whole-episode pair: 'auto'
    with NumPy arrays then takes the first importable backend of AUTO_ORDER that has the step
    pair, and naming one without it (or 'auto' with device arrays of a backend without it)
    is a clear error. Both device backends have the step pair."""
    return _backend_with(op, backend, arrays,
                         "implements only the whole-episode lrua_forward / lrua_backward")


class LruaTape:
    """What lrua_forward_tape keeps for lrua_backward_tape. Opaque: the backend that made it
    (backend, its name), the episode's shape (T, B, H, S, W), dtype and alpha's shape, and
    that backend's own arrays (data). lrua_backward_tape leaves it unchanged."""
    __slots__ = ("backend", "shape", "dtype", "alpha_shape", "data")

    def __init__(self, backend, shape, dtype, alpha_shape, data):
        self.backend = backend
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.alpha_shape = tuple(alpha_shape)
        self.data = data

    def __repr__(self):
        T, B, H, S, W = self.shape
        return (f"LruaTape(backend={self.backend!r}, T={T}, B={B}, H={H}, S={S}, W={W}, "
                f"dtype={self.dtype}, alpha shape {self.alpha_shape})")


def _backend_name(mod):
    for name, (module, _) in BACKENDS.items():
        if mod.__name__ == module:
            return name
    return mod.__name__


def lrua_forward_tape(keys, alpha, memory0, read0, usage0, gamma, backend="auto",
                      write_rule="shared", adds=None):
    """lrua_forward that also keeps what the backward needs, so that the gradients of the
    same episode cost only the reverse sweep (lrua_backward reruns the forward).
    -> reads, w_r, w_w, w_u, w_lu, memory (exactly lrua_forward's), tape: an LruaTape for
    lrua_backward_tape. The tape holds copies: changing the inputs or the returned arrays
    afterwards does not change its gradients. Backends: 'reference', 'numba' (the device
    backends have only lrua_forward / lrua_backward: NotImplementedError)."""
    op = "lrua_forward_tape"
    _check(op, keys, alpha, memory0, read0, usage0, gamma)
    _check_settings(op, write_rule, adds, "adds", keys.shape, keys.dtype)
    mod = _backend_with(op, backend, _extra((keys, alpha, memory0, read0, usage0), adds),
                        "implements only lrua_forward / lrua_backward (which recomputes the "
                        "forward); use those")
    *out, data = mod.lrua_forward_tape(keys, alpha, memory0, read0, usage0, float(gamma),
                                       **_kw(write_rule, adds))
    _host_finite(op, ("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), out)
    T, B, H, W = keys.shape
    tape = LruaTape(_backend_name(mod), (T, B, H, memory0.shape[1], W), keys.dtype,
                    alpha.shape, data)
    return tuple(out) + (tape,)


def lrua_backward_tape(dreads, tape):
    """Backpropagation through time of dL/dreads = dreads: (T, B, H, W) for the episode that
    lrua_forward_tape ran, on the backend that ran it, without recomputing the forward.
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S)
    (and dadds last when the episode had adds); fresh arrays, equal to lrua_backward's for
    the same inputs. The tape is not changed (it
    may be used again)."""
    op = "lrua_backward_tape"
    if not isinstance(tape, LruaTape):
        raise TypeError(f"{op}: tape must be the LruaTape that lrua_forward_tape returned, "
                        f"got {type(tape).__name__}")
    T, B, H, S, W = tape.shape
    check_float_array(op, "dreads", dreads, shape=(T, B, H, W), dtype=tape.dtype)
    mod = _backend(op, tape.backend, dreads)
    return mod.lrua_backward_tape(dreads, tape.data)


def _check_step(op, key, alpha, memory_prev, w_r_prev, w_u_prev, gamma):
    """key (B, H, W), alpha (H,) or (B, H), memory_prev (B, S, W), w_r_prev (B, H, S),
    w_u_prev (B, S): one float dtype, finite; gamma a finite float in [0, 1]; 1 <= H <= S."""
    check_float_array(op, "key", key, ndim=3)
    B, H, W = key.shape
    dt = key.dtype
    if B < 1 or H < 1 or W < 1:
        raise ValueError(f"{op}: key (B, H, W) needs at least one episode, head and "
                         f"feature, got shape {key.shape}")
    check_float_array(op, "memory_prev", memory_prev, ndim=3, dtype=dt)
    S = memory_prev.shape[1]
    check_float_array(op, "memory_prev", memory_prev, shape=(B, None, W))
    if S < H:
        raise ValueError(f"{op}: memory_prev has S = {S} slots, fewer than the H = {H} "
                         f"heads; the least-used rule marks the n = H least-used slots, so "
                         f"S >= H")
    check_float_array(op, "alpha", alpha, dtype=dt)
    if alpha.shape not in ((H,), (B, H)):
        raise ValueError(f"{op}: alpha must have shape ({H},) (one gate per head) or "
                         f"({B}, {H}) (one per episode), got {alpha.shape}")
    check_float_array(op, "w_r_prev", w_r_prev, shape=(B, H, S), dtype=dt)
    check_float_array(op, "w_u_prev", w_u_prev, shape=(B, S), dtype=dt)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"{op}: gamma must be a real number, got {type(gamma).__name__}")
    if not (np.isfinite(gamma) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"{op}: gamma must be a finite number in [0, 1], got {gamma!r}")


def lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma, backend="auto",
                      write_rule="shared", add=None):
    """One step t of B episodes; see the module docstring.
    -> read (B, H, W), memory (B, S, W), w_r (B, H, S), w_w (B, H, S), w_u (B, S);
    fresh arrays in the dtype of key."""
    op = "lrua_step_forward"
    _check_step(op, key, alpha, memory_prev, w_r_prev, w_u_prev, gamma)
    _check_settings(op, write_rule, add, "add", key.shape, key.dtype)
    mod = _step_backend(op, backend, *_extra((key, alpha, memory_prev, w_r_prev, w_u_prev),
                                             add))
    _no_adds_on_device(op, mod, add, "add")
    return mod.lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, float(gamma),
                                 **_kw(write_rule, add, "add"))


def lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev, w_u_prev,
                       gamma, backend="auto", write_rule="shared", add=None):
    """Reverse of one step: dread (B, H, W) dL/dr_t, dmemory (B, S, W) dL/dM_t, dw_r
    (B, H, S) dL/dw_r_t -> dkey (B, H, W), dalpha (shape of alpha), dmemory_prev (B, S, W),
    dw_r_prev (B, H, S), and dadd (B, H, W) last when add is given; fresh arrays. The
    step's forward is recomputed inside."""
    op = "lrua_step_backward"
    _check_step(op, key, alpha, memory_prev, w_r_prev, w_u_prev, gamma)
    _check_settings(op, write_rule, add, "add", key.shape, key.dtype)
    dt = key.dtype
    check_float_array(op, "dread", dread, shape=key.shape, dtype=dt)
    check_float_array(op, "dmemory", dmemory, shape=memory_prev.shape, dtype=dt)
    check_float_array(op, "dw_r", dw_r, shape=w_r_prev.shape, dtype=dt)
    mod = _step_backend(op, backend, *_extra((dread, dmemory, dw_r, key, alpha, memory_prev,
                                              w_r_prev, w_u_prev), add))
    _no_adds_on_device(op, mod, add, "add")
    return mod.lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev,
                                  w_u_prev, float(gamma), **_kw(write_rule, add, "add"))
