"""Finite-difference oracles (float64, central differences) and the error measure.

rel_error(a, b) = max|a - b| / max(1e-8, max|a| + max|b|): the largest absolute deviation,
relative to the scale of the two arrays. Normwise (not per element), so a gradient entry that
is zero up to rounding does not turn rounding noise into a huge "relative" error.
"""
import numpy as np


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
