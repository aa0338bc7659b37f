"""2x2 max pooling with stride 2, channels last, floor mode (a trailing odd row or column is
dropped, so 7 -> 3 as in the ProtoNet Conv-4: 28 -> 14 -> 7 -> 3 -> 1).

Shapes: T tasks, B images, H x W input, C channels, Ho = H // 2, Wo = W // 2.
  x: (T, B, H, W, C) -> y: (T, B, Ho, Wo, C)

Piecewise linear: y picks one input per window (the first maximum in row-major window order
on ties), so backward and both R-operator passes route through that same argmax; the second
derivative is zero almost everywhere.

With numba available, float32/float64 run on one-pass kernels (metacore.kernels.convnet_numba:
argmax and maximum together, a scatter that writes every dx entry once, a gather); the argmax
is then stored as int8. Results are identical to the NumPy code below, the fallback.
"""
import numpy as np

from metacore.kernels.convnet import kernels_for
from metacore.validate import check_float_array


def _images(a):
    """(T, B, H, W, C) -> a C-contiguous (T*B, H, W, C) view (a copy if a is not contiguous)."""
    return np.ascontiguousarray(a).reshape((-1,) + a.shape[2:])


def _check_like(op, name, a, shape):
    if not isinstance(a, np.ndarray) or a.shape != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got "
                         f"{getattr(a, 'shape', type(a).__name__)}")


def _windows(x):
    """x: (T, B, H, W, C) -> (T, B, Ho, Wo, C, 4), a fresh array of each window's 4 entries."""
    T, B, H, W, C = x.shape
    Ho, Wo = H // 2, W // 2
    v = x[:, :, :2 * Ho, :2 * Wo, :].reshape(T, B, Ho, 2, Wo, 2, C)
    return v.transpose(0, 1, 2, 4, 6, 3, 5).reshape(T, B, Ho, Wo, C, 4)


def _scatter(dy, argmax, xshape):
    """Adjoint of the selection: put dy (T, B, Ho, Wo, C) at the argmax of each window."""
    T, B, H, W, C = xshape
    Ho, Wo = H // 2, W // 2
    onehot = argmax[..., None] == np.arange(4)                     # (T, B, Ho, Wo, C, 4)
    win = onehot * dy[..., None]
    win = win.reshape(T, B, Ho, Wo, C, 2, 2).transpose(0, 1, 2, 5, 3, 6, 4)  # (T,B,Ho,2,Wo,2,C)
    dx = np.zeros(xshape, dtype=dy.dtype)
    dx[:, :, :2 * Ho, :2 * Wo, :] = win.reshape(T, B, 2 * Ho, 2 * Wo, C)
    return dx


def _gather(a, argmax):
    return np.take_along_axis(_windows(a), argmax[..., None], axis=-1)[..., 0]


def maxpool_forward(x):
    """x: (T, B, H, W, C) -> y: (T, B, Ho, Wo, C); cache = (argmax (T,B,Ho,Wo,C) int, x.shape)."""
    check_float_array("maxpool2d", "x", x, ndim=5, finite=False)
    T, B, H, W, C = x.shape
    if H < 2 or W < 2:
        raise ValueError(f"maxpool2d: needs H, W >= 2, got input shape {x.shape}")
    k = kernels_for(x)
    if k is not None:
        Ho, Wo = H // 2, W // 2
        y = np.empty((T, B, Ho, Wo, C), x.dtype)
        argmax = np.empty((T, B, Ho, Wo, C), np.int8)
        k.maxpool_forward(_images(x), _images(y), _images(argmax))
        return y, (argmax, x.shape)
    win = _windows(x)
    argmax = win.argmax(axis=-1)                                   # first maximum on ties
    y = np.take_along_axis(win, argmax[..., None], axis=-1)[..., 0]
    return y, (argmax, x.shape)


def maxpool_backward(dy, cache):
    """dx: dy routed to each window's argmax, zero elsewhere."""
    argmax, xshape = cache
    _check_like("maxpool2d backward", "dy", dy, argmax.shape)
    k = kernels_for(dy)
    if k is not None:
        dx = np.empty(xshape, dy.dtype)
        k.maxpool_scatter(_images(dy), _images(argmax), _images(dx))
        return dx
    return _scatter(dy, argmax, xshape)


def maxpool_rforward(rx, cache):
    """R{y} = R{x} at the argmax; rcache is None."""
    argmax, xshape = cache
    _check_like("maxpool2d rforward", "rx", rx, xshape)
    k = kernels_for(rx)
    if k is not None:
        ry = np.empty(argmax.shape, rx.dtype)
        k.maxpool_gather(_images(rx), _images(argmax), _images(ry))
        return ry, None
    return _gather(rx, argmax), None


def maxpool_rbackward(dy, rdy, cache, rcache=None):
    """R{dx} = R{dy} routed to the argmax (the routing itself is locally constant)."""
    return maxpool_backward(rdy, cache)
