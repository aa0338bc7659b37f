"""3x3 convolution (cross-correlation) for one task, channels last: plain float64 NumPy
ground truth written as explicit loops over output pixels and the 3x3 window.

Shape letters (this module):
    B images, H x W input size, C input channels, F filters, Ho x Wo output size,
    K = 3 kernel size, Hp x Wp padded input size.

    x: (B, H, W, C)   w: (K, K, C, F)   b: (F,)   y: (B, Ho, Wo, F)

    y[n, i, j, f] = b[f] + sum_{p, q, c} xp[n, s i + p, s j + q, c] w[p, q, c, f]

with xp the zero-padded input and s the stride (1 or 2).
Padding, per spatial axis of size L:
    'valid': no padding, Lo = floor((L - K) / s) + 1 (needs L >= K).
    'same' (TensorFlow's rule): Lo = ceil(L / s); total padding P = max((Lo - 1) s + K - L, 0),
             floor(P / 2) before and P - floor(P / 2) after (the extra pixel goes after).

Backward, with dy = dL/dy (each output pixel sends its gradient back through its window):
    dxp[n, s i + p, s j + q, c] += sum_f dy[n, i, j, f] w[p, q, c, f],  dx = dxp without the pad
    dw[p, q, c, f] = sum_{n, i, j} xp[n, s i + p, s j + q, c] dy[n, i, j, f]
    db[f] = sum_{n, i, j} dy[n, i, j, f]

R-operator (Pearlmutter 1994): the map is bilinear in (x, w), so by the product rule
    R{y}            = forward(rx, w, 0) + forward(x, rw, rb)
    R{(dx, dw, db)} = backward(rdy; x, w) + (dx, dw) of backward(dy; rx, rw)
Every function returns fresh float64 arrays.
"""
import numpy as np

K = 3


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def output_size_and_padding(L, stride, padding):
    """One spatial axis of input size L -> (Lo, pad_before, pad_after), from the rules above."""
    if stride not in (1, 2):
        raise ValueError(f"reference conv2d: stride must be 1 or 2, got {stride}")
    if padding == "valid":
        if L < K:
            raise ValueError(f"reference conv2d: 'valid' needs size >= {K}, got {L}")
        return (L - K) // stride + 1, 0, 0
    if padding == "same":
        Lo = int(np.ceil(L / stride))
        total = max((Lo - 1) * stride + K - L, 0)
        return Lo, total // 2, total - total // 2
    raise ValueError(f"reference conv2d: padding must be 'same' or 'valid', got {padding!r}")


def _padded(x, stride, padding):
    """x: (B, H, W, C) -> xp: (B, Hp, Wp, C) fresh zero-padded copy, Ho, Wo, (top, left)."""
    B, H, W, C = x.shape
    Ho, top, bottom = output_size_and_padding(H, stride, padding)
    Wo, left, right = output_size_and_padding(W, stride, padding)
    xp = np.zeros((B, top + H + bottom, left + W + right, C))    # (B, Hp, Wp, C)
    xp[:, top:top + H, left:left + W, :] = x
    return xp, Ho, Wo, top, left


def conv2d_forward(x, w, b, stride=1, padding="same"):
    """x: (B, H, W, C), w: (K, K, C, F), b: (F,) -> y: (B, Ho, Wo, F)."""
    x, w, b = _f64(x, w, b)
    xp, Ho, Wo, _, _ = _padded(x, stride, padding)
    B, F = x.shape[0], w.shape[3]
    y = np.zeros((B, Ho, Wo, F))                                  # (B, Ho, Wo, F)
    for n in range(B):
        for i in range(Ho):
            for j in range(Wo):
                acc = b.copy()                                    # (F,)
                for p in range(K):
                    for q in range(K):
                        acc += xp[n, stride * i + p, stride * j + q, :] @ w[p, q]   # (C,)@(C, F)
                y[n, i, j] = acc
    return y


def conv2d_backward(dy, x, w, stride=1, padding="same"):
    """dy: (B, Ho, Wo, F) -> dx (B, H, W, C), dw (K, K, C, F), db (F,)."""
    dy, x, w = _f64(dy, x, w)
    xp, Ho, Wo, top, left = _padded(x, stride, padding)
    B, H, W, _ = x.shape
    dxp = np.zeros_like(xp)                                       # (B, Hp, Wp, C)
    dw = np.zeros_like(w)                                         # (K, K, C, F)
    for n in range(B):
        for i in range(Ho):
            for j in range(Wo):
                g = dy[n, i, j]                                   # (F,)
                for p in range(K):
                    for q in range(K):
                        r, s = stride * i + p, stride * j + q
                        dxp[n, r, s, :] += w[p, q] @ g            # (C, F)@(F,)
                        dw[p, q] += np.outer(xp[n, r, s, :], g)   # (C, F)
    dx = dxp[:, top:top + H, left:left + W, :].copy()            # (B, H, W, C)
    db = dy.sum(axis=(0, 1, 2))                                   # (F,)
    return dx, dw, db


def conv2d_rforward(x, w, rx, rw, rb, stride=1, padding="same"):
    """R{y} = conv(rx, w) + conv(x, rw) + rb.  rx: (B, H, W, C) (zeros for a data input),
    rw: (K, K, C, F), rb: (F,) -> ry: (B, Ho, Wo, F)."""
    zero_b = np.zeros(np.shape(w)[3])
    return (conv2d_forward(rx, w, zero_b, stride, padding)
            + conv2d_forward(x, rw, rb, stride, padding))


def conv2d_rbackward(dy, rdy, x, w, rx, rw, stride=1, padding="same"):
    """R-operator of conv2d_backward along (rx, rw, rb) with R{dy} = rdy (rb does not enter).
    -> rdx (B, H, W, C), rdw (K, K, C, F), rdb (F,)."""
    rdx, rdw, rdb = conv2d_backward(rdy, x, w, stride, padding)   # terms in R{dy}
    dx_rw, dw_rx, _ = conv2d_backward(dy, rx, rw, stride, padding)  # terms in R{w}, R{x}
    return rdx + dx_rw, rdw + dw_rx, rdb
