"""Numba CPU kernels of the Conv-4 layers: batch norm (batch statistics), ReLU, 2x2 max-pool,
im2col / col2im for the 3x3 convolution, and a direct 3x3 convolution for few input channels.
Called by metacore.layers through metacore.kernels.convnet, which owns the switch; the NumPy
code in metacore.layers is the ground truth (tests/test_conv_fast.py compares the two).

Shape letters (this module):
    T tasks, M entries per (task, channel) that batch norm averages over (M = B*H*W for
    images), C channels, B images (for the image kernels, T*B images in one axis), H x W input
    size, Ho x Wo output size, F filters, K = 3 kernel size, R rows of an im2col chunk.

Every kernel overwrites its output arguments (none accumulates) and returns nothing.
Inputs must be C-contiguous; the wrappers in metacore.layers make them so.

How they differ from the NumPy code (results equal up to float rounding):
  * Batch norm sums over the M entries in float64 whatever the data dtype (NumPy sums float32
    data in float32), in one pass for all the sums a call needs, the vectorized loop over
    channels; the elementwise pass then evaluates the NumPy code's centred formula in float64
    with the per-channel means precomputed.
  * ReLU and the max-pool scatter multiply by a 0/1 factor exactly as NumPy's `x * mask`
    does, so NaN, inf and -0.0 propagate the same way; max-pool ties go to the first maximum
    in row-major window order and a NaN wins its window, as np.argmax.
  * im2col writes R rows of the (M, K*K*C) patch matrix for a few images, padding on the fly
    (no padded copy of x); col2im is its adjoint for the same images. The layer then runs the
    GEMM on that chunk while it is still in cache.
  * The direct convolution (forward, and dw with db) gathers each output pixel's 3x3 window
    and keeps vectors of filters in registers: for the image layer (C = 1) the im2col GEMM
    has an inner dimension of 9 and runs at a few GFLOP/s. Its sums run in another order
    than the GEMM's (fused multiply-adds; dw per image in the data dtype, over images in
    float64).
  * bn_relu_forward / bn_relu_backward are batch norm with the ReLU that follows it in the
    same passes (Model.forward / backward pair them): the same bits as the kernels one after
    the other, without the intermediate array.
"""
import numpy as np
from numba import njit

from .simd import brow, vfma, vload, vload2, vsplat, vstore2, vzero

# nogil: metacore.taskpool runs tasks of one meta-batch in threads side by side
_JIT = dict(cache=True, error_model="numpy", fastmath=False, nogil=True)


# ---------------------------------------------------------------- batch norm (batch statistics)
@njit(inline="always")
def _bn_forward(x, gamma, beta, eps, xhat, y, mu, var, rstd, relu, mask):
    """bn_forward; with relu True, y is then ReLU'd in the same pass and mask (T, M, C) bool
    written (bn_relu_forward).
    x: (T, M, C), gamma, beta: (T, C) -> xhat, y: (T, M, C); mu, var, rstd: (T, C).
    var is biased (divides by M). One pass sums d = x - s and d^2 with the shift s = the first
    entry of each channel, var = (sum d^2 - (sum d)^2 / M) / M: the shift keeps the
    cancellation small (|mean - s| is a few standard deviations). Where it still cancels more
    than two digits ((sum d)^2 / M > 0.99 sum d^2) the task's variance is recomputed as the
    mean of (x - mu)^2, the NumPy code's formula, in a second pass."""
    T, M, C = x.shape
    s1 = np.empty(C, np.float64)
    s2 = np.empty(C, np.float64)
    sh = np.empty(C, np.float64)
    mu64 = np.empty(C, np.float64)
    r64 = np.empty(C, np.float64)
    g64 = np.empty(C, np.float64)
    b64 = np.empty(C, np.float64)
    for t in range(T):
        s1[:] = 0.0
        s2[:] = 0.0
        for c in range(C):
            sh[c] = x[t, 0, c]
        for m in range(M):
            for c in range(C):
                d = np.float64(x[t, m, c]) - sh[c]
                s1[c] += d
                s2[c] += d * d
        exact = False
        for c in range(C):
            mu64[c] = sh[c] + s1[c] / M
            if s1[c] * s1[c] / M > 0.99 * s2[c]:
                exact = True
        if exact:
            s2[:] = 0.0
            for m in range(M):
                for c in range(C):
                    d = np.float64(x[t, m, c]) - mu64[c]
                    s2[c] += d * d
            s1[:] = 0.0
        for c in range(C):
            v = max((s2[c] - s1[c] * s1[c] / M) / M, 0.0)
            r64[c] = 1.0 / np.sqrt(v + eps)
            mu[t, c] = mu64[c]
            var[t, c] = v
            rstd[t, c] = r64[c]
            g64[c] = gamma[t, c]
            b64[c] = beta[t, c]
        for m in range(M):
            for c in range(C):
                xh = (np.float64(x[t, m, c]) - mu64[c]) * r64[c]
                xhat[t, m, c] = xh
                y[t, m, c] = g64[c] * xh + b64[c]
                if relu:                 # relu_forward on the rounded y: the same bits
                    yv = y[t, m, c]
                    p = yv > 0
                    mask[t, m, c] = p
                    y[t, m, c] = yv * (1.0 if p else 0.0)


@njit(**_JIT)
def bn_forward(x, gamma, beta, eps, xhat, y, mu, var, rstd):
    """x: (T, M, C), gamma, beta: (T, C) -> xhat, y: (T, M, C); mu, var, rstd: (T, C).
    var is biased (divides by M); how the sums run: _bn_forward."""
    _bn_forward(x, gamma, beta, eps, xhat, y, mu, var, rstd, False,
                np.empty((0, 0, 0), np.bool_))


@njit(**_JIT)
def bn_relu_forward(x, gamma, beta, eps, xhat, y, mu, var, rstd, mask):
    """bn_forward then relu_forward in one pass over the outputs (batch norm followed by a
    ReLU: y and mask as relu_forward would give on bn_forward's y, bit for bit)."""
    _bn_forward(x, gamma, beta, eps, xhat, y, mu, var, rstd, True, mask)


@njit(inline="always")
def _gated(dy, mask, t, m, c, relu):
    """dy[t, m, c], times the ReLU's 0/1 mask when relu (relu_gate's product: NaN kept)."""
    if relu:
        return dy[t, m, c] * (1.0 if mask[t, m, c] else 0.0)
    return dy[t, m, c]


@njit(inline="always")
def _bn_backward(dy, xhat, rstd, gamma, dx, dgamma, dbeta, relu, mask):
    """bn_backward; with relu True, dy is first gated by mask (T, M, C) bool as relu_backward
    does (bn_relu_backward), without writing the gated array.
    dy, xhat: (T, M, C), rstd, gamma: (T, C) -> dx: (T, M, C), dgamma, dbeta: (T, C).
    With g = gamma dy: dx = rstd (g - mean(g) - xhat mean(g xhat)), written per channel as
    dx = a ((dy - mean(dy)) - k xhat), a = rstd gamma, k = mean(dy xhat): centred first, as
    the NumPy code, so that a constant dy gives exactly zero (M = 1, for one)."""
    T, M, C = dy.shape
    s1 = np.empty(C, np.float64)
    s2 = np.empty(C, np.float64)
    ca = np.empty(C, np.float64)
    cm = np.empty(C, np.float64)
    ck = np.empty(C, np.float64)
    for t in range(T):
        s1[:] = 0.0
        s2[:] = 0.0
        for m in range(M):
            for c in range(C):
                d = np.float64(_gated(dy, mask, t, m, c, relu))
                s1[c] += d
                s2[c] += d * np.float64(xhat[t, m, c])
        for c in range(C):
            dbeta[t, c] = s1[c]
            dgamma[t, c] = s2[c]
            ca[c] = np.float64(rstd[t, c]) * np.float64(gamma[t, c])
            cm[c] = s1[c] / M
            ck[c] = s2[c] / M
        for m in range(M):
            for c in range(C):
                dx[t, m, c] = ca[c] * ((np.float64(_gated(dy, mask, t, m, c, relu)) - cm[c])
                                       - ck[c] * np.float64(xhat[t, m, c]))


@njit(**_JIT)
def bn_backward(dy, xhat, rstd, gamma, dx, dgamma, dbeta):
    """dy, xhat: (T, M, C), rstd, gamma: (T, C) -> dx: (T, M, C), dgamma, dbeta: (T, C)
    (formula: _bn_backward)."""
    _bn_backward(dy, xhat, rstd, gamma, dx, dgamma, dbeta, False,
                 np.empty((0, 0, 0), np.bool_))


@njit(**_JIT)
def bn_relu_backward(dy, mask, xhat, rstd, gamma, dx, dgamma, dbeta):
    """relu_backward then bn_backward without the gated array in between: dy, xhat: (T, M, C),
    mask: (T, M, C) bool, rstd, gamma: (T, C) -> dx: (T, M, C), dgamma, dbeta: (T, C), the
    same bits as the two kernels in turn."""
    _bn_backward(dy, xhat, rstd, gamma, dx, dgamma, dbeta, True, mask)


@njit(**_JIT)
def bn_rforward(rx, xhat, rstd, gamma, rgamma, rbeta, rxhat, ry, rrstd):
    """rx, xhat: (T, M, C), rstd, gamma, rgamma, rbeta: (T, C) -> rxhat, ry: (T, M, C),
    rrstd: (T, C). With a = mean(xhat rx): R{xhat} = rstd (rx - mean(rx) - xhat a),
    R{rstd} = -rstd^2 a, R{y} = R{gamma} xhat + gamma R{xhat} + R{beta}."""
    T, M, C = rx.shape
    s1 = np.empty(C, np.float64)
    s2 = np.empty(C, np.float64)
    r64 = np.empty(C, np.float64)
    k0 = np.empty(C, np.float64)
    kx = np.empty(C, np.float64)
    g64 = np.empty(C, np.float64)
    rg64 = np.empty(C, np.float64)
    rb64 = np.empty(C, np.float64)
    for t in range(T):
        s1[:] = 0.0
        s2[:] = 0.0
        for m in range(M):
            for c in range(C):
                v = np.float64(rx[t, m, c])
                s1[c] += v
                s2[c] += v * np.float64(xhat[t, m, c])
        for c in range(C):
            r = np.float64(rstd[t, c])
            a = s2[c] / M
            r64[c] = r
            k0[c] = s1[c] / M
            kx[c] = a
            rrstd[t, c] = -r * r * a
            g64[c] = gamma[t, c]
            rg64[c] = rgamma[t, c]
            rb64[c] = rbeta[t, c]
        for m in range(M):
            for c in range(C):
                xh = np.float64(xhat[t, m, c])
                rxh = r64[c] * ((np.float64(rx[t, m, c]) - k0[c]) - kx[c] * xh)
                rxhat[t, m, c] = rxh
                ry[t, m, c] = rg64[c] * xh + g64[c] * rxh + rb64[c]


@njit(**_JIT)
def bn_rbackward(dy, rdy, xhat, rxhat, rstd, rrstd, gamma, rgamma, rdx, rdgamma, rdbeta):
    """R-operator of bn_backward. dy, rdy, xhat, rxhat: (T, M, C); rstd, rrstd, gamma, rgamma:
    (T, C) -> rdx: (T, M, C), rdgamma, rdbeta: (T, C).
    With g = gamma dy, R{g} = gamma R{dy} + R{gamma} dy, s2 = mean(g xhat),
    s3 = mean(R{g} xhat + g R{xhat}):
      R{dx} = R{rstd} (g - mean(g) - xhat s2) + rstd (R{g} - mean(R{g}) - R{xhat} s2 - xhat s3)
    evaluated per element in that centred form (as the NumPy code), with the per-channel
    means and s2, s3 computed once from five float64 sums;
    R{dgamma} = sum(R{dy} xhat + dy R{xhat}), R{dbeta} = sum(R{dy})."""
    T, M, C = dy.shape
    s_dy = np.empty(C, np.float64)
    s_dyx = np.empty(C, np.float64)
    s_rdy = np.empty(C, np.float64)
    s_rdyx = np.empty(C, np.float64)
    s_dyrx = np.empty(C, np.float64)
    ga = np.empty(C, np.float64)
    rga = np.empty(C, np.float64)
    r = np.empty(C, np.float64)
    rr = np.empty(C, np.float64)
    mg = np.empty(C, np.float64)
    mrg = np.empty(C, np.float64)
    s2 = np.empty(C, np.float64)
    s3 = np.empty(C, np.float64)
    for t in range(T):
        s_dy[:] = 0.0
        s_dyx[:] = 0.0
        s_rdy[:] = 0.0
        s_rdyx[:] = 0.0
        s_dyrx[:] = 0.0
        for m in range(M):
            for c in range(C):
                d = np.float64(dy[t, m, c])
                rd = np.float64(rdy[t, m, c])
                xh = np.float64(xhat[t, m, c])
                s_dy[c] += d
                s_dyx[c] += d * xh
                s_rdy[c] += rd
                s_rdyx[c] += rd * xh
                s_dyrx[c] += d * np.float64(rxhat[t, m, c])
        for c in range(C):
            ga[c] = gamma[t, c]
            rga[c] = rgamma[t, c]
            r[c] = rstd[t, c]
            rr[c] = rrstd[t, c]
            mg[c] = ga[c] * s_dy[c] / M
            mrg[c] = (ga[c] * s_rdy[c] + rga[c] * s_dy[c]) / M
            s2[c] = ga[c] * s_dyx[c] / M
            s3[c] = (ga[c] * s_rdyx[c] + rga[c] * s_dyx[c] + ga[c] * s_dyrx[c]) / M
            rdgamma[t, c] = s_rdyx[c] + s_dyrx[c]
            rdbeta[t, c] = s_rdy[c]
        for m in range(M):
            for c in range(C):
                d = np.float64(dy[t, m, c])
                xh = np.float64(xhat[t, m, c])
                g = ga[c] * d
                rg = ga[c] * np.float64(rdy[t, m, c]) + rga[c] * d
                rdx[t, m, c] = (rr[c] * ((g - mg[c]) - xh * s2[c])
                                + r[c] * ((rg - mrg[c]) - np.float64(rxhat[t, m, c]) * s2[c]
                                          - xh * s3[c]))


# ---------------------------------------------------------------- ReLU
@njit(**_JIT)
def relu_forward(x, y, mask):
    """x: (S,) flat -> y = x * [x > 0] (NumPy's x * mask: NaN and -0.0 kept), mask: bool."""
    for i in range(x.size):
        p = x[i] > 0
        mask[i] = p
        y[i] = x[i] * (1.0 if p else 0.0)


@njit(**_JIT)
def relu_gate(d, mask, out):
    """d: (S,) flat, mask: bool (S,) -> out = d * mask (NumPy's product with a bool array)."""
    for i in range(d.size):
        out[i] = d[i] * (1.0 if mask[i] else 0.0)


# ---------------------------------------------------------------- 2x2 max-pool, stride 2
@njit(inline="always")
def _beats(v, best):
    """np.argmax's order: greater wins, a NaN beats any number, the first of equals stays."""
    return v > best or (v != v and best == best)


@njit(**_JIT)
def maxpool_forward(x, y, arg):
    """x: (B, H, W, C) -> y: (B, Ho, Wo, C) the window maxima, arg: (B, Ho, Wo, C) int8 the
    winner's index 0..3 in row-major window order (first maximum on ties, as np.argmax)."""
    B, Ho, Wo, C = y.shape
    for n in range(B):
        for i in range(Ho):
            for j in range(Wo):
                for c in range(C):
                    best = x[n, 2 * i, 2 * j, c]
                    k = 0
                    v = x[n, 2 * i, 2 * j + 1, c]
                    if _beats(v, best):
                        best, k = v, 1
                    v = x[n, 2 * i + 1, 2 * j, c]
                    if _beats(v, best):
                        best, k = v, 2
                    v = x[n, 2 * i + 1, 2 * j + 1, c]
                    if _beats(v, best):
                        best, k = v, 3
                    y[n, i, j, c] = best
                    arg[n, i, j, c] = k


@njit(**_JIT)
def maxpool_scatter(dy, arg, dx):
    """dy, arg: (B, Ho, Wo, C) -> dx: (B, H, W, C), every entry written: dy times 1 at the
    window's winner and times 0 elsewhere (as the NumPy one-hot product: NaN spreads over its
    window like there), 0 on a trailing odd row or column."""
    B, Ho, Wo, C = dy.shape
    H, W = dx.shape[1], dx.shape[2]
    for n in range(B):
        for i in range(Ho):
            for j in range(Wo):
                for c in range(C):
                    d = dy[n, i, j, c]
                    k = arg[n, i, j, c]
                    dx[n, 2 * i, 2 * j, c] = d * (1.0 if k == 0 else 0.0)
                    dx[n, 2 * i, 2 * j + 1, c] = d * (1.0 if k == 1 else 0.0)
                    dx[n, 2 * i + 1, 2 * j, c] = d * (1.0 if k == 2 else 0.0)
                    dx[n, 2 * i + 1, 2 * j + 1, c] = d * (1.0 if k == 3 else 0.0)
            if W > 2 * Wo:
                for c in range(C):
                    dx[n, 2 * i, W - 1, c] = 0.0
                    dx[n, 2 * i + 1, W - 1, c] = 0.0
        if H > 2 * Ho:
            for j in range(W):
                for c in range(C):
                    dx[n, H - 1, j, c] = 0.0


@njit(**_JIT)
def maxpool_gather(rx, arg, ry):
    """rx: (B, H, W, C), arg: (B, Ho, Wo, C) -> ry: (B, Ho, Wo, C), rx at each winner."""
    B, Ho, Wo, C = ry.shape
    for n in range(B):
        for i in range(Ho):
            for j in range(Wo):
                for c in range(C):
                    k = arg[n, i, j, c]
                    ry[n, i, j, c] = rx[n, 2 * i + k // 2, 2 * j + k % 2, c]


# ---------------------------------------------------------------- 3x3 convolution: im2col, col2im
@njit(**_JIT)
def im2col(x, b0, b1, stride, pt, pl, Ho, Wo, cols, off):
    """x: (B, H, W, C) one task's images -> cols[r, off:off + K*K*C] for the R = (b1-b0)*Ho*Wo
    output pixels of images b0..b1-1 (row r = ((n - b0) * Ho + i) * Wo + j), the patch in
    (p, q, c) order; entries in the zero padding (pt rows on top, pl columns on the left, the
    rest after) are written as 0. Only those R rows and K*K*C columns are written."""
    B, H, W, C = x.shape
    r = 0
    for n in range(b0, b1):
        for i in range(Ho):
            for j in range(Wo):
                for p in range(3):
                    ii = stride * i + p - pt
                    for q in range(3):
                        jj = stride * j + q - pl
                        o = off + (p * 3 + q) * C
                        if 0 <= ii < H and 0 <= jj < W:
                            for c in range(C):
                                cols[r, o + c] = x[n, ii, jj, c]
                        else:
                            for c in range(C):
                                cols[r, o + c] = 0.0
                r += 1


@njit(**_JIT)
def col2im(dcols, b0, b1, stride, pt, pl, Ho, Wo, dx):
    """Adjoint of im2col (off = 0): dx[b0:b1] (B, H, W, C) overwritten with the sum, over the
    rows of dcols (R, K*K*C) of images b0..b1-1, of each row's patch put back where it was read;
    padding entries are dropped."""
    B, H, W, C = dx.shape
    for n in range(b0, b1):
        for ii in range(H):
            for jj in range(W):
                for c in range(C):
                    dx[n, ii, jj, c] = 0.0
    r = 0
    for n in range(b0, b1):
        for i in range(Ho):
            for j in range(Wo):
                for p in range(3):
                    ii = stride * i + p - pt
                    if ii < 0 or ii >= H:
                        continue
                    for q in range(3):
                        jj = stride * j + q - pl
                        if jj < 0 or jj >= W:
                            continue
                        o = (p * 3 + q) * C
                        for c in range(C):
                            dx[n, ii, jj, c] += dcols[r, o + c]
                r += 1


# ---------------------------------------------------------------- 3x3 convolution, direct (few C)
# For few input channels (the image layer, C = 1) im2col + BLAS does not pay: the GEMM's inner
# dimension is K*K*C = 9 (a few GFLOP/s) and the im2col matrix is 9 times the images. These
# kernels gather each output pixel's window into a K*K*C vector and keep vectors of
# L = 32 / itemsize filters in registers (kernels/simd.py): in the forward 4 vectors of one
# pixel across the window, in dw 4 window entries x 2 vectors across an image's pixels.
@njit(inline="always")
def _copy_entries(xf, a, out, o, k, C):
    """out[o, k : k + C] <- xf[a : a + C]; C = 1 without a loop (a loop over C would be
    vectorised with an overlap test at each entry: most of the gather's time for C = 1)."""
    if C == 1:
        out[o, k] = xf[a]
    else:
        for c in range(C):
            out[o, k + c] = xf[a + c]


@njit(inline="always")
def _window(xf, H, W, C, g, i, j, stride, pt, pl, out, o):
    """out[o, :K*K*C] <- the (p, q, c) window of output pixel (i, j) of image g of the images
    x: (TB, H, W, C) given flat as xf (TB*H*W*C,), zeros in the padding (windows inside the
    image skip the per-entry test)."""
    i0, j0 = stride * i - pt, stride * j - pl
    if i0 >= 0 and j0 >= 0 and i0 + 3 <= H and j0 + 3 <= W:
        base = ((g * H + i0) * W + j0) * C
        if C == 1:                       # the image layer: nine loads, no loop to set up
            a1, a2 = base + W, base + 2 * W
            out[o, 0], out[o, 1], out[o, 2] = xf[base], xf[base + 1], xf[base + 2]
            out[o, 3], out[o, 4], out[o, 5] = xf[a1], xf[a1 + 1], xf[a1 + 2]
            out[o, 6], out[o, 7], out[o, 8] = xf[a2], xf[a2 + 1], xf[a2 + 2]
            return
        for p in range(3):
            for q in range(3):
                _copy_entries(xf, base + (p * W + q) * C, out, o, (p * 3 + q) * C, C)
        return
    for p in range(3):
        ii = i0 + p
        for q in range(3):
            jj = j0 + q
            k = (p * 3 + q) * C
            if 0 <= ii < H and 0 <= jj < W:
                _copy_entries(xf, ((g * H + ii) * W + jj) * C, out, o, k, C)
            else:
                for c in range(C):
                    out[o, k + c] = 0.0


@njit(**_JIT)
def conv_direct_forward(x, w, b, stride, pt, pl, Ho, Wo, y):
    """x: (T*B, H, W, C) the images of T tasks, B each, w: (T, K*K*C, F) in (p, q, c) row order,
    b: (T, F) -> y: (T*B, Ho*Wo, F) = b + window(x) w per output pixel. Padding entries are
    zeros multiplied like any other (an inf weight gives NaN there, as the GEMM on zero-padded
    columns). Each output: the bias, then the K*K*C products in (p, q, c) order, one fused
    multiply-add each (plain multiply and add on the F mod L last filters)."""
    TB, H, W, C = x.shape
    T, kkc, F = w.shape
    B = TB // T
    L = 32 // y.itemsize
    xf = x.reshape(x.size)
    win = np.empty((1, kkc), x.dtype)                              # (1, K*K*C) one pixel
    for g in range(TB):
        wt, bt, yg = brow(w, g // B), brow(b, g // B), brow(y, g)  # (KKC, F), (F,), (R, F)
        for i in range(Ho):
            for j in range(Wo):
                r = i * Wo + j
                _window(xf, H, W, C, g, i, j, stride, pt, pl, win, 0)
                f = 0
                while f + 8 * L <= F:        # 8 chains: enough to hide the FMA latency
                    a0, a1 = vload(bt, f), vload(bt, f + L)
                    a2, a3 = vload(bt, f + 2 * L), vload(bt, f + 3 * L)
                    a4, a5 = vload(bt, f + 4 * L), vload(bt, f + 5 * L)
                    a6, a7 = vload(bt, f + 6 * L), vload(bt, f + 7 * L)
                    for k in range(kkc):
                        s = vsplat(win[0, k])
                        a0 = vfma(s, vload2(wt, k, f), a0)
                        a1 = vfma(s, vload2(wt, k, f + L), a1)
                        a2 = vfma(s, vload2(wt, k, f + 2 * L), a2)
                        a3 = vfma(s, vload2(wt, k, f + 3 * L), a3)
                        a4 = vfma(s, vload2(wt, k, f + 4 * L), a4)
                        a5 = vfma(s, vload2(wt, k, f + 5 * L), a5)
                        a6 = vfma(s, vload2(wt, k, f + 6 * L), a6)
                        a7 = vfma(s, vload2(wt, k, f + 7 * L), a7)
                    vstore2(yg, r, f, a0)
                    vstore2(yg, r, f + L, a1)
                    vstore2(yg, r, f + 2 * L, a2)
                    vstore2(yg, r, f + 3 * L, a3)
                    vstore2(yg, r, f + 4 * L, a4)
                    vstore2(yg, r, f + 5 * L, a5)
                    vstore2(yg, r, f + 6 * L, a6)
                    vstore2(yg, r, f + 7 * L, a7)
                    f += 8 * L
                while f + L <= F:
                    a0 = vload(bt, f)
                    for k in range(kkc):
                        a0 = vfma(vsplat(win[0, k]), vload2(wt, k, f), a0)
                    vstore2(yg, r, f, a0)
                    f += L
                for f in range(f, F):
                    a = bt[f]
                    for k in range(kkc):
                        a += win[0, k] * wt[k, f]
                    yg[r, f] = a


@njit(**_JIT)
def conv_direct_dw(x, dy, stride, pt, pl, Ho, Wo, dw, db):
    """x: (T*B, H, W, C), dy: (T*B, Ho*Wo, F) -> dw: (T, K*K*C, F) = sum over the task's output
    pixels of window(x)^T dy (padding entries zeros, multiplied like the GEMM's), db: (T, F) =
    dy summed over the task's pixels. Per image, the windows are gathered into (Ho*Wo, K*K*C
    + 1) rows with a last column of ones (so db is the last row of the same product), summed
    over the image's pixels in order in the data dtype (fused multiply-adds; plain on the
    F mod L last filters); the images' sums are added in float64 (the BLAS GEMM it replaces
    sums all B*Ho*Wo rows in the data dtype)."""
    TB, R, F = dy.shape
    H, W, C = x.shape[1], x.shape[2], x.shape[3]
    T, kkc = dw.shape[0], dw.shape[1]
    B = TB // T
    L = 32 // dy.itemsize
    xf = x.reshape(x.size)
    n = kkc + 1                                                    # window entries and the 1
    win = np.empty((R, n), x.dtype)                                # (R, KKC + 1) one image
    part = np.empty((n, F), dy.dtype)                              # (KKC + 1, F) one image
    acc = np.empty((n, F), np.float64)                             # (KKC + 1, F) one task
    for t in range(T):
        acc[:] = 0.0
        for g in range(t * B, (t + 1) * B):
            for i in range(Ho):
                for j in range(Wo):
                    r = i * Wo + j
                    _window(xf, H, W, C, g, i, j, stride, pt, pl, win, r)
                    win[r, kkc] = 1.0
            _window_t_dy(win, brow(dy, g), L, part)
            for k in range(n):
                for f in range(F):
                    acc[k, f] += part[k, f]
        for k in range(kkc):
            for f in range(F):
                dw[t, k, f] = acc[k, f]
        for f in range(F):
            db[t, f] = acc[kkc, f]


@njit(inline="always")
def _window_t_dy(win, dyg, L, part):
    """part (N, F) <- win^T dyg: win (R, N), dyg (R, F); tiles of 5 rows of part x 2 vectors
    (10 vector accumulators over the R pixels), then 1 row x 2 vectors, 1 x 1, scalar lanes."""
    R, n = win.shape
    F = dyg.shape[1]
    f = 0
    while f + 2 * L <= F:
        k = 0
        while k + 5 <= n:
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = a8 = a9 = vzero(part[0])
            for r in range(R):
                d0, d1 = vload2(dyg, r, f), vload2(dyg, r, f + L)
                s = vsplat(win[r, k])
                a0, a1 = vfma(s, d0, a0), vfma(s, d1, a1)
                s = vsplat(win[r, k + 1])
                a2, a3 = vfma(s, d0, a2), vfma(s, d1, a3)
                s = vsplat(win[r, k + 2])
                a4, a5 = vfma(s, d0, a4), vfma(s, d1, a5)
                s = vsplat(win[r, k + 3])
                a6, a7 = vfma(s, d0, a6), vfma(s, d1, a7)
                s = vsplat(win[r, k + 4])
                a8, a9 = vfma(s, d0, a8), vfma(s, d1, a9)
            vstore2(part, k, f, a0)
            vstore2(part, k, f + L, a1)
            vstore2(part, k + 1, f, a2)
            vstore2(part, k + 1, f + L, a3)
            vstore2(part, k + 2, f, a4)
            vstore2(part, k + 2, f + L, a5)
            vstore2(part, k + 3, f, a6)
            vstore2(part, k + 3, f + L, a7)
            vstore2(part, k + 4, f, a8)
            vstore2(part, k + 4, f + L, a9)
            k += 5
        for k in range(k, n):
            a0 = a1 = vzero(part[0])
            for r in range(R):
                s0 = vsplat(win[r, k])
                a0 = vfma(s0, vload2(dyg, r, f), a0)
                a1 = vfma(s0, vload2(dyg, r, f + L), a1)
            vstore2(part, k, f, a0)
            vstore2(part, k, f + L, a1)
        f += 2 * L
    while f + L <= F:
        for k in range(n):
            a0 = vzero(part[0])
            for r in range(R):
                a0 = vfma(vsplat(win[r, k]), vload2(dyg, r, f), a0)
            vstore2(part, k, f, a0)
        f += L
    zero = np.zeros(1, part.dtype)[0]
    for f in range(f, F):
        for k in range(n):
            a = zero
            for r in range(R):
                a += win[r, k] * dyg[r, f]
            part[k, f] = a
