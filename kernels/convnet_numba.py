"""Numba CPU kernels of the Conv-4 layers: batch norm (batch statistics), ReLU, 2x2 max-pool,
and im2col / col2im for the 3x3 convolution. Called by metacore.layers through
metacore.kernels.convnet, which owns the switch; the NumPy code in metacore.layers is the
ground truth (tests/test_conv_fast.py compares the two).

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
"""
import numpy as np
from numba import njit

# nogil: metacore.taskpool runs tasks of one meta-batch in threads side by side
_JIT = dict(cache=True, error_model="numpy", fastmath=False, nogil=True)


# ---------------------------------------------------------------- batch norm (batch statistics)
@njit(**_JIT)
def bn_forward(x, gamma, beta, eps, xhat, y, mu, var, rstd):
    """x: (T, M, C), gamma, beta: (T, C) -> xhat, y: (T, M, C); mu, var, rstd: (T, C).
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


@njit(**_JIT)
def bn_backward(dy, xhat, rstd, gamma, dx, dgamma, dbeta):
    """dy, xhat: (T, M, C), rstd, gamma: (T, C) -> dx: (T, M, C), dgamma, dbeta: (T, C).
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
                d = np.float64(dy[t, m, c])
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
                dx[t, m, c] = ca[c] * ((np.float64(dy[t, m, c]) - cm[c])
                                       - ck[c] * np.float64(xhat[t, m, c]))


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
