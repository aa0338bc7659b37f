"""3x3 convolution (cross-correlation, as in every deep-learning framework), batched over
tasks whose filters differ. Channels-last images.

Shapes:
  T tasks, B images per task, H x W input size, C input channels,
  F filters (output channels), Ho x Wo output size, K = 3 kernel size, M = B*Ho*Wo.

  x: (T, B, H, W, C)   w: (T, K, K, C, F)   b: (T, F)   y: (T, B, Ho, Wo, F)

  y[t,b,i,j,f] = b[t,f] + sum_{p,q,c} xp[t, b, s*i+p, s*j+q, c] * w[t,p,q,c,f]

where xp is x zero-padded and s the stride. Padding 'valid' adds nothing; 'same' follows
TensorFlow's rule (used by MAML's reference code): Ho = ceil(H / s), with the total padding
max((Ho-1)*s + K - H, 0) split as floor(total/2) before and the rest after. For stride 1 that
is one pixel on each side; for stride 2 on an even size, one pixel after only.

Fast path: im2col (a strided view copied to cols: (T, M, K*K*C)) and one batched GEMM per
call. cols is recomputed in backward instead of cached: it is K*K = 9 times the input.
The layer is bilinear in (x, w), so the R-operator is the product rule on the same GEMMs.
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from metacore.validate import check_float_array, check_same

KSIZE = 3


def conv2d_geometry(H, W, stride, padding):
    """-> (Ho, Wo, (pad_top, pad_bottom), (pad_left, pad_right))."""
    if stride not in (1, 2):
        raise ValueError(f"conv2d: stride must be 1 or 2, got {stride}")
    if padding == "valid":
        if H < KSIZE or W < KSIZE:
            raise ValueError(f"conv2d: 'valid' padding needs H, W >= {KSIZE}, got {H}x{W}")
        return (H - KSIZE) // stride + 1, (W - KSIZE) // stride + 1, (0, 0), (0, 0)
    if padding == "same":
        Ho, Wo = -(-H // stride), -(-W // stride)
        ph = max((Ho - 1) * stride + KSIZE - H, 0)
        pw = max((Wo - 1) * stride + KSIZE - W, 0)
        return Ho, Wo, (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)
    raise ValueError(f"conv2d: padding must be 'same' or 'valid', got {padding!r}")


def _pad(x, pads_h, pads_w):
    if pads_h == (0, 0) and pads_w == (0, 0):
        return x
    return np.pad(x, ((0, 0), (0, 0), pads_h, pads_w, (0, 0)))


def _im2col(xp, Ho, Wo, stride):
    """xp: (T, B, Hp, Wp, C) padded input -> cols: (T, B*Ho*Wo, K*K*C), a fresh array."""
    T, B, Hp, Wp, C = xp.shape
    sT, sB, sH, sW, sC = xp.strides
    patches = as_strided(xp, shape=(T, B, Ho, Wo, KSIZE, KSIZE, C),
                         strides=(sT, sB, sH * stride, sW * stride, sH, sW, sC),
                         writeable=False)                        # (T, B, Ho, Wo, K, K, C) view
    return patches.reshape(T, B * Ho * Wo, KSIZE * KSIZE * C)   # reshape of a view copies


def _col2im(dcols, xshape, Ho, Wo, stride, pads_h, pads_w):
    """Adjoint of _im2col: scatter-add dcols (T, M, K*K*C) back onto the unpadded input."""
    T, B, H, W, C = xshape
    Hp, Wp = H + sum(pads_h), W + sum(pads_w)
    dxp = np.zeros((T, B, Hp, Wp, C), dtype=dcols.dtype)
    d = dcols.reshape(T, B, Ho, Wo, KSIZE, KSIZE, C)
    for p in range(KSIZE):
        for q in range(KSIZE):
            dxp[:, :, p:p + stride * (Ho - 1) + 1:stride,
                      q:q + stride * (Wo - 1) + 1:stride, :] += d[:, :, :, :, p, q, :]
    return dxp[:, :, pads_h[0]:pads_h[0] + H, pads_w[0]:pads_w[0] + W, :]


class Conv2dCache:
    """What backward needs: the input and filters, and the geometry. cols is recomputed."""
    __slots__ = ("x", "w", "stride", "Ho", "Wo", "pads_h", "pads_w")

    def __init__(self, x, w, stride, Ho, Wo, pads_h, pads_w):
        self.x, self.w, self.stride = x, w, stride
        self.Ho, self.Wo, self.pads_h, self.pads_w = Ho, Wo, pads_h, pads_w

    def cols(self, x):
        return _im2col(_pad(x, self.pads_h, self.pads_w), self.Ho, self.Wo, self.stride)


def _gemm_out(cols, w, c):
    """cols: (T, M, KKC) @ w: (T, K, K, C, F) -> (T, B, Ho, Wo, F)."""
    T, F = w.shape[0], w.shape[-1]
    y = np.matmul(cols, w.reshape(T, -1, F))                    # (T, M, F)
    return y.reshape(T, -1, c.Ho, c.Wo, F)


def conv2d_forward(x, w, b, stride=1, padding="same"):
    """x: (T, B, H, W, C), w: (T, K, K, C, F), b: (T, F) -> y: (T, B, Ho, Wo, F), cache."""
    check_float_array("conv2d", "x", x, ndim=5, finite=False)
    T, B, H, W, C = x.shape
    check_float_array("conv2d", "w", w, shape=(T, KSIZE, KSIZE, C, None), dtype=x.dtype,
                      finite=False)
    check_float_array("conv2d", "b", b, shape=(T, w.shape[-1]), dtype=x.dtype, finite=False)
    Ho, Wo, pads_h, pads_w = conv2d_geometry(H, W, stride, padding)
    cache = Conv2dCache(x, w, stride, Ho, Wo, pads_h, pads_w)
    y = _gemm_out(cache.cols(x), w, cache)
    y += b[:, None, None, None, :]
    return y, cache


def _conv_backward_parts(dy, x_cols, w, c, need_dx):
    """dy: (T, B, Ho, Wo, F) -> dx (T, B, H, W, C) or None, dw (T, K, K, C, F)."""
    T, F = w.shape[0], w.shape[-1]
    dy2 = dy.reshape(T, -1, F)                                  # (T, M, F)
    dw = np.matmul(x_cols.transpose(0, 2, 1), dy2).reshape(w.shape)   # (T, K, K, C, F)
    dx = None
    if need_dx:
        dcols = np.matmul(dy2, w.reshape(T, -1, F).transpose(0, 2, 1))  # (T, M, KKC)
        dx = _col2im(dcols, c.x.shape, c.Ho, c.Wo, c.stride, c.pads_h, c.pads_w)
    return dx, dw


def conv2d_backward(dy, cache, need_dx=True):
    """dx = col2im(dy W^T), dw = cols^T dy, db = sum over (B, Ho, Wo) of dy.
    -> dx (T, B, H, W, C) or None, dw (T, K, K, C, F), db (T, F)."""
    x = cache.x
    check_float_array("conv2d backward", "dy", dy,
                      shape=(x.shape[0], x.shape[1], cache.Ho, cache.Wo, cache.w.shape[-1]),
                      dtype=x.dtype, finite=False)
    dx, dw = _conv_backward_parts(dy, cache.cols(cache.x), cache.w, cache, need_dx)
    db = dy.sum(axis=(1, 2, 3))                                 # (T, F)
    return dx, dw, db


def conv2d_rforward(rx, rw, rb, cache):
    """R{y} = conv(R{x}, w) + conv(x, R{w}) + R{b}; rx None means R{x} = 0 (data input).
    rw: (T, K, K, C, F), rb: (T, F) -> ry (T, B, Ho, Wo, F), rcache = (rx, rw)."""
    check_same("conv2d rforward", "rw", rw, "w", cache.w)
    if rx is not None:
        check_same("conv2d rforward", "rx", rx, "x", cache.x)
    ry = _gemm_out(cache.cols(cache.x), rw, cache)
    if rx is not None:
        ry += _gemm_out(cache.cols(rx), cache.w, cache)
    ry += rb[:, None, None, None, :]
    return ry, (rx, rw)


def conv2d_rbackward(dy, rdy, cache, rcache, need_dx=True):
    """R-operator of conv2d_backward (product rule on both bilinear terms):
      R{dx} = col2im(R{dy} W^T) + col2im(dy R{W}^T)
      R{dw} = cols(x)^T R{dy} + cols(R{x})^T dy
      R{db} = sum R{dy}
    -> rdx (T, B, H, W, C) or None, rdw (T, K, K, C, F), rdb (T, F)."""
    rx, rw = rcache
    check_same("conv2d rbackward", "rdy", rdy, "dy", dy)
    rdx, rdw = _conv_backward_parts(rdy, cache.cols(cache.x), cache.w, cache, need_dx)
    if need_dx:
        T, F = rw.shape[0], rw.shape[-1]
        dcols = np.matmul(dy.reshape(T, -1, F), rw.reshape(T, -1, F).transpose(0, 2, 1))
        rdx += _col2im(dcols, cache.x.shape, cache.Ho, cache.Wo, cache.stride,
                       cache.pads_h, cache.pads_w)
    if rx is not None:
        T, F = rw.shape[0], rw.shape[-1]
        rdw += np.matmul(cache.cols(rx).transpose(0, 2, 1),
                         dy.reshape(T, -1, F)).reshape(rw.shape)
    rdb = rdy.sum(axis=(1, 2, 3))                               # (T, F)
    return rdx, rdw, rdb
