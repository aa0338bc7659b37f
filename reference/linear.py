"""Linear layer y = x w + b for one task: plain float64 NumPy ground truth.

Shape letters (this module):
    N points, D input features, H output features.

    y[n, h] = b[h] + sum_d x[n, d] w[d, h]

Backward, with dy = dL/dy:
    dx[n, d] = sum_h dy[n, h] w[d, h]      dw[d, h] = sum_n x[n, d] dy[n, h]
    db[h] = sum_n dy[n, h]

R-operator (Pearlmutter 1994, R{f} = d/dr f(x + r rx, w + r rw, b + r rb) at r = 0). The map is
bilinear in (x, w), so both R-passes are the product rule written with the maps above:
    R{y}            = forward(rx, w, 0) + forward(x, rw, rb)
    R{(dx, dw, db)} = backward(rdy; x, w) + (dx, dw) of backward(dy; rx, rw)
No caches: every function takes what it needs and recomputes the rest. Every function returns
fresh float64 arrays.
"""
import numpy as np


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def linear_forward(x, w, b):
    """x: (N, D), w: (D, H), b: (H,) -> y: (N, H)."""
    x, w, b = _f64(x, w, b)
    return np.einsum("nd,dh->nh", x, w) + b[None, :]           # (N, H)


def linear_backward(dy, x, w):
    """dy: (N, H) -> dx (N, D), dw (D, H), db (H,)."""
    dy, x, w = _f64(dy, x, w)
    dx = np.einsum("nh,dh->nd", dy, w)                          # (N, D)
    dw = np.einsum("nd,nh->dh", x, dy)                          # (D, H)
    db = dy.sum(axis=0)                                         # (H,)
    return dx, dw, db


def linear_rforward(x, w, rx, rw, rb):
    """R{y} = rx w + x rw + rb.  rx: (N, D) (zeros for a data input), rw: (D, H), rb: (H,)
    -> ry: (N, H)."""
    zero_b = np.zeros(np.shape(w)[1])
    return linear_forward(rx, w, zero_b) + linear_forward(x, rw, rb)


def linear_rbackward(dy, rdy, x, w, rx, rw):
    """R-operator of linear_backward along (rx, rw, rb) with R{dy} = rdy. (rb does not enter:
    the backward map does not depend on b.)
      R{dx} = rdy w^T + dy rw^T,   R{dw} = x^T rdy + rx^T dy,   R{db} = sum_n rdy
    -> rdx (N, D), rdw (D, H), rdb (H,)."""
    rdx, rdw, rdb = linear_backward(rdy, x, w)                  # terms in R{dy}
    dx_rw, dw_rx, _ = linear_backward(dy, rx, rw)               # terms in R{w} and R{x}
    return rdx + dx_rw, rdw + dw_rx, rdb
