"""Numba CPU kernel: the exact second-order MAML meta-gradient of a ReLU MLP with MSE loss,
for a whole meta-batch in one compiled call (one core, a plain loop over tasks).

Shape letters (this module):
    T tasks, N support points, M query points, P parameters, L linear layers,
    D_l the width entering linear layer l (D_0 inputs, D_L = O outputs).

The network is Linear(D_0, D_1) - ReLU - Linear(D_1, D_2) - ReLU - ... - Linear(D_{L-1}, D_L),
its parameters one flat (P,) vector: layer l's w (D_l, D_{l+1}) row-major at woff[l], its
b (D_{l+1},) at boff[l] (metacore.network.Model's layout). Loss L = mean_{n,o} (y - target)^2.

Math: the recursion of metacore.algorithms.maml (Finn et al. 2017) for scalar alpha and the
same support batch at every inner step:
    theta_{i+1} = theta_i - alpha g_i,   v_k = grad L_query(theta_k),
    v_i = v_{i+1} - alpha H_i v_{i+1}  (i = k-1 .. 0),   grad F = mean_t v_0.
H_i u by Pearlmutter's R-operator, layer by layer (a = layer input, z = pre-activation,
mask = [z > 0], r-prefixed = R{.} in the direction u, u_w / u_b the blocks of u):
    forward   rz_l = ra_l w_l + a_l u_w + u_b,   ra_{l+1} = rz_l * mask_l,   ra_0 = 0
    loss      R{dout} = (2 / (N O)) rz_{L-1}
    backward  R{dw} = ra^T dz + a^T rdz,  R{db} = sum_n rdz,
              rdx = rdz w^T + dz u_w^T,   rdz_{l-1} = rdx * mask_{l-1}.

Why the loops look as they do: fastmath is off (results must follow the NumPy path's
rounding model), so LLVM vectorises only loops without a floating-point reduction. Every
product is therefore written with the contiguous output row as the innermost loop (an axpy),
and the x w^T products use a transposed copy of the weights (wt, same offsets as theta).
Accumulation is in the input dtype.
"""
import numpy as np
from numba import njit


@njit(cache=True)
def _offsets(dims, N):
    """Offsets of a_l (N, D_l) and z_l (N, D_{l+1}) in the flat activation buffers."""
    L = dims.shape[0] - 1
    aoff = np.zeros(L, np.int64)
    zoff = np.zeros(L, np.int64)
    for l in range(1, L):
        aoff[l] = aoff[l - 1] + N * dims[l - 1]
        zoff[l] = zoff[l - 1] + N * dims[l]
    return aoff, zoff


@njit(cache=True)
def _w(th, woff, dims, l):
    """Layer l's w (D_l, D_{l+1}) as a 2-D view of the flat vector."""
    D, H = dims[l], dims[l + 1]
    return th[woff[l]:woff[l] + D * H].reshape(D, H)


@njit(cache=True)
def _wt(wt, woff, dims, l):
    """Layer l's w^T (D_{l+1}, D_l) stored at w's offset in wt."""
    D, H = dims[l], dims[l + 1]
    return wt[woff[l]:woff[l] + D * H].reshape(H, D)


@njit(cache=True)
def _b(th, boff, dims, l):
    return th[boff[l]:boff[l] + dims[l + 1]]


@njit(cache=True)
def _act(buf, off, N, W):
    """(N, W) view of a flat activation buffer at off."""
    return buf[off:off + N * W].reshape(N, W)


@njit(cache=True)
def _transpose_weights(th, dims, woff, wt):
    """wt[woff_l + h D + d] = th[woff_l + d H + h]: w_l^T at w_l's offset (biases untouched)."""
    for l in range(dims.shape[0] - 1):
        w, t = _w(th, woff, dims, l), _wt(wt, woff, dims, l)
        for d in range(w.shape[0]):
            for h in range(w.shape[1]):
                t[h, d] = w[d, h]


@njit(cache=True)
def _forward(th, x, dims, woff, boff, A, aoff, Z, zoff):
    """x: (N, D_0) -> A holds a_0 .. a_{L-1}, Z holds z_0 .. z_{L-1} (z_{L-1} the output)."""
    N = x.shape[0]
    L = dims.shape[0] - 1
    zero = th.dtype.type(0)
    a = _act(A, aoff[0], N, dims[0])
    for n in range(N):
        for d in range(dims[0]):
            a[n, d] = x[n, d]
    for l in range(L):
        D, H = dims[l], dims[l + 1]
        a, z = _act(A, aoff[l], N, D), _act(Z, zoff[l], N, H)
        w, b = _w(th, woff, dims, l), _b(th, boff, dims, l)
        for n in range(N):
            zr = z[n]
            for h in range(H):
                zr[h] = b[h]
            for d in range(D):
                s = a[n, d]
                wr = w[d]
                for h in range(H):
                    zr[h] += s * wr[h]
        if l < L - 1:
            an = _act(A, aoff[l + 1], N, H)
            for n in range(N):
                zr, ar = z[n], an[n]
                for h in range(H):
                    ar[h] = zr[h] if zr[h] > zero else zero


@njit(cache=True)
def _loss_dout(Z, zlast, y, scale, dY):
    """MSE of the output z_{L-1} against y (N, O); dY <- scale (out - y). -> loss."""
    N, O = y.shape
    acc = Z.dtype.type(0)
    for n in range(N):
        for o in range(O):
            diff = Z[zlast + n * O + o] - y[n, o]
            acc += diff * diff
            dY[n * O + o] = diff * scale
    return acc / (N * O)


@njit(cache=True)
def _dw_acc(a, dy, gw):
    """gw (D, H) += a^T dy, a (N, D), dy (N, H): accumulates."""
    for n in range(a.shape[0]):
        dr = dy[n]
        for d in range(a.shape[1]):
            s = a[n, d]
            gr = gw[d]
            for h in range(gr.shape[0]):
                gr[h] += s * dr[h]


@njit(cache=True)
def _db_acc(dy, gb):
    """gb (H,) += sum_n dy (N, H): accumulates."""
    for n in range(dy.shape[0]):
        dr = dy[n]
        for h in range(gb.shape[0]):
            gb[h] += dr[h]


@njit(cache=True)
def _dx_masked(dy, wt, z, dx):
    """dx (N, D) <- (dy w^T) * [z > 0], dy (N, H), wt = w^T (H, D), z (N, D)."""
    zero = dx.dtype.type(0)
    for n in range(dy.shape[0]):
        xr = dx[n]
        for d in range(xr.shape[0]):
            xr[d] = zero
        for h in range(dy.shape[1]):
            s = dy[n, h]
            tr = wt[h]
            for d in range(xr.shape[0]):
                xr[d] += s * tr[d]
        zr = z[n]
        for d in range(xr.shape[0]):
            if not zr[d] > zero:
                xr[d] = zero


@njit(cache=True)
def _backward(N, dims, woff, boff, wt, A, aoff, Z, zoff, dY, dX, g):
    """Gradient of the loss given dY = d loss / d out (N, O) flat; g (P,) is ZEROED first
    then written. dY and dX are scratch (both overwritten)."""
    L = dims.shape[0] - 1
    g[:] = g.dtype.type(0)
    for l in range(L - 1, -1, -1):
        D, H = dims[l], dims[l + 1]
        dy = _act(dY, 0, N, H)
        _dw_acc(_act(A, aoff[l], N, D), dy, _w(g, woff, dims, l))
        _db_acc(dy, _b(g, boff, dims, l))
        if l > 0:
            _dx_masked(dy, _wt(wt, woff, dims, l), _act(Z, zoff[l - 1], N, D),
                       _act(dX, 0, N, D))
            dY, dX = dX, dY


@njit(cache=True)
def _hvp(th, u, ut, N, dims, woff, boff, wt, A, aoff, Z, zoff, y, scale,
         rA, rZ, dY, dX, rdY, rdX, hv):
    """hv (P,) <- H u at th, whose forward pass A, Z and transposed weights wt are given;
    ut = u's weight blocks transposed. hv is ZEROED first. The rest is scratch."""
    L = dims.shape[0] - 1
    zero = hv.dtype.type(0)
    # ---- R forward: rz_l = ra_l w + a_l u_w + u_b, ra_0 = 0 (the data does not move)
    for l in range(L):
        D, H = dims[l], dims[l + 1]
        a, ra = _act(A, aoff[l], N, D), _act(rA, aoff[l], N, D)
        z, rz = _act(Z, zoff[l], N, H), _act(rZ, zoff[l], N, H)
        w, uw, ub = _w(th, woff, dims, l), _w(u, woff, dims, l), _b(u, boff, dims, l)
        for n in range(N):
            rr = rz[n]
            for h in range(H):
                rr[h] = ub[h]
            for d in range(D):
                s = a[n, d]
                wr = uw[d]
                for h in range(H):
                    rr[h] += s * wr[h]
            if l > 0:
                for d in range(D):
                    s = ra[n, d]
                    wr = w[d]
                    for h in range(H):
                        rr[h] += s * wr[h]
        if l < L - 1:
            ran = _act(rA, aoff[l + 1], N, H)
            for n in range(N):
                zr, rr, ar = z[n], rz[n], ran[n]
                for h in range(H):
                    ar[h] = rr[h] if zr[h] > zero else zero
    # ---- loss: dout = scale (out - y), R{dout} = scale R{out}
    zl, O = zoff[L - 1], dims[L]
    for n in range(N):
        for o in range(O):
            dY[n * O + o] = (Z[zl + n * O + o] - y[n, o]) * scale
            rdY[n * O + o] = rZ[zl + n * O + o] * scale
    # ---- backward carrying d and R{d}
    hv[:] = zero
    for l in range(L - 1, -1, -1):
        D, H = dims[l], dims[l + 1]
        dy, rdy = _act(dY, 0, N, H), _act(rdY, 0, N, H)
        hw = _w(hv, woff, dims, l)
        _dw_acc(_act(A, aoff[l], N, D), rdy, hw)
        if l > 0:
            _dw_acc(_act(rA, aoff[l], N, D), dy, hw)
        _db_acc(rdy, _b(hv, boff, dims, l))
        if l > 0:
            zp = _act(Z, zoff[l - 1], N, D)
            wtl, utl = _wt(wt, woff, dims, l), _wt(ut, woff, dims, l)
            dx, rdx = _act(dX, 0, N, D), _act(rdX, 0, N, D)
            _dx_masked(dy, wtl, zp, dx)
            for n in range(N):           # rdx = rdy w^T + dy u_w^T, then the same mask
                xr = rdx[n]
                for d in range(D):
                    xr[d] = zero
                for h in range(H):
                    rs, s = rdy[n, h], dy[n, h]
                    tr, vr = wtl[h], utl[h]
                    for d in range(D):
                        xr[d] += rs * tr[d] + s * vr[d]
                zr = zp[n]
                for d in range(D):
                    if not zr[d] > zero:
                        xr[d] = zero
            dY, dX = dX, dY
            rdY, rdX = rdX, rdY


@njit(cache=True, fastmath=False)
def mlp_maml_gradient(theta, support_x, support_y, query_x, query_y, alpha, steps,
                      dims, woff, boff):
    """Second-order MAML meta-gradient for every task, unchecked (see kernels/mlp_maml.py).

    theta (P,); support_x (T, N, D_0), support_y (T, N, O), query_x (T, M, D_0),
    query_y (T, M, O), all theta's dtype, C-contiguous; alpha a scalar of theta's dtype;
    steps >= 1 inner SGD steps on the support batch; dims (L+1,) int64 layer widths,
    woff / boff (L,) int64 offsets of each layer's w and b in theta.
    -> query_loss (T,) = L_query_t(theta_k^t), grad (P,) = mean_t v_0^t (fresh arrays).
    """
    T, N = support_x.shape[0], support_x.shape[1]
    M = query_x.shape[1]
    P = theta.shape[0]
    O = dims[dims.shape[0] - 1]
    dt = theta.dtype
    NM = max(N, M)
    width = 0
    total = 0
    for l in range(dims.shape[0]):
        width = max(width, dims[l])
        total += dims[l]
    s_aoff, s_zoff = _offsets(dims, N)
    q_aoff, q_zoff = _offsets(dims, M)
    s_scale = dt.type(2.0 / (N * O))   # as mse.py: the float64 ratio, rounded once
    q_scale = dt.type(2.0 / (M * O))
    # scratch: support and query activations kept apart, so that the support pass at
    # theta_{k-1} is still there when the backward sweep starts
    sA = np.empty(N * total, dt)
    sZ = np.empty(N * total, dt)
    rA = np.empty(N * total, dt)
    rZ = np.empty(N * total, dt)
    qA = np.empty(M * total, dt)
    qZ = np.empty(M * total, dt)
    b1 = np.empty(NM * width, dt)
    b2 = np.empty(NM * width, dt)
    b3 = np.empty(NM * width, dt)
    b4 = np.empty(NM * width, dt)
    iterates = np.empty((steps, P), dt)        # theta_0 .. theta_{k-1} of one task
    th = np.empty(P, dt)
    wt = np.empty(P, dt)                        # w^T blocks at the support iterate
    wtq = np.empty(P, dt)                       # w^T blocks at theta_k (query pass)
    g = np.empty(P, dt)
    v = np.empty(P, dt)
    u = np.empty(P, dt)
    ut = np.empty(P, dt)
    hv = np.empty(P, dt)
    qloss = np.empty(T, dt)
    gsum = np.zeros(P, dt)
    for t in range(T):
        sx, sy, qx, qy = support_x[t], support_y[t], query_x[t], query_y[t]
        # ---- inner loop: theta_{i+1} = theta_i - alpha g_i
        th[:] = theta
        for i in range(steps):
            iterates[i, :] = th
            _forward(th, sx, dims, woff, boff, sA, s_aoff, sZ, s_zoff)
            _loss_dout(sZ, s_zoff[s_zoff.shape[0] - 1], sy, s_scale, b1)
            _transpose_weights(th, dims, woff, wt)
            _backward(N, dims, woff, boff, wt, sA, s_aoff, sZ, s_zoff, b1, b2, g)
            for j in range(P):
                th[j] = th[j] - alpha * g[j]
        # ---- query loss and v_k = grad L_query(theta_k)
        _forward(th, qx, dims, woff, boff, qA, q_aoff, qZ, q_zoff)
        qloss[t] = _loss_dout(qZ, q_zoff[q_zoff.shape[0] - 1], qy, q_scale, b1)
        _transpose_weights(th, dims, woff, wtq)
        _backward(M, dims, woff, boff, wtq, qA, q_aoff, qZ, q_zoff, b1, b2, v)
        # ---- v_i = v_{i+1} - alpha H_i v_{i+1}, i = k-1 .. 0
        for i in range(steps - 1, -1, -1):
            th[:] = iterates[i]
            if i < steps - 1:        # sA, sZ and wt already hold the pass at theta_{k-1}
                _forward(th, sx, dims, woff, boff, sA, s_aoff, sZ, s_zoff)
                _transpose_weights(th, dims, woff, wt)
            for j in range(P):
                u[j] = alpha * v[j]
            _transpose_weights(u, dims, woff, ut)
            _hvp(th, u, ut, N, dims, woff, boff, wt, sA, s_aoff, sZ, s_zoff, sy, s_scale,
                 rA, rZ, b1, b2, b3, b4, hv)
            for j in range(P):
                v[j] = v[j] - hv[j]
        for j in range(P):
            gsum[j] += v[j]
    return qloss, gsum / dt.type(T)
