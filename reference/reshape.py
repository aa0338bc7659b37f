"""Flatten and global mean pooling for one task: plain float64 NumPy ground truth. Both maps
are linear in x, so each R-pass is the same map applied to the R-quantity:
    R{y} = forward(rx),  R{dx} = backward(rdy).

Shape letters (this module):
    B images, H x W spatial size, C channels, D = H W C features.

Flatten (row-major, channels fastest):
    y[n, (i W + j) C + c] = x[n, i, j, c]              dx[n, i, j, c] = dy[n, (i W + j) C + c]
Global mean pool:
    y[n, c] = (1 / (H W)) sum_{i, j} x[n, i, j, c]     dx[n, i, j, c] = dy[n, c] / (H W)
Every function returns fresh float64 arrays.
"""
import numpy as np


def flatten_forward(x):
    """x: (B, H, W, C) -> y: (B, D)."""
    x = np.asarray(x, np.float64)
    B, H, W, C = x.shape
    y = np.zeros((B, H * W * C))                               # (B, D)
    for i in range(H):
        for j in range(W):
            for c in range(C):
                y[:, (i * W + j) * C + c] = x[:, i, j, c]
    return y


def flatten_backward(dy, xshape):
    """dy: (B, D), xshape = (B, H, W, C) -> dx: (B, H, W, C)."""
    dy = np.asarray(dy, np.float64)
    B, H, W, C = xshape
    dx = np.zeros((B, H, W, C))                                # (B, H, W, C)
    for i in range(H):
        for j in range(W):
            for c in range(C):
                dx[:, i, j, c] = dy[:, (i * W + j) * C + c]
    return dx


def flatten_rforward(rx):
    return flatten_forward(rx)


def flatten_rbackward(dy, rdy, xshape):
    return flatten_backward(rdy, xshape)


def meanpool_forward(x):
    """x: (B, H, W, C) -> y: (B, C)."""
    x = np.asarray(x, np.float64)
    B, H, W, C = x.shape
    y = np.zeros((B, C))                                       # (B, C)
    for i in range(H):
        for j in range(W):
            y += x[:, i, j, :]
    return y / (H * W)


def meanpool_backward(dy, xshape):
    """dy: (B, C), xshape = (B, H, W, C) -> dx: (B, H, W, C)."""
    dy = np.asarray(dy, np.float64)
    B, H, W, C = xshape
    dx = np.zeros((B, H, W, C))                                # (B, H, W, C)
    for i in range(H):
        for j in range(W):
            dx[:, i, j, :] = dy / (H * W)
    return dx


def meanpool_rforward(rx):
    return meanpool_forward(rx)


def meanpool_rbackward(dy, rdy, xshape):
    return meanpool_backward(rdy, xshape)
