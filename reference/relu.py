"""ReLU y = max(x, 0), elementwise, for one task: plain float64 NumPy ground truth.

Shape letters (this module): S any shape (the op is elementwise).

With the derivative at x = 0 taken as 0 (the gate is [x > 0]):
    dx = dy [x > 0]
ReLU is piecewise linear, so its second derivative vanishes away from x = 0 and the R-passes
are the same gate applied to the R-quantities (derived from R{dx} = R{dy} [x > 0] + dy R{[x > 0]},
the last term being 0 almost everywhere):
    R{y} = rx [x > 0]          R{dx} = rdy [x > 0]
Every function returns fresh float64 arrays.
"""
import numpy as np


def _gate(x):
    """x: S -> [x > 0] as float64 ones and zeros, S."""
    return (np.asarray(x, np.float64) > 0).astype(np.float64)


def relu_forward(x):
    """x: S -> y: S, y = max(x, 0)."""
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x, 0.0)


def relu_backward(dy, x):
    """dy: S, x: S (the forward input) -> dx: S."""
    return np.asarray(dy, np.float64) * _gate(x)


def relu_rforward(x, rx):
    """rx: S -> R{y}: S."""
    return np.asarray(rx, np.float64) * _gate(x)


def relu_rbackward(dy, rdy, x):
    """rdy: S -> R{dx}: S (dy does not enter: the gate is locally constant)."""
    return np.asarray(rdy, np.float64) * _gate(x)
