"""LRUA memory of MANN (Santoro et al. 2016): Numba CPU backend.

Shape letters (this module):
    T time steps, B episodes, H heads (n = H reads), S memory slots, W slot width.

Same contract and conventions as `metacore.reference.lrua` (read its docstring: the order of
the operations in a step, EPS, ties, what is non-differentiable). Inputs are assumed checked
by `metacore.kernels.lrua`; this module only makes them contiguous.

How the kernels differ from the reference:
  * One work item per episode b (prange over B); the time loop runs inside it, so a whole
    episode's recurrence stays in one thread with no Python between steps.
  * fastmath=False forbids reassociating a sum, so LLVM vectorizes only loops over
    independent outputs. Sums over the width x (norms, cosines, dL/dw_r, dL/dw_w) therefore
    run on transposed copies M_t^T and dL/dM^T: (W, S) with the slots i as the vectorized
    loop; sums over slots (the reads, dL/dk) run on the (S, W) layouts with x vectorized.
    This halved the reverse sweep against the first, untransposed version.
  * Everything accumulates in the input dtype (float32 stays float32); cosines and the
    softmax are bounded, and tests/test_lrua.py bounds the float32 error of a whole episode.
  * lrua_backward reruns the forward kernel keeping M_t for every t (B, T + 1, S, W), the
    read and write weights, w_lu_{t-1} and the zeroed slot, then runs the reverse sweep;
    lrua_forward keeps only two memories per episode (ping-pong), not T + 1.
  * The step pair (lrua_step_forward / lrua_step_backward) runs the same per-step kernels
    (_step_fwd, _step_bwd) as the episode loops, parallel over episodes; the backward
    recomputes its step's forward first.
  * The least-used threshold m(w_u, n) is read off an in-place sort of a copy of w_u
    (S log S per step, small against the H S W of the cosines).
"""
import numpy as np
from numba import njit, prange

EPS = 1e-8


# ---------------------------------------------------------------- one step, forward
@njit(fastmath=False, cache=True)
def _step_fwd(k, g, Mp, wr_prev, wu_prev, gamma, eps, M, wr, ww, wu, r, wlu, tmp, kn, mn,
              c, MT):
    """One step of one episode (steps 1-7 of metacore.reference.lrua) -> z, the zeroed slot.

    k: (H, W), g: (H,) gates, Mp: (S, W) M_{t-1}, wr_prev: (H, S), wu_prev: (S,); writes
    M: (S, W) M_t, wr, ww: (H, S), wu: (S,), r: (H, W), wlu: (S,) w_lu_{t-1}; scratch
    tmp: (S,), kn: (H,), mn: (S,), c: (H, S), MT: (W, S)."""
    H, W = k.shape
    S = Mp.shape[0]
    dt = k.dtype
    one = dt.type(1)
    # 1. least-used weights of the previous usage; 3. the slot to zero
    tmp[:] = wu_prev
    tmp.sort()
    m = tmp[H - 1]
    z = 0
    for i in range(S):
        wlu[i] = one if wu_prev[i] <= m else 0
        if wu_prev[i] < wu_prev[z]:
            z = i
    # 2. write weights
    for h in range(H):
        gh = g[h]
        for i in range(S):
            ww[h, i] = gh * wr_prev[h, i] + (one - gh) * wlu[i]
    # 3-4. zero slot z, then write every head's key
    for i in range(S):
        for x in range(W):
            M[i, x] = 0 if i == z else Mp[i, x]
        for h in range(H):
            wv = ww[h, i]
            for x in range(W):
                M[i, x] += wv * k[h, x]
    # 5. cosine similarities with clamped norms, softmax over slots. The sums over x
    # run on MT = M^T, so the vectorized loop is over slots i (independent sums, each
    # over x in order): fastmath=False would not vectorize a reduction over x
    for i in range(S):
        for x in range(W):
            MT[x, i] = M[i, x]
    for h in range(H):
        acc = dt.type(0)
        for x in range(W):
            acc += k[h, x] * k[h, x]
        kn[h] = max(np.sqrt(acc), eps)
    mn[:] = 0
    for x in range(W):
        for i in range(S):
            mn[i] += MT[x, i] * MT[x, i]
    for i in range(S):
        mn[i] = max(np.sqrt(mn[i]), eps)
    for h in range(H):
        c[h, :] = 0
        for x in range(W):
            kv = k[h, x]
            for i in range(S):
                c[h, i] += kv * MT[x, i]
        for i in range(S):
            c[h, i] /= kn[h] * mn[i]
    for h in range(H):
        cmax = c[h, 0]
        for i in range(1, S):
            cmax = max(cmax, c[h, i])
        tot = dt.type(0)
        for i in range(S):
            wr[h, i] = np.exp(c[h, i] - cmax)
            tot += wr[h, i]
        for i in range(S):
            wr[h, i] /= tot
    # 6. reads
    for h in range(H):
        for x in range(W):
            r[h, x] = 0
        for i in range(S):
            wv = wr[h, i]
            for x in range(W):
                r[h, x] += wv * M[i, x]
    # 7. usage
    for i in range(S):
        sr = dt.type(0)
        sw = dt.type(0)
        for h in range(H):
            sr += wr[h, i]
            sw += ww[h, i]
        wu[i] = gamma * wu_prev[i] + sr + sw
    return z


@njit(fastmath=False, cache=True)
def _episode_forward(b, keys, g, memory0, read0, usage0, gamma, eps,
                     reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs):
    """Run episode b over T steps (steps 1-7 of metacore.reference.lrua), overwriting
    reads[:, b], w_r[:, b], w_w[:, b], w_u[:, b], w_lu[:, b], wlu_prev[b], zs[b] and
    Ms[b, (t + 1) % K] with M_t (K = Ms.shape[1]: T + 1 keeps them all, 2 ping-pongs).

    keys: (T, B, H, W), g: (T, B, H) gates, memory0: (B, S, W), read0: (B, H, S),
    usage0: (B, S); reads: (T, B, H, W), w_r, w_w: (T, B, H, S), w_u, w_lu: (T, B, S),
    Ms: (B, K, S, W), wlu_prev: (B, T, S), zs: (B, T) int64."""
    T, _, H, W = keys.shape
    S = memory0.shape[1]
    K = Ms.shape[1]
    dt = keys.dtype
    one = dt.type(1)
    tmp = np.empty(S, dtype=dt)
    kn = np.empty(H, dtype=dt)
    mn = np.empty(S, dtype=dt)
    c = np.empty((H, S), dtype=dt)
    MT = np.empty((W, S), dtype=dt)
    Ms[b, 0] = memory0[b]
    for t in range(T):
        wr_prev = read0[b] if t == 0 else w_r[t - 1, b]  # (H, S)
        wu_prev = usage0[b] if t == 0 else w_u[t - 1, b]  # (S,)
        zs[b, t] = _step_fwd(keys[t, b], g[t, b], Ms[b, t % K], wr_prev, wu_prev, gamma, eps,
                             Ms[b, (t + 1) % K], w_r[t, b], w_w[t, b], w_u[t, b],
                             reads[t, b], wlu_prev[b, t], tmp, kn, mn, c, MT)
        # the least-used weights w_u_t implies (returned; step t + 1 recomputes them)
        wu = w_u[t, b]                                  # (S,)
        tmp[:] = wu
        tmp.sort()
        m = tmp[H - 1]
        for i in range(S):
            w_lu[t, b, i] = one if wu[i] <= m else 0


@njit(parallel=True, fastmath=False, cache=True)
def _forward(keys, g, memory0, read0, usage0, gamma, eps,
             reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs):
    """Every episode in parallel; see _episode_forward for the arguments."""
    for b in prange(keys.shape[1]):
        _episode_forward(b, keys, g, memory0, read0, usage0, gamma, eps,
                         reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs)


# ---------------------------------------------------------------- one step, reverse
@njit(fastmath=False, cache=True)
def _step_bwd(dr, k, g, M, wr, ww, wr_prev, wlu, z, eps, dMT, dwr, dk, dalpha,
              dMs, MT, dc, c, gi, kn, kon, mn, mon, sk, sm):
    """Reverse of one step of one episode (formulas: metacore.reference.lrua.lrua_backward).

    dr: (H, W) dL/dr_t, k: (H, W), g: (H,), M: (S, W) M_t, wr, ww: (H, S) w_r_t, w_w_t,
    wr_prev: (H, S) w_r_{t-1}, wlu: (S,) w_lu_{t-1}, z: the zeroed slot.
    In place: dMT: (W, S) holds dL/dM_t^T on entry, dL/dM_{t-1}^T on exit; dwr: (H, S)
    holds dL/dw_r_t on entry, dL/dw_r_{t-1} on exit. Overwrites dk: (H, W), dalpha: (H,).
    dL/dM is kept transposed and M_t is transposed into MT: (W, S), so that every sum over
    x has the slots i as its vectorized loop; the two sums over i (into dk) run on the
    (S, W) layouts with x as the vectorized loop. Scratch: dMs: (S, W), dc, c, gi: (H, S),
    kn, kon, sk: (H,), mn, mon, sm: (S,)."""
    H, W = k.shape
    S = M.shape[0]
    dt = k.dtype
    for i in range(S):
        for x in range(W):
            MT[x, i] = M[i, x]
    # read r = w_r M
    for h in range(H):
        for x in range(W):
            d = dr[h, x]
            for i in range(S):
                dwr[h, i] += d * MT[x, i]
                dMT[x, i] += wr[h, i] * d
    # softmax over slots
    for h in range(H):
        acc = dt.type(0)
        for i in range(S):
            acc += wr[h, i] * dwr[h, i]
        for i in range(S):
            dc[h, i] = wr[h, i] * (dwr[h, i] - acc)
    # cosine: recompute the clamped norms and the similarities
    for h in range(H):
        acc = dt.type(0)
        for x in range(W):
            acc += k[h, x] * k[h, x]
        nrm = np.sqrt(acc)
        kn[h] = max(nrm, eps)
        kon[h] = 1 if nrm > eps else 0
    mn[:] = 0
    for x in range(W):
        for i in range(S):
            mn[i] += MT[x, i] * MT[x, i]
    for i in range(S):
        nrm = np.sqrt(mn[i])
        mn[i] = max(nrm, eps)
        mon[i] = 1 if nrm > eps else 0
        sm[i] = 0
    for h in range(H):
        c[h, :] = 0
        for x in range(W):
            kv = k[h, x]
            for i in range(S):
                c[h, i] += kv * MT[x, i]
        sk[h] = 0
        for i in range(S):
            inv = 1 / (kn[h] * mn[i])
            c[h, i] *= inv
            dcc = dc[h, i] * c[h, i]
            sk[h] += dcc
            sm[i] += dcc
            gi[h, i] = dc[h, i] * inv
    for h in range(H):
        f = sk[h] * kon[h] / (kn[h] * kn[h])
        for x in range(W):
            dk[h, x] = -f * k[h, x]
        for i in range(S):
            gv = gi[h, i]
            for x in range(W):
                dk[h, x] += gv * M[i, x]
    for i in range(S):
        sm[i] = sm[i] * mon[i] / (mn[i] * mn[i])
    for x in range(W):
        for i in range(S):
            dMT[x, i] -= sm[i] * MT[x, i]
    for h in range(H):
        for x in range(W):
            kv = k[h, x]
            for i in range(S):
                dMT[x, i] += gi[h, i] * kv
    # write M_t = M' + w_w^T k: key gradient and write-weight gradient (into dwr)
    for i in range(S):
        for x in range(W):
            dMs[i, x] = dMT[x, i]
    for h in range(H):
        for i in range(S):
            wv = ww[h, i]
            for x in range(W):
                dk[h, x] += wv * dMs[i, x]
        dwr[h, :] = 0                                   # holds dww until the gate below
        for x in range(W):
            kv = k[h, x]
            for i in range(S):
                dwr[h, i] += kv * dMT[x, i]
    # zeroing of the least-used slot
    for x in range(W):
        dMT[x, z] = 0
    # gate: w_w = g w_r_{t-1} + (1 - g) w_lu_{t-1}
    for h in range(H):
        gh = g[h]
        acc = dt.type(0)
        for i in range(S):
            acc += dwr[h, i] * (wr_prev[h, i] - wlu[i])
            dwr[h, i] *= gh
        dalpha[h] = gh * (1 - gh) * acc


@njit(fastmath=False, cache=True)
def _bwd_scratch(H, S, W, dt):
    """-> dMs (S, W), MT (W, S), dc, c, gi (H, S), kn, kon, sk (H,), mn, mon, sm (S,)."""
    return (np.empty((S, W), dt), np.empty((W, S), dt), np.empty((H, S), dt),
            np.empty((H, S), dt), np.empty((H, S), dt), np.empty(H, dt), np.empty(H, dt),
            np.empty(H, dt), np.empty(S, dt), np.empty(S, dt), np.empty(S, dt))


@njit(parallel=True, fastmath=False, cache=True)
def _backward(dreads, keys, g, read0, w_r, w_w, Ms, wlu_prev, zs, eps,
              dkeys, dalpha, dmemory0, dread0):
    """BPTT for every episode in parallel (formulas: metacore.reference.lrua.lrua_backward).

    dreads, keys: (T, B, H, W), g: (T, B, H), read0: (B, H, S), w_r, w_w: (T, B, H, S),
    Ms: (B, T + 1, S, W) with M_t at index t, wlu_prev: (B, T, S), zs: (B, T)
    -> dkeys: (T, B, H, W), dalpha: (T, B, H), dmemory0: (B, S, W), dread0: (B, H, S),
    all overwritten."""
    T, B, H, W = keys.shape
    S = Ms.shape[2]
    for b in prange(B):
        dt = keys.dtype
        dMT = np.zeros((W, S), dtype=dt)
        dwr = np.zeros((H, S), dtype=dt)
        dMs, MT, dc, c, gi, kn, kon, sk, mn, mon, sm = _bwd_scratch(H, S, W, dt)
        for t in range(T - 1, -1, -1):
            wr_prev = read0[b] if t == 0 else w_r[t - 1, b]
            _step_bwd(dreads[t, b], keys[t, b], g[t, b], Ms[b, t + 1], w_r[t, b], w_w[t, b],
                      wr_prev, wlu_prev[b, t], zs[b, t], eps, dMT, dwr, dkeys[t, b],
                      dalpha[t, b], dMs, MT, dc, c, gi, kn, kon, mn, mon, sk, sm)
        for i in range(S):
            for x in range(W):
                dmemory0[b, i, x] = dMT[x, i]
        dread0[b] = dwr


# ---------------------------------------------------------------- one step, a batch
@njit(parallel=True, fastmath=False, cache=True)
def _step_forward_batch(key, g, memory_prev, w_r_prev, w_u_prev, gamma, eps,
                        read, memory, w_r, w_w, w_u, wlu, zs):
    """lrua_step_forward for every episode in parallel. key: (B, H, W), g: (B, H),
    memory_prev: (B, S, W), w_r_prev: (B, H, S), w_u_prev: (B, S); overwrites read: (B, H, W),
    memory: (B, S, W), w_r, w_w: (B, H, S), w_u, wlu: (B, S), zs: (B,) int64."""
    B, H, W = key.shape
    S = memory_prev.shape[1]
    for b in prange(B):
        dt = key.dtype
        zs[b] = _step_fwd(key[b], g[b], memory_prev[b], w_r_prev[b], w_u_prev[b], gamma, eps,
                          memory[b], w_r[b], w_w[b], w_u[b], read[b], wlu[b],
                          np.empty(S, dt), np.empty(H, dt), np.empty(S, dt),
                          np.empty((H, S), dt), np.empty((W, S), dt))


@njit(parallel=True, fastmath=False, cache=True)
def _step_backward_batch(dread, dmemory, dw_r, key, g, w_r_prev, memory, w_r, w_w, wlu, zs,
                         eps, dkey, dalpha, dmemory_prev, dw_r_prev):
    """lrua_step_backward for every episode in parallel, given the recomputed step:
    memory: (B, S, W) M_t, w_r, w_w: (B, H, S), wlu: (B, S) w_lu_{t-1}, zs: (B,).
    Overwrites dkey: (B, H, W), dalpha: (B, H), dmemory_prev: (B, S, W),
    dw_r_prev: (B, H, S)."""
    B, H, W = key.shape
    S = memory.shape[1]
    for b in prange(B):
        dt = key.dtype
        dMT = np.empty((W, S), dtype=dt)
        for i in range(S):
            for x in range(W):
                dMT[x, i] = dmemory[b, i, x]
        dw_r_prev[b] = dw_r[b]
        dMs, MT, dc, c, gi, kn, kon, sk, mn, mon, sm = _bwd_scratch(H, S, W, dt)
        _step_bwd(dread[b], key[b], g[b], memory[b], w_r[b], w_w[b], w_r_prev[b], wlu[b],
                  zs[b], eps, dMT, dw_r_prev[b], dkey[b], dalpha[b], dMs, MT, dc, c, gi,
                  kn, kon, mn, mon, sk, sm)
        for i in range(S):
            for x in range(W):
                dmemory_prev[b, i, x] = dMT[x, i]


# ---------------------------------------------------------------- public functions
def _c(x):
    return np.ascontiguousarray(x)


def _gates(alpha, T, B, H, dtype):
    """alpha: (H,) or (T, B, H) -> sigmoid(alpha): (T, B, H), a fresh writable array (a
    read-only broadcast view would be a different Numba type: a second compilation)."""
    half = dtype.type(0.5)
    g = np.empty((T, B, H), dtype)
    g[...] = half * (1 + np.tanh(half * np.asarray(alpha, dtype=dtype)))
    return g


def _run_forward(keys, alpha, memory0, read0, usage0, gamma, keep):
    keys, memory0, read0, usage0 = _c(keys), _c(memory0), _c(read0), _c(usage0)
    T, B, H, W = keys.shape
    S = memory0.shape[1]
    dt = keys.dtype
    g = _gates(alpha, T, B, H, dt)
    reads = np.empty((T, B, H, W), dt)
    w_r = np.empty((T, B, H, S), dt)
    w_w = np.empty((T, B, H, S), dt)
    w_u = np.empty((T, B, S), dt)
    w_lu = np.empty((T, B, S), dt)
    Ms = np.empty((B, T + 1 if keep else 2, S, W), dt)
    wlu_prev = np.empty((B, T, S), dt)
    zs = np.empty((B, T), np.int64)
    _forward(keys, g, memory0, read0, usage0, dt.type(gamma), dt.type(EPS),
             reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs)
    return keys, read0, g, reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs


def lrua_forward(keys, alpha, memory0, read0, usage0, gamma):
    """Same contract as metacore.reference.lrua.lrua_forward:
    -> reads (T, B, H, W), w_r, w_w (T, B, H, S), w_u, w_lu (T, B, S), memory (B, S, W);
    fresh arrays in the input dtype."""
    out = _run_forward(keys, alpha, memory0, read0, usage0, gamma, keep=False)
    _, _, _, reads, w_r, w_w, w_u, w_lu, Ms, _, _ = out
    T = reads.shape[0]
    return reads, w_r, w_w, w_u, w_lu, Ms[:, T % 2].copy()


def lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gamma):
    """Same contract as metacore.reference.lrua.lrua_backward:
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S)."""
    keys, read0, g, _, w_r, w_w, _, _, Ms, wlu_prev, zs = _run_forward(
        keys, alpha, memory0, read0, usage0, gamma, keep=True)
    T, B, H, W = keys.shape
    S = Ms.shape[2]
    dt = keys.dtype
    dkeys = np.empty((T, B, H, W), dt)
    dalpha = np.empty((T, B, H), dt)
    dmemory0 = np.empty((B, S, W), dt)
    dread0 = np.empty((B, H, S), dt)
    _backward(_c(dreads), keys, g, read0, w_r, w_w, Ms, wlu_prev, zs, dt.type(EPS),
              dkeys, dalpha, dmemory0, dread0)
    if np.ndim(alpha) == 1:
        dalpha = dalpha.sum(axis=(0, 1))                # (H,)
    return dkeys, dalpha, dmemory0, dread0


def _step_gates(alpha, B, H, dtype):
    """alpha: (H,) or (B, H) -> sigmoid(alpha): (B, H), a fresh writable array."""
    half = dtype.type(0.5)
    g = np.empty((B, H), dtype)
    g[...] = half * (1 + np.tanh(half * np.asarray(alpha, dtype=dtype)))
    return g


def _run_step(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma):
    key, memory_prev, w_r_prev, w_u_prev = (_c(key), _c(memory_prev), _c(w_r_prev),
                                            _c(w_u_prev))
    B, H, W = key.shape
    S = memory_prev.shape[1]
    dt = key.dtype
    g = _step_gates(alpha, B, H, dt)
    read = np.empty((B, H, W), dt)
    memory = np.empty((B, S, W), dt)
    w_r = np.empty((B, H, S), dt)
    w_w = np.empty((B, H, S), dt)
    w_u = np.empty((B, S), dt)
    wlu = np.empty((B, S), dt)
    zs = np.empty(B, np.int64)
    _step_forward_batch(key, g, memory_prev, w_r_prev, w_u_prev, dt.type(gamma),
                        dt.type(EPS), read, memory, w_r, w_w, w_u, wlu, zs)
    return key, w_r_prev, g, read, memory, w_r, w_w, w_u, wlu, zs


def lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma):
    """Same contract as metacore.reference.lrua.lrua_step_forward:
    -> read (B, H, W), memory (B, S, W), w_r, w_w (B, H, S), w_u (B, S)."""
    out = _run_step(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma)
    return out[3:8]


def lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev, w_u_prev,
                       gamma):
    """Same contract as metacore.reference.lrua.lrua_step_backward (recomputes the step):
    -> dkey (B, H, W), dalpha (shape of alpha), dmemory_prev (B, S, W), dw_r_prev (B, H, S)."""
    key, w_r_prev, g, _, memory, w_r, w_w, _, wlu, zs = _run_step(
        key, alpha, memory_prev, w_r_prev, w_u_prev, gamma)
    B, H, W = key.shape
    S = memory.shape[1]
    dt = key.dtype
    dkey = np.empty((B, H, W), dt)
    dalpha = np.empty((B, H), dt)
    dmemory_prev = np.empty((B, S, W), dt)
    dw_r_prev = np.empty((B, H, S), dt)
    _step_backward_batch(_c(dread), _c(dmemory), _c(dw_r), key, g, w_r_prev, memory, w_r,
                         w_w, wlu, zs, dt.type(EPS), dkey, dalpha, dmemory_prev, dw_r_prev)
    if np.ndim(alpha) == 1:
        dalpha = dalpha.sum(axis=0)                     # (H,)
    return dkey, dalpha, dmemory_prev, dw_r_prev
