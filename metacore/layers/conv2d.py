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

With numba available (float32/float64), the same GEMMs run chunk by chunk: im2col of a few
images at a time (metacore.kernels.convnet_numba, padding on the fly) into a buffer of about
CHUNK_ELEMS entries that stays in cache, the GEMM on it at once, and for dx the adjoint
col2im of that chunk. A product-rule sum of two GEMMs (R-passes) becomes one GEMM on
stacked operands. Only the order of the sums changes (dw and db are summed chunk by chunk).
Below MIN_FAST_KKC (few input channels: the image layer) a direct kernel computes y and
(dw, db) from x without an im2col matrix; dx there (never needed for a data input) keeps
the NumPy GEMM and col2im.
The NumPy code below is the fallback and the ground truth.
"""
import numpy as np
from numpy.lib.stride_tricks import as_strided

from metacore.kernels.convnet import kernels_for
from metacore.validate import check_float_array, check_same

KSIZE = 3
CHUNK_ELEMS = 1 << 17      # entries of one im2col chunk (512 KiB in float32), whole images
# Below this K*K*C (the image layer, C = 1) the im2col route does not pay: OpenBLAS runs a
# GEMM with an inner dimension of 9 much slower in chunks (measured 107 vs 65 ms CPU for the
# ProtoNet episode's first layer, 20 chunks vs one call), so the direct kernels take it.
MIN_FAST_KKC = 64


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


# ---------------------------------------------------------------- chunked fast path
def _fast_kernels(C, *arrays):
    """The Numba kernel module for a conv with C input channels on these arrays, or None."""
    if KSIZE * KSIZE * C < MIN_FAST_KKC or any(a.size == 0 for a in arrays):
        return None
    return kernels_for(*arrays)


def _chunk_images(c, kkc, B):
    """Images per chunk: as many whole images as fit CHUNK_ELEMS im2col entries (at least 1)."""
    return int(min(B, max(1, CHUNK_ELEMS // (c.Ho * c.Wo * kkc))))


def _task_w(w, t):
    """w: (T, K, K, C, F) -> task t's (K*K*C, F) matrix, C-contiguous."""
    return np.ascontiguousarray(w[t].reshape(-1, w.shape[-1]))


def _fast_out(k, c, terms, bias):
    """sum over terms (x, w) of conv(x, w), plus bias (T, F): y (T, B, Ho, Wo, F). Two terms
    are one GEMM: [cols(x1), cols(x2)] (R, 2 KKC) @ [w1; w2] (2 KKC, F)."""
    T, B, H, W, C = terms[0][0].shape
    F, kkc, R = terms[0][1].shape[-1], KSIZE * KSIZE * C, c.Ho * c.Wo
    xs = [np.ascontiguousarray(x) for x, _ in terms]
    nb = _chunk_images(c, kkc * len(terms), B)
    dtype = xs[0].dtype
    y = np.empty((T, B, c.Ho, c.Wo, F), dtype)
    y2 = y.reshape(T, B * R, F)                                   # (T, M, F)
    cols = np.empty((nb * R, kkc * len(terms)), dtype)            # (R chunk, KKC per term)
    for t in range(T):
        wt = np.concatenate([_task_w(w, t) for _, w in terms], axis=0)   # (terms*KKC, F)
        bt = bias[t]
        for b0 in range(0, B, nb):
            b1 = min(B, b0 + nb)
            rows = (b1 - b0) * R
            for i, x in enumerate(xs):
                k.im2col(x[t], b0, b1, c.stride, c.pads_h[0], c.pads_w[0], c.Ho, c.Wo,
                         cols, i * kkc)
            out = y2[t, b0 * R:b1 * R]
            np.matmul(cols[:rows], wt, out=out)
            out += bt
    return y


def _fast_back(k, c, dw_terms, dx_terms, need_dx):
    """dw = sum over dw_terms (x, g) of cols(x)^T g, db = the sum of the first term's g over
    (B, Ho, Wo), dx = col2im(sum over dx_terms (g, w) of g w^T) when need_dx (else None).
    x: (T, B, H, W, C), g: (T, B, Ho, Wo, F), w: (T, K, K, C, F). Two terms are one GEMM on
    stacked operands: [cols(x1); cols(x2)]^T [g1; g2] and [g1, g2] [w1^T; w2^T]."""
    x0 = dw_terms[0][0]
    T, B, H, W, C = x0.shape
    F, kkc, R = dw_terms[0][1].shape[-1], KSIZE * KSIZE * C, c.Ho * c.Wo
    dtype = x0.dtype
    xs = [np.ascontiguousarray(x) for x, _ in dw_terms]
    gs = [np.ascontiguousarray(g).reshape(T, B * R, F) for _, g in dw_terms]
    nt = len(dw_terms)
    nb = _chunk_images(c, kkc * nt, B)
    cols = np.empty((nt * nb * R, kkc), dtype)                    # terms stacked by rows
    gstack = np.empty((nt * nb * R, F), dtype) if nt > 1 else None
    dw = np.empty((T, kkc, F), dtype)
    db = np.zeros((T, F), dtype)
    wpart = np.empty((kkc, F), dtype)
    dx = None
    if need_dx:
        nd = len(dx_terms)
        dgs = [np.ascontiguousarray(g).reshape(T, B * R, F) for g, _ in dx_terms]
        dx = np.empty((T, B, H, W, C), dtype)
        dcols = np.empty((nb * R, kkc), dtype)                    # (R chunk, KKC)
        dgcat = np.empty((nb * R, nd * F), dtype) if nd > 1 else None
    for t in range(T):
        dw[t] = 0.0
        if need_dx:
            wT = np.concatenate([_task_w(w, t).T for _, w in dx_terms], axis=0)  # (nd*F, KKC)
        for b0 in range(0, B, nb):
            b1 = min(B, b0 + nb)
            rows = (b1 - b0) * R
            m0, m1 = b0 * R, b1 * R
            for i, x in enumerate(xs):
                k.im2col(x[t], b0, b1, c.stride, c.pads_h[0], c.pads_w[0], c.Ho, c.Wo,
                         cols[i * rows:(i + 1) * rows], 0)
            if nt == 1:
                g = gs[0][t, m0:m1]
            else:
                g = gstack[:nt * rows]
                for i in range(nt):
                    g[i * rows:(i + 1) * rows] = gs[i][t, m0:m1]
            np.matmul(cols[:nt * rows].T, g, out=wpart)
            dw[t] += wpart
            db[t] += g[:rows].sum(axis=0)                         # while the chunk is cached
            if need_dx:
                if nd == 1:
                    dg = dgs[0][t, m0:m1]
                else:
                    dg = dgcat[:rows]
                    for i in range(nd):
                        dg[:, i * F:(i + 1) * F] = dgs[i][t, m0:m1]
                np.matmul(dg, wT, out=dcols[:rows])
                k.col2im(dcols, b0, b1, c.stride, c.pads_h[0], c.pads_w[0], c.Ho, c.Wo, dx[t])
    return dx, dw.reshape((T, KSIZE, KSIZE, C, F)), db


# ---------------------------------------------------------------- direct path (few channels)
def _direct_kernels(C, *arrays):
    """The Numba kernel module for the direct conv (K*K*C below MIN_FAST_KKC), or None."""
    if KSIZE * KSIZE * C >= MIN_FAST_KKC or any(a.size == 0 for a in arrays):
        return None
    return kernels_for(*arrays)


def _w_rows(w):
    """w: (T, K, K, C, F) -> (T, K*K*C, F), C-contiguous (a copy only for a strided view)."""
    return np.ascontiguousarray(w).reshape(w.shape[0], -1, w.shape[-1])


def _images(x):
    """x: (T, B, H, W, C) -> (T*B, H, W, C), C-contiguous (a copy only for a strided view)."""
    return np.ascontiguousarray(x).reshape((-1,) + x.shape[2:])


def _direct_out(k, c, terms, bias):
    """sum over terms (x, w) of conv(x, w), plus bias (T, F): y (T, B, Ho, Wo, F); each term
    one direct kernel call (the second one, R{x} w in the R-forward, with a zero bias)."""
    y = None
    for x, w in terms:
        T, B = x.shape[:2]
        F = w.shape[-1]
        part = np.empty((T, B, c.Ho, c.Wo, F), x.dtype)
        k.conv_direct_forward(_images(x), _w_rows(w), np.ascontiguousarray(bias), c.stride,
                              c.pads_h[0], c.pads_w[0], c.Ho, c.Wo,
                              part.reshape(T * B, c.Ho * c.Wo, F))
        if y is None:
            y, bias = part, np.zeros_like(bias)
        else:
            y += part
    return y


def _direct_back(k, c, dw_terms, dx_terms, need_dx):
    """As _fast_back: dw = sum over dw_terms (x, g) of cols(x)^T g by the direct kernel, db =
    the sum of the first term's g, dx = col2im(sum over dx_terms (g, w) of g w^T) by the NumPy
    code when need_dx (else None)."""
    T, B, H, W, C = dw_terms[0][0].shape
    F = dw_terms[0][1].shape[-1]
    dw = db = None
    for x, g in dw_terms:
        dwi = np.empty((T, KSIZE * KSIZE * C, F), x.dtype)
        dbi = np.empty((T, F), x.dtype)
        g3 = np.ascontiguousarray(g).reshape(T * B, c.Ho * c.Wo, F)   # (T*B, Ho*Wo, F)
        k.conv_direct_dw(_images(x), g3, c.stride, c.pads_h[0], c.pads_w[0], c.Ho, c.Wo,
                         dwi, dbi)
        if dw is None:
            dw, db = dwi, dbi
        else:
            dw += dwi
    dx = None
    if need_dx:
        for g, w in dx_terms:
            dcols = np.matmul(g.reshape(T, -1, F),
                              w.reshape(T, -1, F).transpose(0, 2, 1))   # (T, M, KKC)
            dxi = _col2im(dcols, c.x.shape, c.Ho, c.Wo, c.stride, c.pads_h, c.pads_w)
            dx = dxi if dx is None else dx + dxi
    return dx, dw.reshape((T, KSIZE, KSIZE, C, F)), db


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
    k = _fast_kernels(C, x, w, b)
    if k is not None:
        return _fast_out(k, cache, [(x, w)], b), cache
    k = _direct_kernels(C, x, w, b)
    if k is not None:
        return _direct_out(k, cache, [(x, w)], b), cache
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
    k = _fast_kernels(x.shape[-1], dy, x, cache.w)
    if k is not None:
        return _fast_back(k, cache, [(x, dy)], [(dy, cache.w)], need_dx)
    k = _direct_kernels(x.shape[-1], dy, x, cache.w)
    if k is not None:
        return _direct_back(k, cache, [(x, dy)], [(dy, cache.w)], need_dx)
    dx, dw = _conv_backward_parts(dy, cache.cols(cache.x), cache.w, cache, need_dx)
    db = dy.sum(axis=(1, 2, 3))                                 # (T, F)
    return dx, dw, db


def conv2d_rforward(rx, rw, rb, cache):
    """R{y} = conv(R{x}, w) + conv(x, R{w}) + R{b}; rx None means R{x} = 0 (data input).
    rw: (T, K, K, C, F), rb: (T, F) -> ry (T, B, Ho, Wo, F), rcache = (rx, rw)."""
    check_same("conv2d rforward", "rw", rw, "w", cache.w)
    if rx is not None:
        check_same("conv2d rforward", "rx", rx, "x", cache.x)
    terms = [(cache.x, rw)] + ([(rx, cache.w)] if rx is not None else [])
    k = _fast_kernels(cache.x.shape[-1], cache.x, cache.w, rw, rb)
    if k is not None:
        return _fast_out(k, cache, terms, rb), (rx, rw)
    k = _direct_kernels(cache.x.shape[-1], cache.x, cache.w, rw, rb)
    if k is not None:
        return _direct_out(k, cache, terms, rb), (rx, rw)
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
    dw_terms = [(cache.x, rdy)] + ([(rx, dy)] if rx is not None else [])
    dx_terms = [(rdy, cache.w), (dy, rw)]
    k = _fast_kernels(cache.x.shape[-1], dy, cache.x, cache.w, rw)
    if k is not None:
        return _fast_back(k, cache, dw_terms, dx_terms, need_dx)
    k = _direct_kernels(cache.x.shape[-1], dy, cache.x, cache.w, rw)
    if k is not None:
        return _direct_back(k, cache, dw_terms, dx_terms, need_dx)
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
