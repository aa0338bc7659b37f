"""ReLU, y = max(x, 0), elementwise on any shape (T, ...).

Its second derivative is zero almost everywhere, so the R-operator only gates R{x} and R{dy}
by the same mask as the forward and backward pass. At x = 0 exactly the derivative is taken
as 0 (the mask is x > 0).

float32/float64 arrays run on the one-pass Numba kernels of metacore.kernels.convnet_numba
when numba is available (the same products, so bit-identical results); the NumPy lines
below are the fallback."""
import numpy as np

from metacore.kernels.convnet import kernels_for


def _gate(d, mask):
    """d * mask, on the kernel when it can take d (mask: bool, d's shape)."""
    k = kernels_for(d) if (isinstance(d, np.ndarray) and isinstance(mask, np.ndarray)
                           and d.shape == mask.shape and mask.dtype == np.bool_) else None
    if k is None:
        return d * mask
    out = np.empty(d.shape, d.dtype)
    k.relu_gate(np.ascontiguousarray(d).reshape(-1), np.ascontiguousarray(mask).reshape(-1),
                out.reshape(-1))
    return out


def relu_forward(x):
    """x: (T, ...) -> y: (T, ...); cache = mask (x > 0), a bool array like x."""
    k = kernels_for(x) if isinstance(x, np.ndarray) else None
    if k is not None:
        y, mask = np.empty(x.shape, x.dtype), np.empty(x.shape, np.bool_)
        k.relu_forward(np.ascontiguousarray(x).reshape(-1), y.reshape(-1), mask.reshape(-1))
        return y, mask
    mask = x > 0
    return x * mask, mask


def relu_backward(dy, mask):
    """dx = dy * [x > 0]."""
    return _gate(dy, mask)


def relu_rforward(rx, mask):
    """R{y} = R{x} * [x > 0]; rcache is None (nothing new is needed by rbackward)."""
    return _gate(rx, mask), None


def relu_rbackward(dy, rdy, mask, rcache=None):
    """R{dx} = R{dy} * [x > 0]   (the term dy * R{[x > 0]} is 0 almost everywhere)."""
    return _gate(rdy, mask)
