"""Numba CPU kernel: the exact second-order MAML meta-gradient of a ReLU MLP with MSE loss,
for a whole meta-batch in one compiled call (one core, a plain loop over tasks).

Shape letters (this module):
    T tasks, N support points, M query points, P parameters, L linear layers,
    D_l the width entering linear layer l (D_0 inputs, D_L = O outputs), k inner steps.

The network is Linear(D_0, D_1) - ReLU - Linear(D_1, D_2) - ReLU - ... - Linear(D_{L-1}, D_L),
its parameters one flat (P,) vector: layer l's w (D_l, D_{l+1}) row-major at woff[l], its
b (D_{l+1},) at boff[l] (metacore.network.Model's layout). Loss L = mean_{n,o} (y - target)^2.

Math: the recursion of metacore.algorithms.maml (Finn et al. 2017) for scalar alpha and the
same support batch at every inner step:
    theta_{i+1} = theta_i - alpha g_i,   v_k = grad L_query(theta_k),
    v_i = v_{i+1} - alpha H_i v_{i+1}  (i = k-1 .. 0),   grad F = mean_t v_0.
H_i u by Pearlmutter's R-operator, layer by layer (a = layer input, z = pre-activation,
dz = d loss / dz, mask = [z > 0], r-prefixed = R{.} in the direction u, u_w / u_b the
blocks of u):
    forward   rz_l = ra_l w_l + a_l u_w + u_b,   ra_{l+1} = rz_l * mask_l,   ra_0 = 0
    loss      R{dout} = (2 / (N O)) rz_{L-1}
    backward  R{dw} = ra^T dz + a^T rdz,  R{db} = sum_n rdz,
              rdx = rdz w^T + dz u_w^T,   rdz_{l-1} = rdx * mask_{l-1}.
The inner step at theta_i already computes every a, z and dz that H_i needs, so each step's
support pass (a, z, dz and w^T, a few KiB per step) is kept for the reverse sweep: nothing
is recomputed, and H_i u costs the R-forward and R-backward only.

Where the time goes: every matrix product is one call of kernels/small_gemm.py, which keeps
a 2-row by 4-vector block of the output in vector registers for the whole reduction
(explicit 256-bit vectors from kernels/simd.py: Numba's own loop vectoriser re-checks
aliasing at every loop entry and runs scalar tails, which for 40-wide rows cost as much as
the arithmetic). Terms that share an output share one call (a u_w + ra w, a^T rdz + ra^T dz,
rdz w^T + dz u_w^T). x w^T uses a transposed copy of the weights (wt, same offsets as
theta), so that B's rows are contiguous. Weight gradients with fewer outputs than one
vector (the sinusoid net's last layer) are axpys along a's rows instead. The elementwise
loops are compiled with fastmath 'contract' only (a * b + c may become one fused
multiply-add); no reassociation, no finite-math assumptions. Accumulation is in the input
dtype.
"""
import numpy as np
from numba import njit

from .simd import (as_flat, brow, vadd, view1d, view2d, vload2, vstore, vtranspose,
                   vzero)
from .small_gemm import gemm, gemv

FASTMATH = {"contract"}
SECOND_ORDER, FIRST_ORDER, REPTILE = 0, 1, 2       # mlp_maml_gradient's modes


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
    return view2d(th, woff[l], D, H)


@njit(cache=True)
def _wt(wt, woff, dims, l):
    """Layer l's w^T (D_{l+1}, D_l) stored at w's offset in wt."""
    D, H = dims[l], dims[l + 1]
    return view2d(wt, woff[l], H, D)


@njit(cache=True)
def _b(th, boff, dims, l):
    return view1d(th, boff[l], dims[l + 1])


@njit(cache=True)
def _act(buf, off, N, W):
    """(N, W) view of a flat activation buffer at off."""
    return view2d(buf, off, N, W)


@njit(cache=True)
def _transpose_weights(th, dims, woff, wt):
    """wt[woff_l + h D + d] = th[woff_l + d H + h]: w_l^T at w_l's offset (biases untouched).
    Whole L x L tiles go through vector registers (simd.vtranspose), the edges by scalars."""
    L = 32 // th.itemsize
    for l in range(dims.shape[0] - 1):
        D, H, o = dims[l], dims[l + 1], woff[l]
        D0, H0 = D - D % L, H - H % L
        for d in range(0, D0, L):
            for h in range(0, H0, L):
                vtranspose(th, o + d * H + h, H, wt, o + h * D + d, D)
        for d in range(D):
            h_from = H0 if d < D0 else 0
            for h in range(h_from, H):
                wt[o + h * D + d] = th[o + d * H + h]


# ---------------------------------------------------------------- per-layer products
# Every product is one call of the register-tiled kernels/small_gemm.py:
# gemm(A1, B1, A2, B2, two, bias, use_bias, C): C <- [bias] + A1 B1 [+ A2 B2].
# A layer with one output (the sinusoid net's last) is a matrix-vector product: gemv.
@njit(cache=True)
def _affine(a, w, b, z):
    """z (N, H) <- a (N, D) @ w (D, H) + b (H,)."""
    if w.shape[1] == 1:
        gemv(a, as_flat(w), a, as_flat(w), False, b[0], True, as_flat(z))
    else:
        gemm(a, w, a, w, False, b, True, z)


@njit(cache=True)
def _raffine(a, ra, w, uw, ub, rz, first):
    """rz (N, H) <- a @ u_w + u_b, plus ra @ w unless `first` (ra_0 = 0); a, ra (N, D)."""
    if w.shape[1] == 1:
        gemv(a, as_flat(uw), ra, as_flat(w), not first, ub[0], True, as_flat(rz))
    else:
        gemm(a, uw, ra, w, not first, ub, True, rz)


# The ReLU's elementwise steps are one gate, x * [z > 0], run over the (N, H) block as one
# flat loop (one loop entry and one overlap check per block instead of one per row): out of
# place in the forward passes (a = relu(z): x = z; ra = R{a}: x = rz), in place on the
# backward's dx (_mask: out and x one array, which LLVM's overlap check would otherwise
# reject, falling back to scalar code; measured 10% of the whole kernel).
@njit(cache=True, fastmath=FASTMATH)
def _gate(z, x, out):
    """out (N, H) <- x * [z > 0] (x where z > 0, else 0); out must not overlap x or z."""
    zero = z.dtype.type(0)
    zf, xf, of = as_flat(z), as_flat(x), as_flat(out)
    for j in range(zf.shape[0]):
        of[j] = xf[j] if zf[j] > zero else zero


@njit(cache=True, fastmath=FASTMATH)
def _mask(x, z):
    """x (N, D) <- x * [z > 0], in place."""
    zero = x.dtype.type(0)
    xf, zf = as_flat(x), as_flat(z)
    for j in range(xf.shape[0]):
        xf[j] = xf[j] if zf[j] > zero else zero


@njit(cache=True, fastmath=FASTMATH)
def _row_sums(dz, gb):
    """gb (H,) <- sum_n dz (N, H), in increasing n: whole vectors of H in registers, the
    H mod L tail by scalars."""
    N, H = dz.shape
    L = 32 // dz.itemsize
    h = 0
    while h + L <= H:
        acc = vzero(gb)
        for n in range(N):
            acc = vadd(acc, vload2(dz, n, h))
        vstore(gb, h, acc)
        h += L
    zero = gb.dtype.type(0)
    for j in range(h, H):
        acc = zero
        for n in range(N):
            acc += dz[n, j]
        gb[j] = acc


@njit(cache=True, fastmath=FASTMATH)
def _narrow_weight_grad(a, dz, ra, rdz, two, gw):
    """gw (D, H) <- a^T dz [+ ra^T rdz if two] for H below one vector: for each output
    column, axpys along a's contiguous rows (the tiled product would run H scalar chains).
    ra and rdz are not read unless two."""
    N, D = a.shape
    zero = gw.dtype.type(0)
    for h in range(gw.shape[1]):
        for d in range(D):
            gw[d, h] = zero
        for n in range(N):
            s0 = dz[n, h]
            ar = a[n]
            if two:
                q0 = rdz[n, h]
                rr = ra[n]
                for d in range(D):
                    gw[d, h] += ar[d] * s0 + rr[d] * q0
            else:
                for d in range(D):
                    gw[d, h] += ar[d] * s0


@njit(cache=True)
def _weight_grad(a, dz, gw, gb):
    """gw (D, H) <- a^T dz, gb (H,) <- sum_n dz; a (N, D), dz (N, H). Overwrites."""
    if dz.shape[1] * dz.itemsize < 32:
        _narrow_weight_grad(a, dz, a, dz, False, gw)
    else:
        gemm(a.T, dz, a.T, dz, False, gb, False, gw)
    _row_sums(dz, gb)


@njit(cache=True)
def _rweight_grad(a, rdz, ra, dz, hw, hb, first):
    """hw (D, H) <- a^T rdz + ra^T dz (the second term absent if `first`: ra_0 = 0),
    hb (H,) <- sum_n rdz. Overwrites."""
    if dz.shape[1] * dz.itemsize < 32:
        _narrow_weight_grad(a, rdz, ra, dz, not first, hw)
    else:
        gemm(a.T, rdz, ra.T, dz, not first, hb, False, hw)
    _row_sums(rdz, hb)


@njit(cache=True)
def _input_grad(dz, wt, zprev, dx):
    """dx (N, D) <- (dz w^T) * [zprev > 0]; dz (N, H), wt = w^T (H, D), zprev (N, D)."""
    gemm(dz, wt, dz, wt, False, dx[0], False, dx)
    _mask(dx, zprev)


@njit(cache=True)
def _rinput_grad(rdz, dz, wt, ut, zprev, rdx):
    """rdx (N, D) <- (rdz w^T + dz u_w^T) * [zprev > 0]; wt, ut = w^T, u_w^T (H, D)."""
    gemm(rdz, wt, dz, ut, True, rdx[0], False, rdx)
    _mask(rdx, zprev)


# ---------------------------------------------------------------- whole-network passes
@njit(cache=True, fastmath=FASTMATH)
def _forward(th, x, dims, woff, boff, A, aoff, Z, zoff):
    """x: (N, D_0) -> A holds a_0 .. a_{L-1}, Z holds z_0 .. z_{L-1} (z_{L-1} the output)."""
    N = x.shape[0]
    L = dims.shape[0] - 1
    a = _act(A, aoff[0], N, dims[0])
    for n in range(N):
        for d in range(dims[0]):
            a[n, d] = x[n, d]
    for l in range(L):
        D, H = dims[l], dims[l + 1]
        z = _act(Z, zoff[l], N, H)
        _affine(_act(A, aoff[l], N, D), _w(th, woff, dims, l), _b(th, boff, dims, l), z)
        if l < L - 1:
            _gate(z, z, _act(A, aoff[l + 1], N, H))                # a_{l+1} = relu(z_l)


@njit(cache=True, fastmath=FASTMATH)
def _loss_dout(Z, zlast, y, scale, G):
    """MSE of the output z_{L-1} against y (N, O); G[zlast:] <- scale (out - y) = dz_{L-1}.
    -> loss."""
    N, O = y.shape
    acc = Z.dtype.type(0)
    for n in range(N):
        for o in range(O):
            diff = Z[zlast + n * O + o] - y[n, o]
            acc += diff * diff
            G[zlast + n * O + o] = diff * scale
    return acc / (N * O)


@njit(cache=True, fastmath=FASTMATH)
def _backward(N, dims, woff, boff, wt, A, aoff, Z, zoff, G, g):
    """Gradient g (P,) (overwritten) of the loss whose dz_{L-1} is in G at zoff[L-1];
    fills G with every dz_l (same layout as Z), which the R-backward reuses."""
    L = dims.shape[0] - 1
    for l in range(L - 1, -1, -1):
        D, H = dims[l], dims[l + 1]
        dz = _act(G, zoff[l], N, H)
        _weight_grad(_act(A, aoff[l], N, D), dz, _w(g, woff, dims, l), _b(g, boff, dims, l))
        if l > 0:
            _input_grad(dz, _wt(wt, woff, dims, l), _act(Z, zoff[l - 1], N, D),
                        _act(G, zoff[l - 1], N, D))


@njit(cache=True, fastmath=FASTMATH)
def _hvp(th, u, ut, N, dims, woff, boff, wt, A, aoff, Z, zoff, G, scale, rA, rZ, rG, hv):
    """hv (P,) <- H u at th, given th's forward pass (A, Z), backward (G: every dz_l) and
    transposed weights wt; ut = u's weight blocks transposed. rA, rZ, rG are scratch."""
    L = dims.shape[0] - 1
    # ---- R-forward: rz_l = ra_l w + a_l u_w + u_b, ra_0 = 0 (the data does not move)
    for l in range(L):
        D, H = dims[l], dims[l + 1]
        rz = _act(rZ, zoff[l], N, H)
        _raffine(_act(A, aoff[l], N, D), _act(rA, aoff[l], N, D), _w(th, woff, dims, l),
                 _w(u, woff, dims, l), _b(u, boff, dims, l), rz, l == 0)
        if l < L - 1:
            _gate(_act(Z, zoff[l], N, H), rz, _act(rA, aoff[l + 1], N, H))
    # ---- R{dout} = scale R{out}
    zl = zoff[L - 1]
    for j in range(N * dims[L]):
        rG[zl + j] = rZ[zl + j] * scale
    # ---- R-backward, reading the kept dz_l
    for l in range(L - 1, -1, -1):
        D, H = dims[l], dims[l + 1]
        dz, rdz = _act(G, zoff[l], N, H), _act(rG, zoff[l], N, H)
        _rweight_grad(_act(A, aoff[l], N, D), rdz, _act(rA, aoff[l], N, D), dz,
                      _w(hv, woff, dims, l), _b(hv, boff, dims, l), l == 0)
        if l > 0:
            _rinput_grad(rdz, dz, _wt(wt, woff, dims, l), _wt(ut, woff, dims, l),
                         _act(Z, zoff[l - 1], N, D), _act(rG, zoff[l - 1], N, D))


@njit(cache=True)
def _finite_1d(x):
    for j in range(x.shape[0]):
        if not np.isfinite(x[j]):
            return False
    return True


@njit(cache=True)
def _finite_3d(a):
    for t in range(a.shape[0]):
        for n in range(a.shape[1]):
            if not _finite_1d(a[t, n]):
                return False
    return True


@njit(cache=True)
def all_finite(theta, support_x, support_y, query_x, query_y):
    """True if no input holds a NaN or Inf (the wrapper's check, one compiled pass)."""
    return (_finite_1d(theta) and _finite_3d(support_x) and _finite_3d(support_y)
            and _finite_3d(query_x) and _finite_3d(query_y))


@njit(cache=True, fastmath=FASTMATH)
def mlp_maml_gradient(theta, support_x, support_y, query_x, query_y, alpha, steps,
                      dims, woff, boff, mode):
    """MAML-family meta-gradient for every task, unchecked (see kernels/mlp_maml.py).

    theta (P,); support_x (T, N, D_0), support_y (T, N, O), query_x (T, M, D_0),
    query_y (T, M, O), all theta's dtype, C-contiguous; alpha a scalar of theta's dtype;
    steps >= 1 inner SGD steps on the support batch; dims (L+1,) int64 layer widths,
    woff / boff (L,) int64 offsets of each layer's w and b in theta; mode SECOND_ORDER,
    FIRST_ORDER or REPTILE. -> (fresh arrays)
        SECOND_ORDER  query_loss (T,) = L_query_t(theta_k^t), grad (P,) = mean_t v_0^t
        FIRST_ORDER   query_loss (T,), grad (P,) = mean_t v_k^t (first-order MAML)
        REPTILE       loss_0 (T,) = L_support_t(theta), d (P,) = mean_t (theta - theta_k^t),
                      summed as alpha sum_i g_i^t (no cancellation); the query is not read
    """
    T, N = support_x.shape[0], support_x.shape[1]
    M = query_x.shape[1]
    P = theta.shape[0]
    dt = theta.dtype
    total = 0
    for l in range(dims.shape[0]):
        total += dims[l]
    O = dims[dims.shape[0] - 1]
    s_aoff, s_zoff = _offsets(dims, N)
    q_aoff, q_zoff = _offsets(dims, M)
    zlast_s, zlast_q = s_zoff[s_zoff.shape[0] - 1], q_zoff[q_zoff.shape[0] - 1]
    s_scale = dt.type(2.0 / (N * O))   # as mse.py: the float64 ratio, rounded once
    q_scale = dt.type(2.0 / (M * O))
    S = N * total                       # one support pass's a (or z, or dz) buffer
    # kept per inner step i: theta_i and its w^T (row 0 unused: theta and wt0 are step 0),
    # and the support pass a, z, dz at theta_i
    iterates = np.empty((steps, P), dt)
    wts = np.empty((steps, P), dt)
    sA = np.empty((steps, S), dt)
    sZ = np.empty((steps, S), dt)
    sG = np.empty((steps, S), dt)
    rA = np.zeros(S, dt)                # its first block, ra_0 = 0, is never written
    rZ = np.empty(S, dt)
    rG = np.empty(S, dt)
    qA = np.empty(M * total, dt)
    qZ = np.empty(M * total, dt)
    qG = np.empty(M * total, dt)
    wt0 = np.empty(P, dt)               # theta's w^T: the same for every task
    _transpose_weights(theta, dims, woff, wt0)
    th = np.empty(P, dt)
    wtq = np.empty(P, dt)
    g = np.empty(P, dt)
    v = np.empty(P, dt)
    u = np.empty(P, dt)
    ut = np.empty(P, dt)
    hv = np.empty(P, dt)
    qloss = np.empty(T, dt)
    loss0 = np.empty(T, dt)
    gsum = np.zeros(P, dt)
    for t in range(T):
        sx, sy = brow(support_x, t), brow(support_y, t)      # borrowed views: no
        qx, qy = brow(query_x, t), brow(query_y, t)          # reference counting per task
        # ---- inner loop: theta_{i+1} = theta_i - alpha g_i, keeping each step's pass;
        # theta_0 = theta and its w^T are shared by all tasks (no copy)
        for i in range(steps):
            th_i = theta if i == 0 else brow(iterates, i)
            wt_i = wt0 if i == 0 else brow(wts, i)
            if i > 0:
                _transpose_weights(th_i, dims, woff, wt_i)
            A, Z, G = brow(sA, i), brow(sZ, i), brow(sG, i)
            _forward(th_i, sx, dims, woff, boff, A, s_aoff, Z, s_zoff)
            loss = _loss_dout(Z, zlast_s, sy, s_scale, G)
            if i == 0:
                loss0[t] = loss
            _backward(N, dims, woff, boff, wt_i, A, s_aoff, Z, s_zoff, G, g)
            nxt = brow(iterates, i + 1) if i + 1 < steps else th      # theta_{i+1}
            for j in range(P):
                nxt[j] = th_i[j] - alpha * g[j]
            if mode == REPTILE:
                for j in range(P):
                    gsum[j] += alpha * g[j]
        if mode == REPTILE:
            continue
        # ---- query loss and v_k = grad L_query(theta_k), theta_k in th
        _forward(th, qx, dims, woff, boff, qA, q_aoff, qZ, q_zoff)
        qloss[t] = _loss_dout(qZ, zlast_q, qy, q_scale, qG)
        _transpose_weights(th, dims, woff, wtq)
        _backward(M, dims, woff, boff, wtq, qA, q_aoff, qZ, q_zoff, qG, v)
        # ---- v_i = v_{i+1} - alpha H_i v_{i+1}, i = k-1 .. 0 (second order only)
        for i in range(steps - 1 if mode == SECOND_ORDER else -1, -1, -1):
            th_i = theta if i == 0 else brow(iterates, i)
            wt_i = wt0 if i == 0 else brow(wts, i)
            for j in range(P):
                u[j] = alpha * v[j]
            _transpose_weights(u, dims, woff, ut)
            _hvp(th_i, u, ut, N, dims, woff, boff, wt_i, brow(sA, i), s_aoff, brow(sZ, i),
                 s_zoff, brow(sG, i), s_scale, rA, rZ, rG, hv)
            for j in range(P):
                v[j] = v[j] - hv[j]
        for j in range(P):
            gsum[j] += v[j]
    if mode == REPTILE:
        return loss0, gsum / dt.type(T)
    return qloss, gsum / dt.type(T)
