"""2x2 max pooling, stride 2, floor mode, for one task, channels last: plain float64 NumPy
ground truth written as loops over the windows.

Shape letters (this module):
    B images, H x W input size, C channels, Ho = floor(H / 2), Wo = floor(W / 2).

    x: (B, H, W, C) -> y: (B, Ho, Wo, C)
    y[n, i, j, c] = max over the window {(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1)}
A trailing odd row or column belongs to no window. On ties the first maximum in that
(row-major) window order wins.

With (a, b) the winning position of the window of (n, i, j, c):
    dx[n, a, b, c] = dy[n, i, j, c], zero at every position that wins no window.
The selection is locally constant (piecewise linear map), so the R-passes route the same way:
    R{y}[n, i, j, c] = rx[n, a, b, c]          R{dx} = backward(rdy)
Every function returns fresh float64 arrays.
"""
import numpy as np


def _winners(x):
    """x: (B, H, W, C) -> {(n, i, j, c): (a, b)} winning input position of every window."""
    B, H, W, C = x.shape
    win = {}
    for n in range(B):
        for i in range(H // 2):
            for j in range(W // 2):
                for c in range(C):
                    best = None
                    for a, b in ((2 * i, 2 * j), (2 * i, 2 * j + 1),
                                 (2 * i + 1, 2 * j), (2 * i + 1, 2 * j + 1)):
                        if best is None or x[n, a, b, c] > x[n, best[0], best[1], c]:
                            best = (a, b)                       # strict >: first max wins
                    win[(n, i, j, c)] = best
    return win


def _check(x):
    x = np.asarray(x, np.float64)
    if x.ndim != 4 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"reference maxpool: needs (B, H>=2, W>=2, C), got {x.shape}")
    return x


def maxpool_forward(x):
    """x: (B, H, W, C) -> y: (B, Ho, Wo, C)."""
    x = _check(x)
    B, H, W, C = x.shape
    y = np.zeros((B, H // 2, W // 2, C))                       # (B, Ho, Wo, C)
    for (n, i, j, c), (a, b) in _winners(x).items():
        y[n, i, j, c] = x[n, a, b, c]
    return y


def maxpool_backward(dy, x):
    """dy: (B, Ho, Wo, C), x: the forward input -> dx: (B, H, W, C)."""
    x = _check(x)
    dy = np.asarray(dy, np.float64)
    dx = np.zeros_like(x)                                      # (B, H, W, C)
    for (n, i, j, c), (a, b) in _winners(x).items():
        dx[n, a, b, c] += dy[n, i, j, c]
    return dx


def maxpool_rforward(x, rx):
    """rx: (B, H, W, C) -> R{y}: (B, Ho, Wo, C), rx read at each window's winner of x."""
    x = _check(x)
    rx = np.asarray(rx, np.float64)
    B, H, W, C = x.shape
    ry = np.zeros((B, H // 2, W // 2, C))                      # (B, Ho, Wo, C)
    for (n, i, j, c), (a, b) in _winners(x).items():
        ry[n, i, j, c] = rx[n, a, b, c]
    return ry


def maxpool_rbackward(dy, rdy, x):
    """rdy: (B, Ho, Wo, C) -> R{dx}: (B, H, W, C) (dy does not enter)."""
    return maxpool_backward(rdy, x)
