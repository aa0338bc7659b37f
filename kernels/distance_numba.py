"""Episodic distances and the ProtoNet loss: Numba CPU backend.

Shape letters (this module):
    T tasks, Q queries per task, N supports (or prototypes) per task, D features.

Same conventions as `metacore.reference.distance` (read its docstring: EPS, sign(0) = 0,
logits). Inputs are assumed checked by `metacore.kernels.distance`; this module only makes
them contiguous.

How the kernels differ from the reference:
  * Squared Euclidean uses the direct difference formula sum_k (q_k - s_k)^2, never the
    expansion |q|^2 + |s|^2 - 2 q.s: for points near 1e4 separated by 1e-2 the expansion in
    float32 loses every digit (|q|^2 ~ 1e9 against d ~ 1e-3), and centring by a per-task mean
    only helps when the whole task is tight. The direct formula has relative error at most
    (D + 2) eps for any inputs, because every summand is non-negative.
  * fastmath=False forbids reassociating a sum, so LLVM will not vectorize a reduction over
    k. The forward kernels therefore read the supports transposed, sT: (T, D, N), and put the
    vectorized loop over j (independent outputs, each summed over k in order), tiled so that
    a block of sT stays in L1 while a block of queries streams past it.
  * The backward kernels sum over j (for dq) or i (for ds) with the vectorized loop over k,
    again one independent accumulator per output element, so no reassociation.
  * Everything accumulates in the input dtype (float32 stays float32); the direct formulas
    meet the per-dtype tolerances of tests/test_distance.py without float64 accumulation.
  * protonet_loss = distance kernel, then one fused softmax + cross-entropy + gradient pass
    per query row, then the distance backward kernel with the logits gradient.
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


# ---------------------------------------------------------------- public functions
def _c(x):
    return np.ascontiguousarray(x)


def _transposed(s):
    """s: (T, N, D) -> sT: (T, D, N) contiguous, the layout the forward kernels stream."""
    return np.ascontiguousarray(s.transpose(0, 2, 1))


def pairwise_sqeuclidean(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N), direct difference formula."""
    out = np.empty((q.shape[0], q.shape[1], s.shape[1]), dtype=q.dtype)
    _pair_fwd(_c(q), _transposed(s), 0, out)
    return out


def pairwise_l1(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N) = sum_k |q - s|."""
    out = np.empty((q.shape[0], q.shape[1], s.shape[1]), dtype=q.dtype)
    _pair_fwd(_c(q), _transposed(s), 1, out)
    return out


def _cosine_parts(q, s):
    """-> c: (T, Q, N), qn/qon: (T, Q), sn/son: (T, N) (clamped norms, above-EPS masks)."""
    T, Q, _ = q.shape
    N = s.shape[1]
    qn, qon = np.empty((T, Q), q.dtype), np.empty((T, Q), q.dtype)
    sn, son = np.empty((T, N), q.dtype), np.empty((T, N), q.dtype)
    _clamped_norms(q, q.dtype.type(EPS), qn, qon)
    _clamped_norms(s, q.dtype.type(EPS), sn, son)
    c = np.empty((T, Q, N), dtype=q.dtype)
    _pair_fwd(q, _transposed(s), 2, c)
    c /= qn[:, :, None] * sn[:, None, :]
    return c, qn, qon, sn, son


def pairwise_cosine(q, s):
    """q: (T, Q, D), s: (T, N, D) -> c: (T, Q, N) = q.s / (max(|q|,EPS) max(|s|,EPS))."""
    return _cosine_parts(_c(q), _c(s))[0]


def _grad_pair(g, q, s, mode):
    """dq: (T, Q, D), ds: (T, N, D) for the pair factor `mode` (see _pair_grad)."""
    q, s, g = _c(q), _c(s), _c(g)
    dq = np.empty_like(q)
    ds = np.empty_like(s)
    _pair_grad(g, q, s, mode, dq)
    _pair_grad(_transposed(g), s, q, mode, ds)    # f(s - q) is already -f(q - s): no flip
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


def protonet_loss(q, s, y, gloss=None, metric="sqeuclidean", scale=1.0):
    """Same contract as metacore.reference.distance.protonet_loss:
    -> loss: (T,), dq: (T, Q, D), ds: (T, N, D), pred: (T, Q) int64."""
    T, Q, _ = q.shape
    dt = q.dtype.type
    sign = 1.0 if metric == "cosine" else -1.0
    logits = _FORWARD[metric](q, s)                       # (T, Q, N)
    logits *= dt(sign * scale)
    w = np.ones(T, dtype=q.dtype) if gloss is None else np.asarray(gloss, dtype=q.dtype)
    w = _c(w / dt(Q))
    loss_rows = np.empty((T, Q), dtype=q.dtype)
    dlogits = np.empty_like(logits)
    pred = np.empty((T, Q), dtype=np.int64)
    _softmax_ce(logits, _c(y).astype(np.int64, copy=False), w, loss_rows, dlogits, pred)
    dlogits *= dt(sign * scale)
    dq, ds = _BACKWARD[metric](dlogits, q, s)
    loss = loss_rows.sum(axis=1) / dt(Q)                   # (T,)
    return loss.astype(q.dtype, copy=False), dq, ds, pred
