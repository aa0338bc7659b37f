"""Episodic distances and the ProtoNet loss: Numba CPU backend.

Shape letters (this module):
    T tasks, Q queries per task, N supports (or prototypes) per task, D features.

Same conventions as `metacore.reference.distance` (read its docstring: EPS, sign(0) = 0,
logits). Inputs are assumed checked by `metacore.kernels.distance`; this module only makes
them contiguous.

How the kernels differ from the reference (routing by size: see "public functions"):
  * Direct squared Euclidean is the difference formula sum_k (q_k - s_k)^2, never the bare
    expansion |q|^2 + |s|^2 - 2 q.s: for points near 1e4 separated by 1e-2 the expansion
    in float32 loses every digit (|q|^2 ~ 1e9 against d ~ 1e-3). The direct formula has
    relative error at most (D + 2) eps for any inputs (every summand is non-negative).
  * From Q N D >= GEMM_TERMS (the 20-way episode and up) the squared Euclidean forward,
    backward and ProtoNet loss go through BLAS GEMMs inside Numba after centring both sets
    on the task mean: the forward recomputes every pair whose expansion cancels more than
    one bit by the direct formula; the backward, 2 (r_i q'_i - sum_j g_ij s'_j), keeps a
    row only if two a priori tests show its error within a constant of the direct
    formula's, and recomputes it directly otherwise (bounds and tests above _centre). The
    cosine's dot products and its backward's products are plain GEMMs there (their error
    bound is relative to sum |q_k s_k| in any order). From Q N D >= BLAS_TERMS the same
    route calls its three GEMMs through NumPy's BLAS from Python and does the ProtoNet
    loss's softmax in NumPy ("BLAS route", above all_finite).
  * Result sums are never reassociated (fastmath at most contracts a*b + c into one FMA),
    so the vectorized loops run over independent outputs: the queries (forward, reading q
    transposed) or the features k (backward), each output summed in order. Only the sums
    of non-negative terms (norms) and the GEMM route's test values, whose bounds hold in
    any order, are reassociated.
  * Small (episodic) problems run serial kernels, one compiled call per op: no thread
    launch and no copies of g; the ProtoNet loss with squared Euclidean or L1 is one fused
    call (distances, softmax cross-entropy, both gradients) per batch of tasks.
  * all_finite: one compiled finiteness probe over several arrays, which the entry
    module's host fast path uses in place of one NumPy reduction per array.
  * Everything accumulates in the input dtype (float32 stays float32); the direct formulas
    meet the per-dtype tolerances of tests/test_distance.py without float64 accumulation.
"""
import numpy as np
from numba import njit, prange

EPS = 1e-8
QB = 16     # queries per parallel work item in the forward kernel
NB = 128    # supports per tile of sT (D * NB values, L2-resident); measured best of 32..1024


# ---------------------------------------------------------------- forward kernels
@njit(inline="always")
def _term(mode, a, b):
    """The per-feature term summed by forward mode 0 (sqeuclidean), 1 (L1), 2 (dot)."""
    if mode == 0:
        dif = a - b
        return dif * dif
    if mode == 1:
        return abs(a - b)
    return a * b


@njit(parallel=True, fastmath=False, cache=True)
def _pair_fwd(q, sT, mode, out):
    """q: (T, Q, D), sT: (T, D, N) -> out: (T, Q, N) = sum_k term(q_ik, s_jk), overwritten.

    Work item: QB queries of one task. For each tile of NB supports, RB = 4 queries at a
    time share each load of sT[k, j] and update a (4, NB) accumulator that stays in L1; the
    loop over j is the vectorized one (independent accumulators, sum over k in order)."""
    T, Q, D = q.shape
    N = sT.shape[2]
    nib = (Q + QB - 1) // QB
    for b in prange(T * nib):
        t = b // nib
        i0 = (b - t * nib) * QB
        i1 = min(i0 + QB, Q)
        acc = np.empty((4, NB), dtype=out.dtype)
        for j0 in range(0, N, NB):
            nj = min(NB, N - j0)
            for ib in range(i0, i1, 4):
                m = min(4, i1 - ib)
                acc[:] = 0
                if m == 4:
                    for k in range(D):
                        q0 = q[t, ib, k]
                        q1 = q[t, ib + 1, k]
                        q2 = q[t, ib + 2, k]
                        q3 = q[t, ib + 3, k]
                        for j in range(nj):
                            sv = sT[t, k, j0 + j]
                            acc[0, j] += _term(mode, q0, sv)
                            acc[1, j] += _term(mode, q1, sv)
                            acc[2, j] += _term(mode, q2, sv)
                            acc[3, j] += _term(mode, q3, sv)
                else:
                    for ii in range(m):
                        for k in range(D):
                            qk = q[t, ib + ii, k]
                            for j in range(nj):
                                acc[ii, j] += _term(mode, qk, sT[t, k, j0 + j])
                for ii in range(m):
                    for j in range(nj):
                        out[t, ib + ii, j0 + j] = acc[ii, j]


@njit(parallel=True, fastmath=False, cache=True)
def _clamped_norms(x, eps, out_norm, out_on):
    """x: (T, M, D) -> out_norm: (T, M) = max(|x|, eps), out_on: (T, M) = 1 if |x| > eps."""
    T, M, D = x.shape
    for b in prange(T * M):
        t = b // M
        m = b - t * M
        acc = eps * 0
        for k in range(D):
            acc += x[t, m, k] * x[t, m, k]
        n = np.sqrt(acc)
        if n > eps:
            out_norm[t, m] = n
            out_on[t, m] = 1
        else:
            out_norm[t, m] = eps
            out_on[t, m] = 0


# ---------------------------------------------------------------- backward kernels
# mode selects the per-pair factor f(q_k - s_k) summed with weight g:
#   0: 2 (q_k - s_k)   (squared Euclidean)
#   1: sign(q_k - s_k) (L1, sign(0) = 0)
#   2: s_k             (dot product; for dq) / q_k (for ds) -- handled as "other" vector
@njit(parallel=True, fastmath=False, cache=True)
def _pair_grad(g, a, b, mode, out):
    """Sum over the partner axis: out[t, i, :] = sum_j g[t, i, j] * f(a[t, i, :], b[t, j, :]).

    g: (T, A, B), a: (T, A, D), b: (T, B, D) -> out: (T, A, D), overwritten.
    f = 2 (a - b) for mode 0, sign(a - b) for mode 1, b for mode 2. Called with (g, q, s)
    for dq, and with (g^T, s, q) for ds, since ds_j = sum_i g_ij f(s_j, q_i) for all three."""
    T, A, D = a.shape
    B = b.shape[1]
    for p in prange(T * A):
        t = p // A
        i = p - t * A
        ai = a[t, i]
        oi = out[t, i]
        for k in range(D):
            oi[k] = 0
        for j in range(B):
            gij = g[t, i, j]
            bj = b[t, j]
            if mode == 0:
                for k in range(D):
                    oi[k] += gij * (ai[k] - bj[k])
            elif mode == 1:
                for k in range(D):
                    oi[k] += gij * np.sign(ai[k] - bj[k])
            else:
                for k in range(D):
                    oi[k] += gij * bj[k]
        if mode == 0:
            for k in range(D):
                oi[k] += oi[k]          # the factor 2, exact


@njit(parallel=True, fastmath=False, cache=True)
def _softmax_ce(logits, y, w, loss_rows, dlogits, pred):
    """One query row at a time: loss, gradient and argmax of softmax cross-entropy.

    logits: (T, Q, N), y: (T, Q), w: (T,) per-task weight (upstream gradient / Q)
    -> loss_rows: (T, Q) = logsumexp(logits) - logits[y], dlogits: (T, Q, N) =
    w * (softmax - onehot(y)), pred: (T, Q) first argmax; all overwritten."""
    T, Q, N = logits.shape
    for p in prange(T * Q):
        t = p // Q
        i = p - t * Q
        row = logits[t, i]
        m = row[0]
        am = 0
        for j in range(1, N):
            if row[j] > m:
                m = row[j]
                am = j
        z = row[0] * 0
        for j in range(N):
            z += np.exp(row[j] - m)
        lz = np.log(z)
        yi = y[t, i]
        loss_rows[t, i] = lz + m - row[yi]
        wt = w[t]
        drow = dlogits[t, i]
        for j in range(N):
            drow[j] = wt * np.exp(row[j] - m - lz)
        drow[yi] -= wt
        pred[t, i] = am


# ---------------------------------------------------------------- small-size kernels
# Episodic sizes (Q, N ~ 5..300, D = 64) are over in microseconds, so per-call costs
# dominate: a prange launch, transposed copies of g, one NumPy temporary per step. The
# kernels below are serial and keep every vectorized loop free of reductions (fastmath may
# only contract a*b+c into an FMA, one rounding instead of two, never reorder a sum):
#   forward   for each support j and feature k, a loop over the queries i reading
#             qT[k, :] (the queries transposed, (T, D, Q)): independent sums, each over k
#             in order, exactly the direct formula's
#   backward  for each output row, a loop over k of out[k] += w f(a_k, b_k), summed over
#             the partners in order
# The metric's branch sits outside every vectorized loop.
FM = {"contract"}


@njit(inline="always")
def _fwd_task(qTt, st, mode, acc, out_t):
    """qTt: (D, Q), st: (N, D) -> out_t: (Q, N) = sum_k term(q_ik, s_jk) for mode 0
    (squared difference), 1 (absolute difference), 2 (product); acc: (>= Q,) scratch.
    The mode test sits outside the vectorized loop over i."""
    D, Q = qTt.shape
    N = st.shape[0]
    for j in range(N):
        for i in range(Q):
            acc[i] = 0
        for k in range(D):
            sk = st[j, k]
            row = qTt[k]
            if mode == 0:
                for i in range(Q):
                    dif = row[i] - sk
                    acc[i] += dif * dif
            elif mode == 1:
                for i in range(Q):
                    acc[i] += abs(row[i] - sk)
            else:
                for i in range(Q):
                    acc[i] += row[i] * sk
        for i in range(Q):
            out_t[i, j] = acc[i]


@njit(fastmath=FM, cache=True)
def _rows_grad(g, a, b, mode, trans, double, out):
    """Serial _pair_grad: out[t, i, :] = c sum_j G[t, i, j] f(a[t, i, :], b[t, j, :]) with
    G = g (trans False) or g^T (trans True, read in place), c = 2 if double else 1, and
    f = a - b (mode 0), sign(a - b) (mode 1), b (mode 2)."""
    T, A, D = a.shape
    B = b.shape[1]
    for t in range(T):
        for i in range(A):
            oi = out[t, i]
            ai = a[t, i]
            for k in range(D):
                oi[k] = 0
            for j in range(B):
                w = g[t, j, i] if trans else g[t, i, j]
                bj = b[t, j]
                if mode == 0:
                    for k in range(D):
                        oi[k] += w * (ai[k] - bj[k])
                elif mode == 1:
                    for k in range(D):
                        oi[k] += w * np.sign(ai[k] - bj[k])
                else:
                    for k in range(D):
                        oi[k] += w * bj[k]
            if double:
                for k in range(D):
                    oi[k] += oi[k]          # the factor 2, exact


@njit(fastmath=FM, cache=True)
def _fused_loss(q, s, y, w, mode, sc, loss, dq, ds, pred):
    """The ProtoNet loss for a distance metric (mode 0: squared Euclidean, 1: L1) in one
    call: distances, softmax cross-entropy, gradients.

    logits = -sc d; w: (T,) weight of each task's row losses (upstream gradient / Q).
    With p the softmax of the row: gd_ij = d loss / d d_ij = -sc w (p_ij - [j = y_i]),
    times 2 for the squared Euclidean's factor 2 (q - s); then dq_i = sum_j gd_ij f(q_i, s_j)
    and ds_j = sum_i gd_ij f(s_j, q_i) (= -f(q_i, s_j)) by the serial backward kernel.
    -> loss (T,) = mean over the task's rows, dq, ds, pred (T, Q); all overwritten."""
    T, Q, D = q.shape
    N = s.shape[1]
    acc = np.empty(Q, q.dtype)
    qT = np.empty((D, Q), q.dtype)
    d = np.empty((Q, N), q.dtype)
    gd = np.empty((T, Q, N), q.dtype)
    two = sc - sc + 2
    for t in range(T):
        for i in range(Q):
            for k in range(D):
                qT[k, i] = q[t, i, k]
        _fwd_task(qT, s[t], mode, acc, d)                         # d: (Q, N)
        lsum = sc - sc
        c0 = -sc * w[t]                                           # d loss / d d at p = 1
        if mode == 0:
            c0 = c0 * two
        for i in range(Q):
            m = -sc * d[i, 0]
            am = 0
            for j in range(1, N):
                v = -sc * d[i, j]
                if v > m:
                    m = v
                    am = j
            g = gd[t, i]
            zs = m - m
            for j in range(N):                                    # one exp per entry
                e = np.exp(-sc * d[i, j] - m)
                g[j] = e
                zs += e
            yi = y[t, i]
            lsum += np.log(zs) + m + sc * d[i, yi]
            pred[t, i] = am
            c = c0 / zs
            for j in range(N):
                g[j] *= c
            g[yi] -= c0
        loss[t] = lsum / Q
    _rows_grad(gd, q, s, mode, False, False, dq)
    _rows_grad(gd, s, q, mode, True, False, ds)


@njit(fastmath=FM, cache=True)
def _small_fwd(q, s, mode, out):
    """Serial forward in one call: q: (T, Q, D), s: (T, N, D) -> out: (T, Q, N), overwritten;
    each task's queries are transposed into a scratch (D, Q) here, not by a NumPy copy."""
    T, Q, D = q.shape
    acc = np.empty(Q, out.dtype)
    qT = np.empty((D, Q), q.dtype)
    for t in range(T):
        for i in range(Q):
            for k in range(D):
                qT[k, i] = q[t, i, k]
        _fwd_task(qT, s[t], mode, acc, out[t])


@njit(fastmath=FM, cache=True)
def _small_grad(g, q, s, mode, dq, ds):
    """Serial backward in one call: dq and ds of _rows_grad (factor 2 for mode 0)."""
    _rows_grad(g, q, s, mode, False, mode == 0, dq)
    _rows_grad(g, s, q, mode, True, mode == 0, ds)       # f(s - q) = -f(q - s)


# ---------------------------------------------------------------- GEMM route
# Squared Euclidean forward and backward through BLAS (np.dot inside Numba calls the
# GEMM), one task at a time, after centring both sets on the task's mean point mu
# (d and its gradients are translation invariant; centring turns points far from the
# origin but close to each other into small vectors). Error bounds, eps the unit roundoff
# of the dtype, q' = q - mu, s' = s - mu:
#   forward   v = |q'|^2 + |s'|^2 - 2 q'.s' has |v - d| <= (2D + 3) eps (|q'|^2 + |s'|^2)
#             (two norms and a dot product of D terms each, then two additions). Kept where
#             TAU v >= |q'|^2 + |s'|^2, a relative error of at most TAU (2D + 3) eps; every
#             other pair (v <= 0 included, so q == s gives exactly 0) is recomputed by the
#             direct formula, relative error (D + 2) eps.
#   backward  dq_i = 2 u_i, u_i = r_i q'_i - sum_j g_ij s'_j, r_i = sum_j g_ij. With
#             gam = (N + 4) eps, R_i = sum_j |g_ij|, its rounding error obeys
#               elementwise  |err_ik| <= gam (R_i |q'_ik| + sum_j |g_ij| |s'_jk|)
#                                     <= gam R_i (|q'_ik| + S_k),   S_k = max_j |s'_jk|
#               normwise     |err_i| <= gam L_i,  L_i = R_i |q'_i| + sum_j |g_ij| |s'_j|
#             and the direct formula's a priori bounds are gam R_i M_ik elementwise, with
#             M_ik = max_j |q_ik - s_jk| = |q'_ik - c_k| + h_k exactly (c_k, h_k the centre
#             and half-width of the s'_jk: O(D) per row), and gam sum_j |g_ij| |q_i - s_j|
#             normwise, which is >= |u_i|. A row keeps the GEMM result only if
#               (1) |q'_ik| + S_k <= KAPPA M_ik for every k, and
#               (2) L_i (1 + KAPPA_ROW gam) <= KAPPA_ROW |u_i computed|,
#             so that its error is within KAPPA (elementwise, R-weighted) and KAPPA_ROW
#             (normwise, g-weighted: the case of a gradient concentrated on near partners
#             far from mu) times the direct formula's bound; other rows (near-duplicate
#             points, a single support, two distant tight clusters) are recomputed by the
#             direct formula. ds likewise with q and s swapped.
#   Centring rounds q - mu once per element (exact where q_k and mu_k are within a factor
#   2, Sterbenz), moving each result by at most about 2 eps of its terms.
@njit(fastmath=False, cache=True)
def _centre(qt, st):
    """qt: (Q, D), st: (N, D) -> q' = qt - mu, s' = st - mu, with mu the mean of all Q + N
    points, summed in float64 and rounded to the dtype once."""
    Q, D = qt.shape
    N = st.shape[0]
    acc = np.zeros(D, np.float64)
    for i in range(Q):
        for k in range(D):
            acc[k] += qt[i, k]
    for j in range(N):
        for k in range(D):
            acc[k] += st[j, k]
    mu = np.empty(D, qt.dtype)
    for k in range(D):
        mu[k] = acc[k] / (Q + N)
    qc = np.empty((Q, D), qt.dtype)
    sc = np.empty((N, D), qt.dtype)
    for i in range(Q):
        for k in range(D):
            qc[i, k] = qt[i, k] - mu[k]
    for j in range(N):
        for k in range(D):
            sc[j, k] = st[j, k] - mu[k]
    return qc, sc


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _row_sq_norms(x):
    """x: (M, D) -> (M,) = |x_m|^2. Reassociated (vectorized): every term is non-negative,
    so any summation order keeps the relative error within (D - 1) eps."""
    M, D = x.shape
    out = np.empty(M, x.dtype)
    for m in range(M):
        v = x[m, 0] * 0
        for k in range(D):
            v += x[m, k] * x[m, k]
        out[m] = v
    return out


@njit(fastmath=False, cache=True)
def _gemm_fwd_task(qt, st, qc, sc, tau, out_t):
    """d = |q'|^2 + |s'|^2 - 2 q' s'^T (one GEMM), cancelling pairs recomputed directly
    from qt: (Q, D), st: (N, D) (see the bound above). -> out_t: (Q, N), overwritten."""
    Q, D = qt.shape
    N = st.shape[0]
    G = np.dot(qc, sc.T)                                   # (Q, N)
    nq = _row_sq_norms(qc)
    ns = _row_sq_norms(sc)
    nbad = 0
    for i in range(Q):                                     # branch-free, vectorized
        oi = out_t[i]
        gi = G[i]
        for j in range(N):
            big = nq[i] + ns[j]
            v = big - (gi[j] + gi[j])
            oi[j] = v
            nbad += tau * v < big
    if nbad:
        for i in range(Q):
            for j in range(N):
                big = nq[i] + ns[j]
                if tau * out_t[i, j] < big:
                    v = big * 0
                    for k in range(D):
                        dif = qt[i, k] - st[j, k]
                        v += dif * dif
                    out_t[i, j] = v


@njit(fastmath=False, cache=True)
def _gemm_grad_side(gt, trans, at, bt, ac, bc, P, r, ra, wb, an, kappa, kappa_row, gam,
                    out_t):
    """One side of the GEMM backward: out_i = 2 u_i, u_i = r_i a'_i - P_i, P = G b'
    (G = gt, or gt^T when trans), r_i = sum_j G_ij; rows failing either test (see above
    _centre) recomputed directly: out_i = 2 sum_j G_ij (a_i - b_j).
    at/ac: (A, D) original / centred, bt/bc: (B, D); ra_i = sum_j |G_ij|,
    wb_i = sum_j |G_ij| |b'_j|, an_i = |a'_i|; gam = (B + 4) eps."""
    A, D = ac.shape
    B = bc.shape[0]
    hi = bc[0].copy()
    lo = bc[0].copy()
    for j in range(1, B):
        for k in range(D):
            hi[k] = max(hi[k], bc[j, k])
            lo[k] = min(lo[k], bc[j, k])
    cen = (hi + lo) * 0.5                                  # (D,) centre of the b'_jk
    half = (hi - lo) * 0.5                                 # (D,) half-width
    smax = np.maximum(np.abs(hi), np.abs(lo))              # (D,) max_j |b'_jk|
    nbad, un2 = _gemm_rows(ac, P, r, smax, cen, half, kappa, out_t)
    on = np.sqrt(un2)                                      # (A,) |u_i|
    for i in range(A):
        lhs = ra[i] * an[i] + wb[i]                        # a priori bound / gam on |u_i|
        if (nbad[i] == 0 and on[i] < np.inf           # |u|^2 overflowed: direct, safe
                and lhs * (1 + kappa_row * gam) <= kappa_row * on[i]):
            continue
        oi = out_t[i]                                      # either test failed: direct
        for k in range(D):
            oi[k] = 0
        ao = at[i]
        for j in range(B):
            w = gt[j, i] if trans else gt[i, j]
            if w == 0:          # adds +-0 to a sum that starts at +0: skipping it is exact,
                continue        # and after a softmax most of a row's weights are 0
            bj = bt[j]
            for k in range(D):
                oi[k] += w * (ao[k] - bj[k])
        for k in range(D):
            oi[k] += oi[k]


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _gemm_rows(ac, P, r, smax, cen, half, kappa, out_t):
    """The GEMM form of every row in one vectorized pass: out_t[i] = 2 u_i with
    u_i = r_i a'_i - P_i (one FMA per entry: at least as accurate as the bound assumes)
    -> nbad: (A,) the number of k failing the elementwise test |a'_ik| + S_k > KAPPA M_ik,
    un2: (A,) |u_i|^2. Reassociated: only those two are reductions (a count, and a norm
    that only needs a few correct bits)."""
    A, D = ac.shape
    nbad = np.empty(A, np.int64)
    un2 = np.empty(A, ac.dtype)
    for i in range(A):
        ri = r[i]
        ai = ac[i]
        pi = P[i]
        oi = out_t[i]
        nb = 0
        acc = ri * 0
        for k in range(D):
            a = ai[k]
            v = ri * a - pi[k]
            oi[k] = v + v
            acc += v * v
            nb += abs(a) + smax[k] > kappa * (abs(a - cen[k]) + half[k])
        nbad[i] = nb
        un2[i] = acc
    return nbad, un2


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _row_col_sums(gt, nq, ns):
    """gt: (Q, N), nq: (Q,), ns: (N,) norms -> row and column sums of gt, of |gt|, and of
    |gt| weighted by the partner's norm, each (Q,) or (N,) in the dtype. Reassociated: the
    backward's bounds allow (N + 4) eps sum_j |g_ij| for the sums, and the test values
    need only a few correct bits (an overflow to inf fails the test: safe)."""
    Q, N = gt.shape
    rq = np.empty(Q, gt.dtype)
    aq = np.empty(Q, gt.dtype)
    wq = np.empty(Q, gt.dtype)
    rs = np.zeros(N, gt.dtype)
    as_ = np.zeros(N, gt.dtype)
    ws = np.zeros(N, gt.dtype)
    for i in range(Q):
        gi = gt[i]
        ni = nq[i]
        v = gi[0] * 0
        av = v
        wv = v
        for j in range(N):
            x = gi[j]
            ax = abs(x)
            v += x
            av += ax
            wv += ax * ns[j]
            rs[j] += x
            as_[j] += ax
            ws[j] += ax * ni
        rq[i] = v
        aq[i] = av
        wq[i] = wv
    return rq, rs, aq, as_, wq, ws


@njit(fastmath={"reassoc", "contract"}, cache=True)
def _norms(x):
    """x: (M, D) -> (M,) Euclidean norms in the dtype (reassociated; test values only)."""
    M, D = x.shape
    out = np.empty(M, x.dtype)
    for m in range(M):
        v = x[m, 0] * 0
        for k in range(D):
            v += x[m, k] * x[m, k]
        out[m] = np.sqrt(v)
    return out


@njit(fastmath=False, cache=True)
def _gemm_grad_task(gt, qt, st, qc, sc, kappa, kappa_row, dq_t, ds_t):
    """gt: (Q, N) -> dq_t: (Q, D), ds_t: (N, D) by two GEMMs (see the bound above)."""
    eps = np.finfo(qt.dtype).eps
    nq = _norms(qc)
    ns = _norms(sc)
    rq, rs, aq, as_, wq, ws = _row_col_sums(gt, nq, ns)
    _gemm_grad_side(gt, False, qt, st, qc, sc, np.dot(gt, sc), rq, aq, wq, nq, kappa,
                    kappa_row, (st.shape[0] + 4) * eps, dq_t)
    _gemm_grad_side(gt, True, st, qt, sc, qc, np.dot(gt.T, qc), rs, as_, ws, ns, kappa,
                    kappa_row, (qt.shape[0] + 4) * eps, ds_t)


@njit(fastmath=False, cache=True)
def _gemm_fwd(q, s, tau, out):
    """q: (T, Q, D), s: (T, N, D) -> out: (T, Q, N), the GEMM route, overwritten."""
    for t in range(q.shape[0]):
        qc, sc = _centre(q[t], s[t])
        _gemm_fwd_task(q[t], s[t], qc, sc, tau, out[t])


@njit(fastmath=False, cache=True)
def _gemm_grad(g, q, s, kappa, kappa_row, dq, ds):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D), the GEMM route, overwritten."""
    for t in range(q.shape[0]):
        qc, sc = _centre(q[t], s[t])
        _gemm_grad_task(g[t], q[t], s[t], qc, sc, kappa, kappa_row, dq[t], ds[t])


@njit(fastmath=False, cache=True)
def _gemm_loss(q, s, y, w, sc_, tau, kappa, kappa_row, loss, dq, ds, pred):
    """The squared-Euclidean ProtoNet loss through the GEMM route in one call (same
    contract as _fused_loss with mode 0): centre once per task, forward, softmax
    cross-entropy, backward."""
    T, Q, D = q.shape
    N = s.shape[1]
    d = np.empty((Q, N), q.dtype)
    gd = np.empty((Q, N), q.dtype)
    for t in range(T):
        qc, sc = _centre(q[t], s[t])
        _gemm_fwd_task(q[t], s[t], qc, sc, tau, d)
        lsum = sc_ - sc_
        c0 = -sc_ * w[t]                       # d loss / d d at p = 1 (the 2 is the GEMM's)
        for i in range(Q):
            m = -sc_ * d[i, 0]
            am = 0
            for j in range(1, N):
                v = -sc_ * d[i, j]
                if v > m:
                    m = v
                    am = j
            zs = m - m
            for j in range(N):
                e = np.exp(-sc_ * d[i, j] - m)
                gd[i, j] = e
                zs += e
            yi = y[t, i]
            lsum += np.log(zs) + m + sc_ * d[i, yi]
            pred[t, i] = am
            c = c0 / zs
            for j in range(N):
                gd[i, j] *= c
            gd[i, yi] -= c0
        loss[t] = lsum / Q
        _gemm_grad_task(gd, q[t], s[t], qc, sc, kappa, kappa_row, dq[t], ds[t])


# ---------------------------------------------------------------- BLAS route (large sizes)
# From Q N D >= BLAS_TERMS the same centred GEMM route runs with its three GEMMs called from
# Python through NumPy's BLAS (the library NumPy was built with) instead of np.dot inside
# Numba (SciPy's BLAS), and the ProtoNet loss's softmax cross-entropy in NumPy (vectorized
# exp; Numba's scalar exp loop cost about as much as a third GEMM at Q = N = 2000). The
# arithmetic is the GEMM route's: with G = dL/dd (Q, N),
#   d = |q'|^2 + |s'|^2 - 2 q' s'^T                 one GEMM (Q, D) x (D, N)
#   dL/dq = 2 (rowsum(G) * q' - G s')               one GEMM (Q, N) x (N, D)
#   dL/ds = 2 (colsum(G) * s' - G^T q')             one GEMM (N, Q) x (Q, D)
# and the same a-priori tests and direct recomputation of failing pairs and rows (above
# _centre), which are O(Q N + (Q + N) D): no pass over Q x N x D beyond the three GEMMs.
BLAS_TERMS = 1 << 24


@njit(fastmath=False, cache=True)
def _expand_task(qt, st, G, nq, ns, tau):
    """G (Q, N) = q' s'^T -> G overwritten by d = |q'|^2 + |s'|^2 - 2 G, pairs that cancel
    more than log2(tau) bits recomputed by the direct formula from qt, st (as in
    _gemm_fwd_task)."""
    Q, D = qt.shape
    N = st.shape[0]
    nbad = 0
    for i in range(Q):
        gi = G[i]
        for j in range(N):
            big = nq[i] + ns[j]
            v = big - (gi[j] + gi[j])
            gi[j] = v
            nbad += tau * v < big
    if nbad:
        for i in range(Q):
            for j in range(N):
                if tau * G[i, j] < nq[i] + ns[j]:
                    v = G[i, j] * 0
                    for k in range(D):
                        dif = qt[i, k] - st[j, k]
                        v += dif * dif
                    G[i, j] = v


def _blas_fwd_task(qt, st, tau):
    """-> d (Q, N), qc, sc, the squared norms nq (Q,), ns (N,) of the centred sets."""
    qc, sc = _centre(qt, st)
    G = np.matmul(qc, sc.T)                               # (Q, N), NumPy's BLAS
    nq, ns = _row_sq_norms(qc), _row_sq_norms(sc)
    _expand_task(qt, st, G, nq, ns, tau)
    return G, qc, sc, nq, ns


def _blas_grad_task(gt, qt, st, qc, sc, nq2, ns2, kappa, kappa_row, dq_t, ds_t):
    """gt: (Q, N) -> dq_t: (Q, D), ds_t: (N, D), overwritten (as _gemm_grad_task, the two
    GEMMs through NumPy). nq2, ns2: squared norms of qc, sc."""
    eps = np.finfo(qt.dtype).eps
    nq, ns = np.sqrt(nq2), np.sqrt(ns2)
    rq, rs, aq, as_, wq, ws = _row_col_sums(gt, nq, ns)
    _gemm_grad_side(gt, False, qt, st, qc, sc, np.matmul(gt, sc), rq, aq, wq, nq, kappa,
                    kappa_row, (st.shape[0] + 4) * eps, dq_t)
    _gemm_grad_side(gt, True, st, qt, sc, qc, np.matmul(gt.T, qc), rs, as_, ws, ns, kappa,
                    kappa_row, (qt.shape[0] + 4) * eps, ds_t)


def _blas_loss(q, s, y, w, scale, loss, dq, ds, pred):
    """The squared-Euclidean ProtoNet loss by the BLAS route (contract of _gemm_loss)."""
    T, Q, _ = q.shape
    dt = q.dtype.type
    rows = np.arange(Q)
    for t in range(T):
        d, qc, sc, nq2, ns2 = _blas_fwd_task(q[t], s[t], dt(TAU))
        dy = d[rows, y[t]]                                # (Q,) distance to the true class
        z = d                                             # logits - max, in place of d
        z *= dt(-scale)
        m = z.max(axis=1)                                 # (Q,)
        pred[t] = z.argmax(axis=1)                        # first index on ties
        z -= m[:, None]
        np.exp(z, out=z)                                  # e (Q, N)
        zs = z.sum(axis=1)                                # (Q,)
        loss[t] = (np.log(zs) + m + dt(scale) * dy).sum() / dt(Q)
        c0 = dt(-scale) * w[t]                            # d loss / d d at p = 1
        z *= (c0 / zs)[:, None]
        z[rows, y[t]] -= c0                               # G = dL/dd (Q, N)
        _blas_grad_task(z, q[t], s[t], qc, sc, nq2, ns2, dt(KAPPA), KAPPA_ROW, dq[t], ds[t])


def _use_blas(q, s):
    return _terms(q, s) >= BLAS_TERMS and q.shape[2] >= GEMM_MIN_D


@njit(fastmath={"reassoc"}, cache=True)
def _zero_sum(x):
    """x: (A, B, C) -> sum of x * 0: 0 if every value is finite, NaN otherwise (x * 0 is
    NaN exactly for NaN and +-Inf, and a sum of zeros cannot overflow, so reassociating it
    into a vectorized sum changes nothing)."""
    acc = 0.0
    for a in range(x.shape[0]):
        for b in range(x.shape[1]):
            for c in range(x.shape[2]):
                acc += x[a, b, c] * 0
    return acc


@njit(cache=True)
def _probe2(a, b):
    return _zero_sum(a) + _zero_sum(b)


@njit(cache=True)
def _probe3(a, b, c):
    return _zero_sum(a) + _zero_sum(b) + _zero_sum(c)


def all_finite(*arrays):
    """True if every value of these (3-D, host) arrays is finite: one compiled call, used by
    metacore.kernels.distance's input checks in place of one NumPy reduction per array."""
    if len(arrays) == 2:
        return _probe2(*arrays) == 0
    if len(arrays) == 3 and arrays[0].dtype == arrays[1].dtype == arrays[2].dtype:
        return _probe3(*arrays) == 0
    return all(_zero_sum(a) == 0 for a in arrays)


# ---------------------------------------------------------------- public functions
# Routing by the work T Q N D (the number of (pair, feature) terms):
#   < SMALL_TERMS     the serial kernels above, one compiled call per op (no thread launch,
#                     no copies); the ProtoNet loss with sqeuclidean or L1 as one fused pass
#                     (_fused_loss)
#   >= SMALL_TERMS    the parallel tiled kernels (_pair_fwd, _pair_grad)
#   >= GEMM_TERMS and D >= GEMM_MIN_D: the squared Euclidean forward, backward and ProtoNet
#                     loss through the centred GEMM route (_gemm_fwd, _gemm_grad,
#                     _gemm_loss; bounds above _centre), the cosine's products through BLAS.
#                     This is checked first, so with GEMM_TERMS < SMALL_TERMS the parallel
#                     kernels serve only L1, D < GEMM_MIN_D, and the cosine's norms.
# GEMM_TERMS: measured on the bench shapes (D = 64, 1 thread): at Q N D = 24,000
# (75 x 5 x 64) the serial direct kernels are faster, at 384,000 (300 x 20 x 64) the GEMM
# route is about 2x faster (forward + backward, one process, medians).
SMALL_TERMS = 1 << 21
GEMM_TERMS = 1 << 16
GEMM_MIN_D = 16
# GEMM route: a pair whose expansion cancels more than log2(TAU) = 1 bit is recomputed
# directly; a backward row failing the elementwise (KAPPA) or the normwise (KAPPA_ROW) test
# is recomputed directly (see above _centre). KAPPA_ROW: random normal data at N = 2000
# needs about 60 (the ratio grows like sqrt(N)); two distant tight clusters with the
# gradient inside them (a converged ProtoNet) give about 1e6 and are caught.
TAU = 2.0
KAPPA = 8.0
KAPPA_ROW = 256.0


def _c(x):
    return np.ascontiguousarray(x)


def _transposed(s):
    """s: (T, N, D) -> sT: (T, D, N) contiguous, the layout the forward kernels stream."""
    return np.ascontiguousarray(s.transpose(0, 2, 1))


def _terms(q, s):
    return q.shape[0] * q.shape[1] * s.shape[1] * q.shape[2]


def _use_gemm(q, s):
    return _terms(q, s) >= GEMM_TERMS and q.shape[2] >= GEMM_MIN_D


def _forward(q, s, mode):
    """Direct forward (mode 0 sqeuclidean, 1 L1, 2 dot), serial or parallel by size."""
    q, s = _c(q), _c(s)
    out = np.empty((q.shape[0], q.shape[1], s.shape[1]), dtype=q.dtype)
    if _terms(q, s) < SMALL_TERMS:
        _small_fwd(q, s, mode, out)
    else:
        _pair_fwd(q, _transposed(s), mode, out)
    return out


def pairwise_sqeuclidean(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N); direct formula, or at large sizes the
    centred GEMM route with direct recomputation of cancelling pairs."""
    q, s = _c(q), _c(s)
    if _use_blas(q, s) and q.shape[1] and s.shape[1]:
        return np.stack([_blas_fwd_task(q[t], s[t], q.dtype.type(TAU))[0]
                         for t in range(q.shape[0])])
    if _use_gemm(q, s) and q.shape[1] and s.shape[1]:
        out = np.empty((q.shape[0], q.shape[1], s.shape[1]), dtype=q.dtype)
        _gemm_fwd(q, s, q.dtype.type(TAU), out)
        return out
    return _forward(q, s, 0)


def pairwise_l1(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N) = sum_k |q - s|."""
    return _forward(q, s, 1)


def _cosine_parts(q, s):
    """-> c: (T, Q, N), qn/qon: (T, Q), sn/son: (T, N) (clamped norms, above-EPS masks)."""
    T, Q, _ = q.shape
    N = s.shape[1]
    qn, qon = np.empty((T, Q), q.dtype), np.empty((T, Q), q.dtype)
    sn, son = np.empty((T, N), q.dtype), np.empty((T, N), q.dtype)
    _clamped_norms(q, q.dtype.type(EPS), qn, qon)
    _clamped_norms(s, q.dtype.type(EPS), sn, son)
    # the dot products: a GEMM at large sizes (no cancellation issue: the bound is relative
    # to sum_k |q_k s_k|, which is what any summation order guarantees)
    c = np.matmul(q, s.transpose(0, 2, 1)) if _use_gemm(q, s) else _forward(q, s, 2)
    c /= qn[:, :, None] * sn[:, None, :]
    return c, qn, qon, sn, son


def pairwise_cosine(q, s):
    """q: (T, Q, D), s: (T, N, D) -> c: (T, Q, N) = q.s / (max(|q|,EPS) max(|s|,EPS))."""
    return _cosine_parts(_c(q), _c(s))[0]


def _grad_pair(g, q, s, mode):
    """dq: (T, Q, D), ds: (T, N, D) for the pair factor `mode` (see _pair_grad)."""
    q, s, g = _c(q), _c(s), _c(g)
    if mode == 2 and _use_gemm(q, s):                 # plain products: BLAS
        return np.matmul(g, s), np.matmul(g.transpose(0, 2, 1), q)
    dq = np.empty_like(q)
    ds = np.empty_like(s)
    if mode == 0 and _use_blas(q, s) and q.shape[1] and s.shape[1]:
        for t in range(q.shape[0]):
            qc, sc = _centre(q[t], s[t])
            _blas_grad_task(g[t], q[t], s[t], qc, sc, _row_sq_norms(qc), _row_sq_norms(sc),
                            q.dtype.type(KAPPA), KAPPA_ROW, dq[t], ds[t])
    elif mode == 0 and _use_gemm(q, s) and q.shape[1] and s.shape[1]:
        _gemm_grad(g, q, s, q.dtype.type(KAPPA), KAPPA_ROW, dq, ds)
    elif _terms(q, s) < SMALL_TERMS:
        _small_grad(g, q, s, mode, dq, ds)
    else:
        _pair_grad(g, q, s, mode, dq)
        _pair_grad(_transposed(g), s, q, mode, ds)
    return dq, ds


def pairwise_sqeuclidean_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D); fresh arrays."""
    return _grad_pair(g, q, s, 0)


def pairwise_l1_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D), sign(0) = 0; fresh arrays."""
    return _grad_pair(g, q, s, 1)


def pairwise_cosine_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D); see the reference for the formula."""
    q, s, g = _c(q), _c(s), _c(g)
    c, qn, qon, sn, son = _cosine_parts(q, s)
    gi = g / (qn[:, :, None] * sn[:, None, :])            # (T, Q, N)
    gc = g * c                                            # (T, Q, N)
    dq, ds = _grad_pair(gi, q, s, 2)
    dq -= (gc.sum(axis=2) * qon / (qn * qn))[..., None] * q
    ds -= (gc.sum(axis=1) * son / (sn * sn))[..., None] * s
    return dq, ds


_FORWARD = {"sqeuclidean": pairwise_sqeuclidean, "l1": pairwise_l1, "cosine": pairwise_cosine}
_BACKWARD = {"sqeuclidean": pairwise_sqeuclidean_backward, "l1": pairwise_l1_backward,
             "cosine": pairwise_cosine_backward}
_FUSED_MODE = {"sqeuclidean": 0, "l1": 1}


def protonet_loss(q, s, y, gloss=None, metric="sqeuclidean", scale=1.0):
    """Same contract as metacore.reference.distance.protonet_loss:
    -> loss: (T,), dq: (T, Q, D), ds: (T, N, D), pred: (T, Q) int64."""
    T, Q, _ = q.shape
    dt = q.dtype.type
    w = np.full(T, 1.0 / Q, q.dtype) if gloss is None else np.asarray(gloss, q.dtype) / dt(Q)
    y = _c(y).astype(np.int64, copy=False)
    pred = np.empty((T, Q), dtype=np.int64)
    if metric == "sqeuclidean" and _use_blas(q, s) and s.shape[1]:
        q, s = _c(q), _c(s)
        loss, dq, ds = np.empty(T, q.dtype), np.empty_like(q), np.empty_like(s)
        _blas_loss(q, s, y, w, scale, loss, dq, ds, pred)
        return loss, dq, ds, pred
    if metric == "sqeuclidean" and _use_gemm(q, s):
        q, s = _c(q), _c(s)
        loss, dq, ds = np.empty(T, q.dtype), np.empty_like(q), np.empty_like(s)
        _gemm_loss(q, s, y, w, dt(scale), dt(TAU), dt(KAPPA), KAPPA_ROW, loss, dq, ds,
                   pred)
        return loss, dq, ds, pred
    if metric in _FUSED_MODE and _terms(q, s) < SMALL_TERMS:
        q, s = _c(q), _c(s)
        loss, dq, ds = np.empty(T, q.dtype), np.empty_like(q), np.empty_like(s)
        _fused_loss(q, s, y, w, _FUSED_MODE[metric], dt(scale), loss, dq, ds, pred)
        return loss, dq, ds, pred
    sign = 1.0 if metric == "cosine" else -1.0
    logits = _FORWARD[metric](q, s)                       # (T, Q, N)
    logits *= dt(sign * scale)
    dlogits = np.empty_like(logits)
    loss_rows = np.empty((T, Q), dtype=q.dtype)
    _softmax_ce(logits, y, _c(w), loss_rows, dlogits, pred)
    dlogits *= dt(sign * scale)
    dq, ds = _BACKWARD[metric](dlogits, q, s)
    loss = loss_rows.sum(axis=1) / dt(Q)                   # (T,)
    return loss.astype(q.dtype, copy=False), dq, ds, pred
