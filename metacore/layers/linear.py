"""Linear layer, batched over tasks whose weights differ: y = x w + b.

Shapes (one letter per axis, used on every array line below):
  T tasks, N points per task, D input features, H output features.

R-operator (Pearlmutter 1994): R{f} = d/dr f(theta + r v) at r = 0. Quantities carrying it
are named r + name (rx = R{x}, rw = v's block for w, ...). The layer is bilinear in (x, w),
so every R-formula is the product rule applied once.
"""
import numpy as np

from metacore.validate import check_float_array, check_same


def linear_forward(x, w, b):
    """x: (T, N, D), w: (T, D, H), b: (T, H) -> y: (T, N, H); cache = (x, w)."""
    check_float_array("linear", "x", x, ndim=3, finite=False)
    T, N, D = x.shape
    check_float_array("linear", "w", w, ndim=3, shape=(T, D, None), dtype=x.dtype, finite=False)
    check_float_array("linear", "b", b, shape=(T, w.shape[2]), dtype=x.dtype, finite=False)
    y = np.matmul(x, w)                       # (T, N, H)
    y += b[:, None, :]
    return y, (x, w)


def linear_backward(dy, cache, need_dx=True):
    """dy: (T, N, H) -> dx (T, N, D) or None, dw (T, D, H), db (T, H).

    dx = dy w^T,  dw = x^T dy,  db = sum_n dy.
    need_dx=False skips dx (a network's first layer, whose input is data)."""
    x, w = cache
    check_float_array("linear backward", "dy", dy, shape=x.shape[:2] + w.shape[2:],
                      dtype=x.dtype, finite=False)
    dx = np.matmul(dy, w.transpose(0, 2, 1)) if need_dx else None   # (T, N, D)
    dw = np.matmul(x.transpose(0, 2, 1), dy)                        # (T, D, H)
    db = dy.sum(axis=1)                                             # (T, H)
    return dx, dw, db


def linear_rforward(rx, rw, rb, cache):
    """R{y} = R{x} w + x R{w} + R{b}.  rx: (T, N, D) or None (input is data: R{x} = 0),
    rw: (T, D, H), rb: (T, H) -> ry: (T, N, H); rcache = (rx, rw)."""
    x, w = cache
    check_same("linear rforward", "rw", rw, "w", w)
    if rx is not None:
        check_same("linear rforward", "rx", rx, "x", x)
    ry = np.matmul(x, rw)                     # (T, N, H)
    if rx is not None:
        ry += np.matmul(rx, w)
    ry += rb[:, None, :]
    return ry, (rx, rw)


def linear_rbackward(dy, rdy, cache, rcache, need_dx=True):
    """R-operator of the backward pass, given dy and R{dy} (both (T, N, H)):
      R{dx} = R{dy} w^T + dy R{w}^T
      R{dw} = R{x}^T dy + x^T R{dy}
      R{db} = sum_n R{dy}
    -> rdx (T, N, D) or None, rdw (T, D, H), rdb (T, H)."""
    x, w = cache
    rx, rw = rcache
    check_same("linear rbackward", "rdy", rdy, "dy", dy)
    rdx = None
    if need_dx:
        rdx = np.matmul(rdy, w.transpose(0, 2, 1))                  # (T, N, D)
        rdx += np.matmul(dy, rw.transpose(0, 2, 1))
    rdw = np.matmul(x.transpose(0, 2, 1), rdy)                      # (T, D, H)
    if rx is not None:
        rdw += np.matmul(rx.transpose(0, 2, 1), dy)
    rdb = rdy.sum(axis=1)                                           # (T, H)
    return rdx, rdw, rdb
