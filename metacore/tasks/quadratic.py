"""Random quadratic optimizees of Andrychowicz et al. 2016, Section 3.1:

    f(theta) = ||W theta - y||^2,   W: (d, d), y: (d,), entries i.i.d. N(0, 1), d = 10

and the starting point theta_0 ~ N(0, 0.01^2) per coordinate (the stddev of the authors'
`problems.quadratic` in deepmind/learning-to-learn). Every function is one optimizee with its
own loss; M of them are held in a batch.

    grad f(theta) = 2 W^T (W theta - y)

Shape letters: M optimizees in a batch, d dimensions of theta.
"""
import numbers
from dataclasses import dataclass

import numpy as np

from metacore.validate import FLOAT_DTYPES, check_float_array

THETA0_STD = 0.01


@dataclass
class Quadratics:
    """M quadratics: W (M, d, d), y (M, d), of one float dtype."""
    W: np.ndarray
    y: np.ndarray

    @property
    def dims(self):
        return self.y.shape[1]

    def loss(self, theta):
        """theta: (M, d) -> f (M,)."""
        return quadratic_loss_grad(theta, self.W, self.y, need_grad=False)[0]

    def loss_grad(self, theta):
        """theta: (M, d) -> f (M,), grad f (M, d)."""
        return quadratic_loss_grad(theta, self.W, self.y)


def _check_count(op, name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")


def sample_quadratics(rng, n, dims=10, dtype=np.float64):
    """Draw n quadratics and their starting points from rng (a numpy Generator).

    Draw order (part of the contract, for exact resume): W (n, d, d), y (n, d), theta_0 (n, d).
    -> (Quadratics, theta_0 (n, d)), all of `dtype` (drawn in float64, then cast)."""
    op = "sample_quadratics"
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    _check_count(op, "n", n)
    _check_count(op, "dims", dims)
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype}")
    W = rng.standard_normal((n, dims, dims)).astype(dtype)              # (M, d, d)
    y = rng.standard_normal((n, dims)).astype(dtype)                    # (M, d)
    theta0 = (THETA0_STD * rng.standard_normal((n, dims))).astype(dtype)  # (M, d)
    return Quadratics(W, y), theta0


def quadratic_loss_grad(theta, W, y, need_grad=True):
    """f = ||W theta - y||^2 per optimizee and its gradient 2 W^T r, r = W theta - y.
    theta: (M, d), W: (M, d, d), y: (M, d) -> f (M,), grad (M, d) (None if not need_grad)."""
    op = "quadratic_loss_grad"
    check_float_array(op, "theta", theta, ndim=2, finite=False)
    M, d = theta.shape
    check_float_array(op, "W", W, shape=(M, d, d), dtype=theta.dtype)
    check_float_array(op, "y", y, shape=(M, d), dtype=theta.dtype)
    r = np.einsum("mij,mj->mi", W, theta) - y                           # (M, d)
    f = np.einsum("mi,mi->m", r, r)                                     # (M,)
    if not need_grad:
        return f, None
    return f, 2.0 * np.einsum("mij,mi->mj", W, r)                       # (M, d)
