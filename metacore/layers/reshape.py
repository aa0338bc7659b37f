"""Shape-only and averaging layers: Flatten and global mean pooling. Both are linear in x,
so each R-operator pass is the same map applied to the R-quantity.

Shapes: T tasks, B images, H x W spatial, C channels.
"""
import numpy as np


def flatten_forward(x):
    """x: (T, B, H, W, C) -> y: (T, B, H*W*C) (row-major, channels fastest); cache = x.shape."""
    return x.reshape(x.shape[0], x.shape[1], -1), x.shape


def flatten_backward(dy, xshape):
    return dy.reshape(xshape)


def flatten_rforward(rx, xshape):
    return rx.reshape(rx.shape[0], rx.shape[1], -1), None


def flatten_rbackward(dy, rdy, xshape, rcache=None):
    return rdy.reshape(xshape)


def meanpool_forward(x):
    """Global spatial mean. x: (T, B, H, W, C) -> y: (T, B, C); cache = x.shape."""
    return x.mean(axis=(2, 3)), x.shape


def meanpool_backward(dy, xshape):
    """dx[t,b,i,j,c] = dy[t,b,c] / (H W)."""
    T, B, H, W, C = xshape
    return np.broadcast_to(dy[:, :, None, None, :] * (1.0 / (H * W)), xshape).copy()


def meanpool_rforward(rx, xshape):
    return rx.mean(axis=(2, 3)), None


def meanpool_rbackward(dy, rdy, xshape, rcache=None):
    return meanpool_backward(rdy, xshape)
