"""Fused MAML-family meta-gradients of a ReLU MLP with MSE loss (the sinusoid model of
Finn et al. 2017, any widths), for a whole meta-batch in one compiled call: second-order
MAML, first-order MAML and Reptile.

Shape letters (this module):
    T tasks, N support points, M query points, P parameters, D input features, O outputs,
    L linear layers.

The network is given by its layer widths alone, sizes = (D, H_1, ..., H_{L-1}, O):
Linear(D, H_1) - ReLU - ... - ReLU - Linear(H_{L-1}, O), loss mean_{n,o} (y - target)^2,
its parameters one flat (P,) vector laid out layer by layer, w (d_in, d_out) row-major and
then b (d_out,) (metacore.network.Model's layout for such a model). This module knows
nothing of Model: metacore.algorithms.mlp_maml turns a Model into sizes and calls it.

Ops:
    mlp_maml_gradient(sizes, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                      first_order=False)
        -> query_loss (T,), grad (P,)
    the same numbers as metacore.algorithms.maml.maml_gradient(..., first_order=...)
    .query_loss / .grad for a scalar alpha and one support batch used at every inner step.
    mlp_reptile_direction(sizes, theta, support_x, support_y, alpha, steps=1)
        -> loss_0 (T,), d (P,)
    the same numbers as metacore.algorithms.reptile.reptile_direction(...).
    mlp_layout(sizes) -> dims (L+1,), woff (L,), boff (L,) int64: the kernel's view of sizes.

Versions:
    reference  metacore.algorithms.maml.maml_gradient / reptile.reptile_direction: NumPy over
               all tasks at once, any Model; the ground truth here (itself checked by finite
               differences).
    numba      mlp_maml_numba.py: Numba CPU, one core, the task loop, inner steps, query
               gradient and R-operator backward sweep written out per layer (no per-op
               NumPy calls; products through small_gemm.py), input-dtype accumulation.
numba is imported on first use, so this module imports without it.
"""
import numbers

import numpy as np

from ._validate import check_alpha, check_float_array, check_steps

from . import _nonfinite

_numba_module = None


def _kernel():
    global _numba_module
    if _numba_module is None:
        try:
            from . import mlp_maml_numba as mod
        except ImportError as err:
            raise ImportError(f"mlp_maml_gradient needs the package 'numba', which could not "
                              f"be imported ({err}); install it (pip install numba) or use "
                              f"metacore.algorithms.maml.maml_gradient") from err
        _numba_module = mod
    return _numba_module


_layouts = {}     # sizes as a tuple of Python ints -> (dims, woff, boff, P)


def _layout(op, sizes):
    """-> dims, woff, boff (int64 arrays), P for the layer widths `sizes`; remembered for
    tuples of Python ints (what metacore.algorithms.mlp_maml passes), so that a call costs a
    dictionary lookup. Only exact ints hit the memo: 1.0 == 1 as a dictionary key."""
    exact = type(sizes) is tuple and all(type(d) is int for d in sizes)
    found = _layouts.get(sizes) if exact else None
    if found is None:
        found = _build_layout(op, sizes)
        if exact:
            if len(_layouts) > 64:
                _layouts.clear()
            _layouts[sizes] = found
    return found


def _build_layout(op, sizes):
    ok = (isinstance(sizes, (tuple, list, np.ndarray)) and len(sizes) >= 2
          and all(isinstance(d, numbers.Integral) and not isinstance(d, (bool, np.bool_))
                  and d >= 1 for d in sizes))
    if not ok:
        raise ValueError(f"{op}: sizes must be the layer widths (D, ..., O) of the MLP, at "
                         f"least two ints >= 1, got {sizes!r}")
    dims = np.array([int(d) for d in sizes], np.int64)                 # (L+1,)
    L = dims.shape[0] - 1
    woff, boff = np.empty(L, np.int64), np.empty(L, np.int64)          # (L,) each
    offset = 0
    for l in range(L):                   # w (d_in, d_out) row-major, then b (d_out,)
        woff[l] = offset
        boff[l] = offset + dims[l] * dims[l + 1]
        offset = int(boff[l] + dims[l + 1])
    return dims, woff, boff, offset


def mlp_layout(sizes):
    """-> dims (L+1,), woff (L,), boff (L,) int64: the layer widths and where each layer's
    w and b start in the flat parameter vector (the compiled kernel's arguments)."""
    dims, woff, boff, _ = _layout("mlp_layout", sizes)
    return dims, woff, boff


def _check_inputs(op, P, dims, theta, support_x, support_y, query_x, query_y, alpha, steps):
    """The checks of metacore.algorithms.maml for this one network shape, without its
    per-call (T, P) scratch arrays: a few microseconds, not tens (finiteness is checked
    after, in one compiled pass). -> alpha (float), steps."""
    if isinstance(alpha, np.ndarray) and alpha.ndim > 0:
        raise ValueError(f"{op}: alpha must be a scalar (per-parameter Meta-SGD rates are "
                         f"not fused), got an array of shape {alpha.shape}")
    if isinstance(support_x, (list, tuple)) or isinstance(support_y, (list, tuple)):
        raise ValueError(f"{op}: support must be one (T, N, D) batch used at every inner "
                         f"step, not a list of batches")
    steps = check_steps(op, steps)
    check_float_array(op, "theta", theta, shape=(P,), finite=False)
    dt = theta.dtype
    D, O = int(dims[0]), int(dims[-1])
    check_float_array(op, "support_x", support_x, shape=(None, None, D), dtype=dt,
                      finite=False)
    T, N = support_x.shape[:2]
    check_float_array(op, "support_y", support_y, shape=(T, N, O), dtype=dt, finite=False)
    check_float_array(op, "query_x", query_x, shape=(T, None, D), dtype=dt, finite=False)
    M = query_x.shape[1]
    check_float_array(op, "query_y", query_y, shape=(T, M, O), dtype=dt, finite=False)
    if T == 0 or N == 0 or M == 0:
        raise ValueError(f"{op}: needs at least one task, support point and query point, got "
                         f"support_x {support_x.shape} and query_x {query_x.shape}")
    return check_alpha(op, alpha, P, dt), steps


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _plainly_valid(P, dims, theta, sx, sy, qx, qy, alpha, steps):
    """True when every argument is obviously right (the common case, in about a
    microsecond); anything else goes through _check_inputs, which names the problem."""
    arrays = (theta, sx, sy, qx, qy)
    if not all(type(a) is np.ndarray for a in arrays) or theta.dtype not in _FLOATS:
        return False
    dt = theta.dtype
    if not all(a.dtype == dt for a in arrays) or theta.shape != (P,):
        return False
    if sx.ndim != 3 or qx.ndim != 3 or 0 in sx.shape or 0 in qx.shape:
        return False
    T, N, D = sx.shape
    O = int(dims[-1])
    return (D == dims[0] and sy.shape == (T, N, O) and qx.shape[0] == T and qx.shape[2] == D
            and qy.shape == (T, qx.shape[1], O) and type(steps) is int and steps >= 1
            and type(alpha) in (float, int) and 0 <= alpha < float("inf"))


def _run(op, sizes, theta, support_x, support_y, query_x, query_y, alpha, steps, mode):
    dims, woff, boff, P = _layout(op, sizes)
    if not _plainly_valid(P, dims, theta, support_x, support_y, query_x, query_y, alpha,
                          steps):
        alpha, steps = _check_inputs(op, P, dims, theta, support_x, support_y, query_x,
                                     query_y, alpha, steps)
    dt = theta.dtype
    arrays = [np.ascontiguousarray(a) for a in (theta, support_x, support_y, query_x,
                                                 query_y)]
    kernel = _kernel()
    if not kernel.all_finite(*arrays):     # one compiled pass found a NaN or Inf: name it
        for name, x in zip(("theta", "support_x", "support_y", "query_x", "query_y"), arrays):
            check_float_array(op, name, x)
    loss, grad = kernel.mlp_maml_gradient(*arrays, dt.type(alpha), steps, dims, woff, boff,
                                          mode)
    if not (kernel._finite_1d(loss) and kernel._finite_1d(grad)):   # one compiled pass
        # e.g. float32, k = 5, alpha = 0.1 from a poor theta: the inner loop diverges past
        # 3.4e38 where float64 stays finite; never returned silently (kernels/_nonfinite.py)
        names = ("support loss", "Reptile direction") if mode == 2 else (
            "query loss", "meta-gradient")
        _nonfinite.report(op, dt, dict(zip(names, (loss, grad))), hint="alpha",
                          context=f"alpha={alpha}, steps={steps}")
    return loss, grad


def mlp_maml_gradient(sizes, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                      first_order=False):
    """Second-order (or, with first_order=True, first-order) MAML meta-gradient, fused
    (module docstring).

    sizes: the layer widths (D, ..., O); theta: (P,) float32 or float64 in the layout of
    the module docstring; support_x (T, N, D), support_y (T, N, O): the batch of every
    inner step; query_x (T, M, D), query_y (T, M, O); alpha: a scalar >= 0; steps: int >= 1.
    -> query_loss (T,), grad (P,) in theta's dtype (fresh arrays). A non-finite loss or
    gradient raises FloatingPointError naming the likely cause (or warns, under
    metacore.nonfinite.set_policy('warn'); kernels/_nonfinite.py).
    """
    mode = 1 if first_order else 0             # mlp_maml_numba.FIRST_ORDER / SECOND_ORDER
    return _run("mlp_maml_gradient", sizes, theta, support_x, support_y, query_x, query_y,
                alpha, steps, mode)


def mlp_reptile_direction(sizes, theta, support_x, support_y, alpha, steps=1):
    """Reptile's direction d = mean_t (theta - theta_k^t), fused (module docstring). Same
    arguments as mlp_maml_gradient without the query. -> loss_0 (T,) (the pre-update
    support losses), d (P,) in theta's dtype (fresh arrays)."""
    # the query arguments are only shape-checked (the support stands in), never read
    return _run("mlp_reptile_direction", sizes, theta, support_x, support_y, support_x,
                support_y, alpha, steps, 2)    # mlp_maml_numba.REPTILE
