"""Finite-difference checks of hand-derived derivatives: the public API and the oracles.

Public API (float64 in, a result object out, like torch.autograd.gradcheck / JAX's
check_grads):

    check_grad(f, grad_f, x)        f(x) -> scalar, grad_f(x) -> array shaped like x
    check_hvp(f, hvp_f, x, v)       hvp_f(x, v) -> H(x) v shaped like x
    check_vjp(forward, backward, x) a forward / backward pair (one input or a tuple of them)

Each returns a CheckResult (max_rel_error, worst_index, passed, tol, eps, and the analytic
and numerical values at the worst index); `bool(result)` is `result.passed`, and
`raise_on_fail=True` raises GradcheckError (an AssertionError) with the same report.

The numerical side is central differences, (f(x + eps e_i) - f(x - eps e_i)) / 2 eps, with
eps = 1e-6 by default (EPS): the truncation error is O(eps^2 f''') ~ 1e-12 and the round-off
error O(u |f| / eps) ~ 1e-10 relative for float64 (u = 2^-53), so a correct derivation
measures around 1e-8 to 1e-10 and the default tolerance TOL = 1e-6 leaves two orders of
margin while still catching a wrong sign or factor (errors of order 1). Inputs must be
float64: in float32 the round-off term alone is ~1e-2 at this step (TypeError otherwise).
Random probes (the upstream gradient of check_vjp, the direction of check_hvp when v is None,
a coordinate subset when n_coords is given) come from numpy.random.default_rng(seed), seed=0
by default, so a check is reproducible.

Error measure, rel_error(a, b) = max|a - b| / max(1e-8, max|a| + max|b|): the largest absolute
deviation, relative to the scale of the two arrays. Normwise (not per element), so a gradient
entry that is zero up to rounding does not turn rounding noise into a huge "relative" error.
worst_index is where |a - b| is largest. Functions with kinks (ReLU, max) must be checked at
points at least eps away from them.
"""
import dataclasses

import numpy as np

EPS = 1e-6        # central-difference step of check_grad / check_vjp / check_hvp (via grad_f)
EPS_SECOND = 1e-4  # step of check_hvp's second differences of f when no grad_f is given
TOL = 1e-6        # default max rel_error for gradients and VJPs
TOL_SECOND = 1e-5  # default for check_hvp from second differences of f (error ~ eps^2, u/eps^2)


class GradcheckError(AssertionError):
    """A check_* call with raise_on_fail=True whose derivative disagrees with finite
    differences; str() is the result's report."""

    def __init__(self, result):
        super().__init__(result.report())
        self.result = result


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """What a check_* call measured.

    quantity       'gradient', 'hvp' or 'vjp'
    max_rel_error  rel_error(analytic, numerical) over the checked coordinates
    worst_index    where |analytic - numerical| is largest: an index tuple into x (check_vjp
                   with several inputs: (input position,) + index tuple)
    passed         max_rel_error <= tol (and, for check_hvp with a random u, the symmetry
                   u.(Hv) = v.(Hu) within tol)
    tol, eps       the tolerance and central-difference step used
    analytic, numerical  the two values at worst_index
    n_checked      number of coordinates compared
    symmetry_error check_hvp only: |u.Hv - v.Hu| / max(|u.Hv|, |v.Hu|) for a seeded u
    """
    quantity: str
    max_rel_error: float
    worst_index: tuple
    passed: bool
    tol: float
    eps: float
    analytic: float
    numerical: float
    n_checked: int
    seed: int
    symmetry_error: float = None

    def __bool__(self):
        return self.passed

    def report(self):
        head = (f"{self.quantity} check {'PASSED' if self.passed else 'FAILED'}: max relative "
                f"error {self.max_rel_error:.3e} (tolerance {self.tol:.0e}, central "
                f"differences with step {self.eps:.0e}, {self.n_checked} coordinates)")
        worst = (f"; worst at index {self.worst_index}: analytic {self.analytic:.10g}, "
                 f"numerical {self.numerical:.10g}")
        sym = ("" if self.symmetry_error is None
               else f"; symmetry |u.Hv - v.Hu| / max = {self.symmetry_error:.3e}")
        return head + worst + sym

    __str__ = report


# --------------------------------------------------------------------------- public API
def _float64_input(op, name, x):
    if isinstance(x, (float, int)) and not isinstance(x, bool):
        raise TypeError(f"{op}: {name} must be a float64 numpy array, got a Python "
                        f"{type(x).__name__}; pass np.array([{x!r}])")
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: {name} must be a float64 numpy.ndarray, got "
                        f"{type(x).__name__}")
    if x.dtype != np.float64:
        raise TypeError(f"{op}: {name} must be float64, got dtype {x.dtype} (central "
                        f"differences in lower precision are dominated by round-off); pass "
                        f"{name}.astype(np.float64)")
    if x.size == 0:
        raise ValueError(f"{op}: {name} is empty, shape {x.shape}; nothing to check")
    if not np.isfinite(x).all():
        raise ValueError(f"{op}: {name} contains NaN or Inf")
    return np.array(x, dtype=np.float64, order="C", copy=True)


def _scalar(op, value):
    a = np.asarray(value, dtype=np.float64)
    if a.size != 1:
        raise ValueError(f"{op}: f must return a scalar, got an array of shape {a.shape}")
    a = float(a.reshape(()))
    if not np.isfinite(a):
        raise FloatingPointError(f"{op}: f returned {a} during finite differences")
    return a


def _like(op, what, value, shape):
    a = np.asarray(value, dtype=np.float64)
    if a.shape != tuple(shape):
        raise ValueError(f"{op}: {what} must have shape {tuple(shape)}, got {a.shape}")
    if not np.isfinite(a).all():
        raise FloatingPointError(f"{op}: {what} contains NaN or Inf")
    return a


def _coords(op, size, n_coords, rng):
    if n_coords is None or n_coords >= size:
        return np.arange(size)
    if int(n_coords) < 1:
        raise ValueError(f"{op}: n_coords must be >= 1 or None, got {n_coords}")
    return np.sort(rng.choice(size, int(n_coords), replace=False))


def _result(quantity, analytic, numerical, index_of, tol, eps, n, seed, raise_on_fail,
            symmetry_error=None):
    """analytic, numerical: flat float64 arrays; index_of(j) -> the index tuple of entry j."""
    err = rel_error(analytic, numerical)
    j = int(np.argmax(np.abs(analytic - numerical)))
    passed = bool(err <= tol) and (symmetry_error is None or bool(symmetry_error <= tol))
    res = CheckResult(quantity, err, tuple(int(k) for k in index_of(j)), passed, float(tol), float(eps),
                      float(analytic[j]), float(numerical[j]), int(n), int(seed),
                      symmetry_error)
    if raise_on_fail and not passed:
        raise GradcheckError(res)
    return res


def check_grad(f, grad_f, x, *, eps=EPS, tol=TOL, n_coords=None, seed=0,
               raise_on_fail=False):
    """Check grad_f(x) against central differences of the scalar f at x.

    f(x) -> scalar; grad_f(x) -> array shaped like x. x: float64 array (not modified: f and
    grad_f get copies). eps: central-difference step (module docstring). n_coords: check
    that many coordinates, chosen by default_rng(seed) (default None: every coordinate,
    2 * x.size evaluations of f). -> CheckResult; raise_on_fail=True raises GradcheckError
    when it does not pass.
    """
    op = "check_grad"
    x = _float64_input(op, "x", x)
    rng = np.random.default_rng(seed)
    analytic = _like(op, "grad_f(x)", grad_f(x.copy()), x.shape).reshape(-1)
    coords = _coords(op, x.size, n_coords, rng)
    work = x.copy()
    numerical = numerical_gradient_at(lambda: _scalar(op, f(work)), work, coords, eps)
    return _result("gradient", analytic[coords], numerical,
                   lambda j: np.unravel_index(coords[j], x.shape), tol, eps, len(coords),
                   seed, raise_on_fail)


def check_hvp(f, hvp_f, x, v=None, *, grad_f=None, eps=None, tol=None, seed=0,
              symmetry=True, raise_on_fail=False):
    """Check a Hessian-vector product hvp_f(x, v) = H(x) v of the scalar f.

    Numerical side: with grad_f (the gradient, itself checked by check_grad), central
    differences of it along v, (grad_f(x + eps v) - grad_f(x - eps v)) / 2 eps, eps = EPS,
    tol = TOL by default; without it, second differences of f alone, for every coordinate i
    (f(x + h e_i + h v) - f(x + h e_i - h v) - f(x - h e_i + h v) + f(x - h e_i - h v))
    / 4 h^2, h = EPS_SECOND, tol = TOL_SECOND by default (4 * x.size evaluations of f).
    v: direction shaped like x (default: a random unit vector from default_rng(seed)).
    symmetry: also compare u.(H v) with v.(H u) for a random u (an exact Hessian is
    symmetric), included in `passed`. -> CheckResult.
    """
    op = "check_hvp"
    x = _float64_input(op, "x", x)
    rng = np.random.default_rng(seed)
    if v is None:
        v = rng.standard_normal(x.shape)
        v /= np.linalg.norm(v)
    else:
        v = _float64_input(op, "v", v)
        if v.shape != x.shape:
            raise ValueError(f"{op}: v must have the shape of x, {x.shape}, got {v.shape}")
    analytic = _like(op, "hvp_f(x, v)", hvp_f(x.copy(), v.copy()), x.shape).reshape(-1)
    if grad_f is not None:
        eps = EPS if eps is None else eps
        tol = TOL if tol is None else tol
        gp = _like(op, "grad_f(x + eps v)", grad_f(x + eps * v), x.shape)
        gm = _like(op, "grad_f(x - eps v)", grad_f(x - eps * v), x.shape)
        numerical = ((gp - gm) / (2.0 * eps)).reshape(-1)
    else:
        eps = EPS_SECOND if eps is None else eps
        tol = TOL_SECOND if tol is None else tol
        numerical = np.empty(x.size)
        for i in range(x.size):
            vals = []
            for si, sv in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
                xx = x + (sv * eps) * v
                xx.reshape(-1)[i] += si * eps
                vals.append(_scalar(op, f(xx)))
            numerical[i] = (vals[0] - vals[1] - vals[2] + vals[3]) / (4.0 * eps * eps)
    sym = None
    if symmetry:
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u)
        hu = _like(op, "hvp_f(x, u)", hvp_f(x.copy(), u.copy()), x.shape).reshape(-1)
        a, b = float(u.reshape(-1) @ analytic), float(v.reshape(-1) @ hu)
        sym = abs(a - b) / max(abs(a), abs(b), 1e-300)
    return _result("hvp", analytic, numerical, lambda j: np.unravel_index(j, x.shape), tol,
                   eps, x.size, seed, raise_on_fail, sym)


def check_vjp(forward, backward, x, *, eps=EPS, tol=TOL, n_coords=None, seed=0,
              raise_on_fail=False):
    """Check a forward / backward pair: backward(dy, ...) must be the vector-Jacobian
    product dy^T J of forward, for a random upstream gradient dy (default_rng(seed)).

    x: one float64 array, or a tuple of them (forward's positional inputs, e.g. (x, w, b)).
    forward(*x) returns y, or (y, cache) in metacore's convention; backward is then called
    as backward(dy, cache), or as backward(dy, *x) when forward returns y alone, and returns
    one gradient per input (a single array for a single input). The check is check_grad on
    the probe L(x) = sum(dy * forward(x)), every input at once (n_coords per input when
    given). -> CheckResult; worst_index is (input position,) + index when x is a tuple.
    """
    op = "check_vjp"
    several = isinstance(x, (tuple, list))
    xs = [_float64_input(op, f"x[{i}]" if several else "x", a)
          for i, a in enumerate(x if several else (x,))]
    rng = np.random.default_rng(seed)

    def run(inputs):
        out = forward(*inputs)
        if isinstance(out, tuple):
            if len(out) != 2:
                raise ValueError(f"{op}: forward must return y or (y, cache), got a tuple of "
                                 f"{len(out)}")
            return out[0], out[1], True
        return out, None, False

    y, cache, has_cache = run([a.copy() for a in xs])
    y = np.asarray(y)
    dy = rng.standard_normal(y.shape)
    grads = backward(dy.astype(y.dtype) if y.dtype.kind == "f" else dy,
                     *((cache,) if has_cache else [a.copy() for a in xs]))
    grads = grads if isinstance(grads, (tuple, list)) else (grads,)
    if len(grads) != len(xs):
        raise ValueError(f"{op}: backward returned {len(grads)} gradient(s) for {len(xs)} "
                         f"input(s)")
    work = [a.copy() for a in xs]
    probe = lambda: _scalar(op, np.sum(dy * np.asarray(run(work)[0], np.float64)))
    analytic, numerical, index = [], [], []
    for i, (a, g) in enumerate(zip(work, grads)):
        g = _like(op, f"backward's gradient {i}", g, a.shape).reshape(-1)
        coords = _coords(op, a.size, n_coords, rng)
        analytic.append(g[coords])
        numerical.append(numerical_gradient_at(probe, a, coords, eps))
        index += [(i,) + tuple(np.unravel_index(c, a.shape)) if several
                  else tuple(np.unravel_index(c, a.shape)) for c in coords]
    return _result("vjp", np.concatenate(analytic), np.concatenate(numerical),
                   lambda j: tuple(int(k) for k in index[j]), tol, eps, len(index), seed,
                   raise_on_fail)


# --------------------------------------------------------------- oracles (used by tests)
def rel_error(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_error: shapes differ, {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    scale = max(1e-8, float(np.abs(a).max()) + float(np.abs(b).max()))
    return float(np.abs(a - b).max()) / scale


def numerical_gradient_at(f, x, indices, h=1e-6):
    """Central differences of the scalar f() with respect to the entries `indices` of the
    flattened x (modified in place and restored). Returns a float64 array, one per index."""
    flat = x.reshape(-1)
    if not np.shares_memory(flat, x):
        raise ValueError("numerical_gradient_at: x must be contiguous (perturbed in place)")
    out = np.empty(len(indices))
    for j, i in enumerate(indices):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        out[j] = (fp - fm) / (2.0 * h)
    return out


def numerical_gradient(f, x, h=1e-6):
    """Central differences of the scalar f() with respect to every entry of x (modified in
    place and restored). Returns an array shaped like x."""
    return numerical_gradient_at(f, x, range(x.size), h).reshape(x.shape)


def numerical_directional(f, x, v, h=1e-6):
    """(f(x + h v) - f(x - h v)) / 2h for any f returning a scalar or an array (x restored)."""
    old = x.copy()
    x += h * v
    fp = np.array(f(), dtype=np.float64, copy=True)
    x[...] = old - h * v
    fm = np.array(f(), dtype=np.float64, copy=True)
    x[...] = old
    return (fp - fm) / (2.0 * h)
