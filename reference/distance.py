"""Episodic distances and the ProtoNet loss: plain float64 NumPy ground truth.

Shape letters (this module):
    T tasks, Q queries per task, N supports (or prototypes) per task, D features.

Every function computes in float64 from the direct formulas (no algebraic shortcuts) and
returns fresh arrays in the input dtype. Inputs are assumed valid; `metacore.kernels.distance`
checks them before calling in here.

Conventions shared by every backend:
    sqeuclidean  d[t,i,j] = sum_k (q[t,i,k] - s[t,j,k])^2
    l1           d[t,i,j] = sum_k |q[t,i,k] - s[t,j,k]|, subgradient sign(0) = 0
    cosine       c[t,i,j] = q_i . s_j / (max(|q_i|, EPS) * max(|s_j|, EPS)),  EPS = 1e-8
                 Each norm is clamped separately, so a zero vector has similarity 0 with
                 everything. Where |q_i| <= EPS the clamped norm is the constant EPS, so the
                 gradient there is g * s_j / (EPS * max(|s_j|, EPS)) (no norm term); likewise
                 for s_j.
    protonet     logits = -scale * d (sqeuclidean or l1) or +scale * c (cosine);
                 loss[t] = mean_i ( logsumexp_j logits[t,i,:] - logits[t,i,y[t,i]] )
                 (Snell et al. 2017, "Prototypical Networks", eq. 2 with scale = 1).
"""
import numpy as np

EPS = 1e-8
METRICS = ("sqeuclidean", "l1", "cosine")


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


# ---------------------------------------------------------------- squared Euclidean
def pairwise_sqeuclidean(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N), d = sum_k (q_ik - s_jk)^2."""
    q64, s64 = _f64(q, s)
    diff = q64[:, :, None, :] - s64[:, None, :, :]      # (T, Q, N, D)
    return (diff * diff).sum(axis=-1).astype(q.dtype)


def pairwise_sqeuclidean_backward(g, q, s):
    """g: (T, Q, N) upstream -> dq: (T, Q, D), ds: (T, N, D).

    dq_i = 2 sum_j g_ij (q_i - s_j),   ds_j = -2 sum_i g_ij (q_i - s_j)."""
    g64, q64, s64 = _f64(g, q, s)
    diff = q64[:, :, None, :] - s64[:, None, :, :]      # (T, Q, N, D)
    gd = 2.0 * g64[..., None] * diff                     # (T, Q, N, D)
    return gd.sum(axis=2).astype(q.dtype), (-gd.sum(axis=1)).astype(q.dtype)


# ---------------------------------------------------------------- L1
def pairwise_l1(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N), d = sum_k |q_ik - s_jk|."""
    q64, s64 = _f64(q, s)
    diff = q64[:, :, None, :] - s64[:, None, :, :]      # (T, Q, N, D)
    return np.abs(diff).sum(axis=-1).astype(q.dtype)


def pairwise_l1_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D), with sign(0) = 0 (np.sign does this)."""
    g64, q64, s64 = _f64(g, q, s)
    sg = g64[..., None] * np.sign(q64[:, :, None, :] - s64[:, None, :, :])   # (T, Q, N, D)
    return sg.sum(axis=2).astype(q.dtype), (-sg.sum(axis=1)).astype(q.dtype)


# ---------------------------------------------------------------- cosine
def _clamped_norms(x64):
    """x64: (T, M, D) -> (norm clamped at EPS, 1 where the norm is above EPS else 0): (T, M)."""
    n = np.sqrt((x64 * x64).sum(axis=-1))
    return np.maximum(n, EPS), (n > EPS).astype(np.float64)


def pairwise_cosine(q, s):
    """q: (T, Q, D), s: (T, N, D) -> c: (T, Q, N), c = q.s / (max(|q|,EPS) max(|s|,EPS))."""
    q64, s64 = _f64(q, s)
    qn, _ = _clamped_norms(q64)                           # (T, Q)
    sn, _ = _clamped_norms(s64)                           # (T, N)
    dot = (q64[:, :, None, :] * s64[:, None, :, :]).sum(axis=-1)   # (T, Q, N)
    return (dot / (qn[:, :, None] * sn[:, None, :])).astype(q.dtype)


def pairwise_cosine_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D).

    With a = max(|q|,EPS), b = max(|s|,EPS), c = q.s/(ab):
        dc/dq = s/(ab) - c q/a^2   where |q| > EPS,   s/(ab) where |q| <= EPS (a constant),
    and the same with q and s swapped."""
    g64, q64, s64 = _f64(g, q, s)
    qn, qon = _clamped_norms(q64)                         # (T, Q)
    sn, son = _clamped_norms(s64)                         # (T, N)
    inv = 1.0 / (qn[:, :, None] * sn[:, None, :])         # (T, Q, N)
    c = (q64[:, :, None, :] * s64[:, None, :, :]).sum(axis=-1) * inv   # (T, Q, N)
    gi = g64 * inv                                        # (T, Q, N)
    gc = g64 * c                                          # (T, Q, N)
    dq = (gi[..., None] * s64[:, None, :, :]).sum(axis=2) \
        - (gc.sum(axis=2) * qon / qn**2)[..., None] * q64
    ds = (gi[..., None] * q64[:, :, None, :]).sum(axis=1) \
        - (gc.sum(axis=1) * son / sn**2)[..., None] * s64
    return dq.astype(q.dtype), ds.astype(q.dtype)


# ---------------------------------------------------------------- ProtoNet loss
_FORWARD = {"sqeuclidean": pairwise_sqeuclidean, "l1": pairwise_l1, "cosine": pairwise_cosine}
_BACKWARD = {"sqeuclidean": pairwise_sqeuclidean_backward, "l1": pairwise_l1_backward,
             "cosine": pairwise_cosine_backward}


def protonet_loss(q, s, y, gloss=None, metric="sqeuclidean", scale=1.0):
    """Softmax over logits from a distance, cross-entropy, per-task mean over queries.

    q: (T, Q, D) queries, s: (T, N, D) prototypes, y: (T, Q) labels in [0, N),
    gloss: (T,) upstream gradient of the losses (default ones: the gradient of sum(loss)).
    Returns loss: (T,), dq: (T, Q, D), ds: (T, N, D), pred: (T, Q) int64 argmax of logits.

    dloss_t/dlogits_ij = (softmax_ij - [j == y_ij]) / Q, then chained through the distance."""
    T, Q, _ = q.shape
    q64, s64 = _f64(q, s)
    sign = 1.0 if metric == "cosine" else -1.0
    logits = sign * scale * _FORWARD[metric](q64, s64)   # (T, Q, N)
    m = logits.max(axis=-1, keepdims=True)                # (T, Q, 1)
    e = np.exp(logits - m)                                # (T, Q, N)
    z = e.sum(axis=-1, keepdims=True)                     # (T, Q, 1)
    picked = np.take_along_axis(logits, y[..., None].astype(np.intp), axis=-1)   # (T, Q, 1)
    loss = (np.log(z) + m - picked)[..., 0].mean(axis=1)  # (T,)
    w = np.ones(T) if gloss is None else np.asarray(gloss, dtype=np.float64)
    dlogits = e / z                                       # (T, Q, N)
    np.put_along_axis(dlogits, y[..., None].astype(np.intp),
                      np.take_along_axis(dlogits, y[..., None].astype(np.intp), axis=-1) - 1.0,
                      axis=-1)
    dlogits *= (w / Q)[:, None, None]
    dq, ds = _BACKWARD[metric](sign * scale * dlogits, q64, s64)
    pred = logits.argmax(axis=-1).astype(np.int64)        # (T, Q)
    return loss.astype(q.dtype), dq.astype(q.dtype), ds.astype(q.dtype), pred
