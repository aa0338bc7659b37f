"""Fused MAML-family meta-gradients of a ReLU MLP with MSE loss (the sinusoid model of
Finn et al. 2017, any widths), for a whole meta-batch in one compiled call: second-order
MAML, first-order MAML and Reptile.

Shape letters (this module):
    T tasks, N support points, M query points, P parameters, D input features, O outputs.

Ops:
    mlp_maml_gradient(model, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                      first_order=False)
        -> query_loss (T,), grad (P,)
    the same numbers as metacore.algorithms.maml.maml_gradient(..., first_order=...)
    .query_loss / .grad for a scalar alpha and one support batch used at every inner step.
    mlp_reptile_direction(model, theta, support_x, support_y, alpha, steps=1)
        -> loss_0 (T,), d (P,)
    the same numbers as metacore.algorithms.reptile.reptile_direction(...).

Versions:
    reference  metacore.algorithms.maml.maml_gradient / reptile.reptile_direction: NumPy over
               all tasks at once, any Model; the ground truth here (itself checked by finite
               differences).
    numba      metacore.kernels.mlp_maml_numba: Numba CPU, one core, the task loop, inner
               steps, query gradient and R-operator backward sweep written out per layer
               (no per-op NumPy calls; products through kernels/small_gemm.py), input-dtype
               accumulation. Only for models made of Linear - ReLU - ... - Linear with loss
               'mse'.
numba is imported on first use, so this module imports without it.
"""
import numpy as np

from metacore.algorithms.maml import _check_alpha, _check_steps
from metacore.network import Linear, Model, ReLU
from metacore.validate import check_float_array

from . import _nonfinite

_numba_module = None


def _kernel():
    global _numba_module
    if _numba_module is None:
        try:
            import metacore.kernels.mlp_maml_numba as mod
        except ImportError as err:
            raise ImportError(f"mlp_maml_gradient needs the package 'numba', which could not "
                              f"be imported ({err}); install it (pip install numba) or use "
                              f"metacore.algorithms.maml.maml_gradient") from err
        _numba_module = mod
    return _numba_module


_structures = {}     # what the layout depends on -> (dims, woff, boff)


def mlp_structure(model):
    """-> dims (L+1,), woff (L,), boff (L,) int64 for a Linear-ReLU-...-Linear MSE model;
    a ValueError naming the problem for any other model. Remembered by value (layer types
    and widths, loss), so that a per-call model walk costs no time."""
    if not isinstance(model, Model):
        return _mlp_structure(model)          # raises the TypeError
    key = (model.loss_name, model.num_params) + tuple(
        (type(layer), getattr(layer, "d_in", None), getattr(layer, "d_out", None))
        for layer in model.layers)
    found = _structures.get(key)
    if found is None:
        found = _mlp_structure(model)
        if len(_structures) > 64:
            _structures.clear()
        _structures[key] = found
    return found


def _mlp_structure(model):
    op = "mlp_maml_gradient"
    if not isinstance(model, Model):
        raise TypeError(f"{op}: model must be a metacore.network.Model, got "
                        f"{type(model).__name__}")
    kinds = [type(layer).__name__ for layer in model.layers]
    ok = (len(kinds) % 2 == 1
          and all(type(layer) is (Linear if i % 2 == 0 else ReLU)
                  for i, layer in enumerate(model.layers)))
    if not ok:
        raise ValueError(f"{op}: model {model.name} must be Linear, ReLU, Linear, ..., Linear "
                         f"(alternating, ending in Linear), got layers {kinds}")
    if model.loss_name != "mse":
        raise ValueError(f"{op}: model {model.name} must have loss 'mse', got "
                         f"{model.loss_name!r}")
    linears = [(n, layer) for n, layer in zip(model.layer_names, model.layers)
               if isinstance(layer, Linear)]
    dims = np.array([linears[0][1].d_in] + [layer.d_out for _, layer in linears], np.int64)
    woff = np.array([model.layout.slice(f"{n}.w").start for n, _ in linears], np.int64)
    boff = np.array([model.layout.slice(f"{n}.b").start for n, _ in linears], np.int64)
    return dims, woff, boff


def _check_inputs(op, model, dims, theta, support_x, support_y, query_x, query_y, alpha,
                  steps):
    """The checks of metacore.algorithms.maml for this one model shape, without its
    per-call (T, P) scratch arrays: a few microseconds, not tens (finiteness is checked
    after, in one compiled pass). -> alpha (float), steps."""
    if isinstance(alpha, np.ndarray) and alpha.ndim > 0:
        raise ValueError(f"{op}: alpha must be a scalar (per-parameter Meta-SGD rates are "
                         f"not fused), got an array of shape {alpha.shape}")
    if isinstance(support_x, (list, tuple)) or isinstance(support_y, (list, tuple)):
        raise ValueError(f"{op}: support must be one (T, N, D) batch used at every inner "
                         f"step, not a list of batches")
    steps = _check_steps(op, steps)
    check_float_array(op, "theta", theta, shape=(model.num_params,), finite=False)
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
    return _check_alpha(op, alpha, model.num_params, dt), steps


_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def _plainly_valid(model, dims, theta, sx, sy, qx, qy, alpha, steps):
    """True when every argument is obviously right (the common case, in about a
    microsecond); anything else goes through _check_inputs, which names the problem."""
    arrays = (theta, sx, sy, qx, qy)
    if not all(type(a) is np.ndarray for a in arrays) or theta.dtype not in _FLOATS:
        return False
    dt = theta.dtype
    if not all(a.dtype == dt for a in arrays) or theta.shape != (model.num_params,):
        return False
    if sx.ndim != 3 or qx.ndim != 3 or 0 in sx.shape or 0 in qx.shape:
        return False
    T, N, D = sx.shape
    O = int(dims[-1])
    return (D == dims[0] and sy.shape == (T, N, O) and qx.shape[0] == T and qx.shape[2] == D
            and qy.shape == (T, qx.shape[1], O) and type(steps) is int and steps >= 1
            and type(alpha) in (float, int) and 0 <= alpha < float("inf"))


def _run(op, model, theta, support_x, support_y, query_x, query_y, alpha, steps, mode):
    dims, woff, boff = mlp_structure(model)
    if not _plainly_valid(model, dims, theta, support_x, support_y, query_x, query_y, alpha,
                          steps):
        alpha, steps = _check_inputs(op, model, dims, theta, support_x, support_y, query_x,
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


def mlp_maml_gradient(model, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                      first_order=False):
    """Second-order (or, with first_order=True, first-order) MAML meta-gradient, fused
    (module docstring).

    model: Linear-ReLU-...-Linear metacore Model with loss 'mse'; theta: (P,) float32 or
    float64; support_x (T, N, D), support_y (T, N, O): the batch of every inner step;
    query_x (T, M, D), query_y (T, M, O); alpha: a scalar >= 0; steps: int >= 1.
    -> query_loss (T,), grad (P,) in theta's dtype (fresh arrays). A non-finite loss or
    gradient raises FloatingPointError naming the likely cause (or warns, under
    metacore.set_nonfinite_policy('warn'); kernels/_nonfinite.py).
    """
    mode = 1 if first_order else 0             # mlp_maml_numba.FIRST_ORDER / SECOND_ORDER
    return _run("mlp_maml_gradient", model, theta, support_x, support_y, query_x, query_y,
                alpha, steps, mode)


def mlp_reptile_direction(model, theta, support_x, support_y, alpha, steps=1):
    """Reptile's direction d = mean_t (theta - theta_k^t), fused (module docstring). Same
    arguments as mlp_maml_gradient without the query. -> loss_0 (T,) (the pre-update
    support losses), d (P,) in theta's dtype (fresh arrays)."""
    # the query arguments are only shape-checked (the support stands in), never read
    return _run("mlp_reptile_direction", model, theta, support_x, support_y, support_x,
                support_y, alpha, steps, 2)    # mlp_maml_numba.REPTILE
