"""LRUA memory of MANN (Santoro et al. 2016): Numba CPU backend.

Shape letters (this module):
    T time steps, B episodes, H heads (n = H reads), S memory slots, W slot width.

Same contract and conventions as `metacore.reference.lrua` (read its docstring: the order of
the operations in a step, EPS, ties, what is non-differentiable). Inputs are assumed checked
by `metacore.kernels.lrua`; this module only makes them contiguous.

How the kernels differ from the reference:
  * One work item per episode b (prange over B); the time loop runs inside it, so a whole
    episode's recurrence stays in one thread with no Python between steps, and no array is
    allocated inside the step loop.
  * The memory is kept transposed, M_t^T: (W, S), so that every loop over the slots i is a
    contiguous innermost loop: the write, the slot norms, the cosines, dL/dM and dL/dw_w
    are axpy loops over i. One pass over x per step does the write, the norms and the
    cosines of the forward; one more pass after dL/dw_r does the whole rest of the reverse.
  * fastmath={'reassoc', 'contract'} only (no nnan / ninf / afn): LLVM may reorder a sum
    and fuse multiply-adds, so that the remaining sums over i (the reads, dL/dk, the
    softmax) vectorize too. Every value is still IEEE; only the order of each sum differs
    from the reference, within tests/test_lrua.py's bounds in both dtypes.
  * Everything accumulates in the input dtype (float32 stays float32); cosines and the
    softmax are bounded, and tests/test_lrua.py bounds the float32 error of a whole episode.
  * The least-used slots come from a running list of the n smallest (usage, index) pairs
    (n = H, no sort; a later slot never passes an equal earlier one, so ties go to the lower
    index as in the reference's stable sort); it gives the n-th smallest m(w_u, n) for the
    "shared" rule, the h-th least-used slot of head h for "per_head", and the zeroed slot.
    Step t computes w_lu_t (H, S), one row per head, and the slot step t + 1 zeroes once,
    for its output (the union over heads) and for step t + 1.
  * The write content a_t (the add vector, or the keys themselves) is a separate argument
    of every kernel, and the reverse returns the key gradient through the reads and the
    write content's gradient apart; without an add vector the wrapper sums the two.
  * lrua_forward_tape keeps what the reverse sweep needs: M_t^T for every t, the cosines,
    the clamped norms, w_r, w_w, w_lu_{t-1} and the zeroed slots; lrua_backward_tape then
    runs only the reverse sweep. lrua_backward is the same forward (keeping) followed by
    the same sweep; lrua_forward keeps two memories per episode (ping-pong), not T + 1.
  * The step pair (lrua_step_forward / lrua_step_backward) runs the same per-step kernels
    (_fwd_step, _bwd_step) as the episode loops, parallel over episodes, transposing the
    memory in and out; the backward recomputes its step's forward first.
"""
import weakref

import numpy as np
from numba import njit, prange

EPS = 1e-8
# reorder sums and fuse multiply-adds; every other IEEE guarantee (NaN, inf, exact
# functions, signed zeros) is kept
FM = {"reassoc", "contract"}


# ---------------------------------------------------------------- least-used selection
@njit(fastmath=FM, cache=True)
def _select(wu, n, per_head, wlu, buf, ibuf):
    """wu: (S,) -> z = o_0, the first argmin; writes wlu: (n, S), row h the least-used
    weights of head h: per_head 1: one-hot at o_h, the h-th least-used slot; 0 ("shared"):
    1 where wu <= m(wu, n), the n-th smallest, else 0, in every row (ties: every slot at or
    below m). The order o sorts (wu(i), i) ascending (metacore.reference.lrua, step 0).
    Scratch buf: (n,), ibuf: (n,) int64, left holding the n smallest values and their
    slots in that order."""
    S = wu.shape[0]
    for j in range(n):
        buf[j] = np.inf
        ibuf[j] = 0
    for i in range(S):
        v = wu[i]
        if v < buf[n - 1]:                  # an equal value ranks after the earlier slot
            j = n - 1
            while j > 0 and buf[j - 1] > v:
                buf[j] = buf[j - 1]
                ibuf[j] = ibuf[j - 1]
                j -= 1
            buf[j] = v
            ibuf[j] = i
    if per_head:
        for h in range(n):
            for i in range(S):
                wlu[h, i] = 0
            wlu[h, ibuf[h]] = 1
    else:
        m = buf[n - 1]
        for i in range(S):
            f = 1 if wu[i] <= m else 0
            for h in range(n):
                wlu[h, i] = f
    return ibuf[0]


# ---------------------------------------------------------------- small products
@njit(fastmath=FM, cache=True)
def _acc_hx(out, coef, inp):
    """out (H, S) += coef (H, X) @ inp (X, S): four rows of inp and four rows of out per
    loop over the slots (then the remainders one at a time)."""
    H, X = coef.shape
    S = inp.shape[1]
    H4 = H - H % 4
    X4 = X - X % 4
    for h in range(0, H4, 4):
        for x in range(0, X4, 4):
            a00, a01, a02, a03 = coef[h, x], coef[h, x + 1], coef[h, x + 2], coef[h, x + 3]
            a10, a11, a12, a13 = coef[h + 1, x], coef[h + 1, x + 1], coef[h + 1, x + 2], coef[h + 1, x + 3]
            a20, a21, a22, a23 = coef[h + 2, x], coef[h + 2, x + 1], coef[h + 2, x + 2], coef[h + 2, x + 3]
            a30, a31, a32, a33 = coef[h + 3, x], coef[h + 3, x + 1], coef[h + 3, x + 2], coef[h + 3, x + 3]
            for i in range(S):
                m0, m1, m2, m3 = inp[x, i], inp[x + 1, i], inp[x + 2, i], inp[x + 3, i]
                out[h, i] += (a00 * m0 + a01 * m1) + (a02 * m2 + a03 * m3)
                out[h + 1, i] += (a10 * m0 + a11 * m1) + (a12 * m2 + a13 * m3)
                out[h + 2, i] += (a20 * m0 + a21 * m1) + (a22 * m2 + a23 * m3)
                out[h + 3, i] += (a30 * m0 + a31 * m1) + (a32 * m2 + a33 * m3)
        for x in range(X4, X):
            a0, a1, a2, a3 = coef[h, x], coef[h + 1, x], coef[h + 2, x], coef[h + 3, x]
            for i in range(S):
                m = inp[x, i]
                out[h, i] += a0 * m
                out[h + 1, i] += a1 * m
                out[h + 2, i] += a2 * m
                out[h + 3, i] += a3 * m
    for h in range(H4, H):
        for x in range(0, X4, 4):
            a0, a1, a2, a3 = coef[h, x], coef[h, x + 1], coef[h, x + 2], coef[h, x + 3]
            for i in range(S):
                out[h, i] += (a0 * inp[x, i] + a1 * inp[x + 1, i]) + (a2 * inp[x + 2, i]
                                                                   + a3 * inp[x + 3, i])
        for x in range(X4, X):
            a = coef[h, x]
            for i in range(S):
                out[h, i] += a * inp[x, i]


@njit(fastmath=FM, cache=True)
def _acc_xh(out, coef, inp):
    """out (X, S) += coef^T (X, H) @ inp (H, S), coef: (H, X): _acc_hx with the roles of
    the rows swapped."""
    H, X = coef.shape
    S = inp.shape[1]
    H4 = H - H % 4
    X4 = X - X % 4
    for x in range(0, X4, 4):
        for h in range(0, H4, 4):
            a00, a01, a02, a03 = coef[h, x], coef[h + 1, x], coef[h + 2, x], coef[h + 3, x]
            a10, a11, a12, a13 = coef[h, x + 1], coef[h + 1, x + 1], coef[h + 2, x + 1], coef[h + 3, x + 1]
            a20, a21, a22, a23 = coef[h, x + 2], coef[h + 1, x + 2], coef[h + 2, x + 2], coef[h + 3, x + 2]
            a30, a31, a32, a33 = coef[h, x + 3], coef[h + 1, x + 3], coef[h + 2, x + 3], coef[h + 3, x + 3]
            for i in range(S):
                m0, m1, m2, m3 = inp[h, i], inp[h + 1, i], inp[h + 2, i], inp[h + 3, i]
                out[x, i] += (a00 * m0 + a01 * m1) + (a02 * m2 + a03 * m3)
                out[x + 1, i] += (a10 * m0 + a11 * m1) + (a12 * m2 + a13 * m3)
                out[x + 2, i] += (a20 * m0 + a21 * m1) + (a22 * m2 + a23 * m3)
                out[x + 3, i] += (a30 * m0 + a31 * m1) + (a32 * m2 + a33 * m3)
        for h in range(H4, H):
            a0, a1, a2, a3 = coef[h, x], coef[h, x + 1], coef[h, x + 2], coef[h, x + 3]
            for i in range(S):
                m = inp[h, i]
                out[x, i] += a0 * m
                out[x + 1, i] += a1 * m
                out[x + 2, i] += a2 * m
                out[x + 3, i] += a3 * m
    for x in range(X4, X):
        for h in range(0, H4, 4):
            a0, a1, a2, a3 = coef[h, x], coef[h + 1, x], coef[h + 2, x], coef[h + 3, x]
            for i in range(S):
                out[x, i] += (a0 * inp[h, i] + a1 * inp[h + 1, i]) + (a2 * inp[h + 2, i]
                                                                   + a3 * inp[h + 3, i])
        for h in range(H4, H):
            a = coef[h, x]
            for i in range(S):
                out[x, i] += a * inp[h, i]


@njit(fastmath=FM, cache=True)
def _dot_hx(out, a, b):
    """out (H, X) += a (H, S) @ b^T, b: (X, S): sums over the slots (reassociated, so that
    each vectorizes), four heads and two rows of b per pass (eight sums)."""
    H, S = a.shape
    X = b.shape[0]
    dt = a.dtype
    H4 = H - H % 4
    X2 = X - X % 2
    for x in range(0, X2, 2):
        for h in range(0, H4, 4):
            s0 = dt.type(0)
            s1 = dt.type(0)
            s2 = dt.type(0)
            s3 = dt.type(0)
            t0 = dt.type(0)
            t1 = dt.type(0)
            t2 = dt.type(0)
            t3 = dt.type(0)
            for i in range(S):
                m = b[x, i]
                n = b[x + 1, i]
                a0, a1, a2, a3 = a[h, i], a[h + 1, i], a[h + 2, i], a[h + 3, i]
                s0 += a0 * m
                s1 += a1 * m
                s2 += a2 * m
                s3 += a3 * m
                t0 += a0 * n
                t1 += a1 * n
                t2 += a2 * n
                t3 += a3 * n
            out[h, x] += s0
            out[h + 1, x] += s1
            out[h + 2, x] += s2
            out[h + 3, x] += s3
            out[h, x + 1] += t0
            out[h + 1, x + 1] += t1
            out[h + 2, x + 1] += t2
            out[h + 3, x + 1] += t3
        for h in range(H4, H):
            s = dt.type(0)
            t = dt.type(0)
            for i in range(S):
                s += a[h, i] * b[x, i]
                t += a[h, i] * b[x + 1, i]
            out[h, x] += s
            out[h, x + 1] += t
    for x in range(X2, X):
        for h in range(H):
            s = dt.type(0)
            for i in range(S):
                s += a[h, i] * b[x, i]
            out[h, x] += s


@njit(fastmath=FM, cache=True)
def _sumsq_rows(a, out):
    """out (S,) = sum over the rows x of a (X, S) of a[x]^2, four rows per pass."""
    X, S = a.shape
    X4 = X - X % 4
    for i in range(S):
        out[i] = 0
    for x in range(0, X4, 4):
        for i in range(S):
            out[i] += (a[x, i] * a[x, i] + a[x + 1, i] * a[x + 1, i]) + (
                a[x + 2, i] * a[x + 2, i] + a[x + 3, i] * a[x + 3, i])
    for x in range(X4, X):
        for i in range(S):
            out[i] += a[x, i] * a[x, i]


@njit(fastmath=FM, cache=True)
def _softmax_row(c, out, h, ex):
    """out[h] (S,) = softmax(c[h]), c, out: (H, S); scratch ex: (2, S).

    Every c here is a cosine, in [-1, 1] up to rounding, and a softmax does not change when
    its arguments are shifted, so y = c(i) - 1 lies in [-2, 0] and exp(y) is computed in
    vectorizable form (no max to find first): exp(y) = 2^n exp(r), n = round(y / ln 2) in
    {-4, ..., 0} (a select, no bit tricks), r = y - n ln 2 in [-ln(2)/2, ln(2)/2] (Cody and
    Waite's two-part ln 2, n ln2_hi exact), exp(r) by its Taylor polynomial to degree 7 in
    float32, 13 in float64 (remainder below |r|^(d+1) / (d+1)! = 5e-9, resp. 4e-18,
    relative). If some |c(i)| exceeds 1.25 (it cannot, for a cosine) the row takes np.exp
    of c - max c instead."""
    S = c.shape[1]
    dt = c.dtype
    one = dt.type(1)
    half = dt.type(0.5)
    log2e = dt.type(1.4426950408889634)
    ln2_hi = dt.type(0.693359375)                   # 9 bits: n ln2_hi is exact
    ln2_lo = dt.type(-2.1219444005469058e-04)       # ln 2 - ln2_hi
    bad = 0
    for i in range(S):
        y = c[h, i] - one
        bad += 1 if abs(y + one) > dt.type(1.25) else 0
        n = np.floor(y * log2e + half)
        ex[0, i] = (y - n * ln2_hi) - n * ln2_lo
        ex[1, i] = one if n > -half else (half if n > dt.type(-1.5) else (
            dt.type(0.25) if n > dt.type(-2.5) else (
                dt.type(0.125) if n > dt.type(-3.5) else dt.type(0.0625))))
    tot = dt.type(0)
    if bad == 0:
        deg = 7 if c.itemsize == 4 else 13
        cj = one                                        # 1 / deg!
        for j in range(2, deg + 1):
            cj /= dt.type(j)
        for i in range(S):
            out[h, i] = cj
        for j in range(deg, 0, -1):                     # Horner, coefficient 1 / (j - 1)!
            cj *= dt.type(j)
            for i in range(S):
                out[h, i] = out[h, i] * ex[0, i] + cj
        for i in range(S):
            e = out[h, i] * ex[1, i]
            out[h, i] = e
            tot += e
    else:
        cmax = c[h, 0]
        for i in range(1, S):
            cmax = max(cmax, c[h, i])
        for i in range(S):
            e = np.exp(c[h, i] - cmax)
            out[h, i] = e
            tot += e
    inv = one / tot
    for i in range(S):
        out[h, i] *= inv


# ---------------------------------------------------------------- one step, forward
@njit(fastmath=FM, cache=True)
def _write(MTp, z, k, ww, MT):
    """Steps 3-4: MT (W, S) = M_t^T = M'^T + k^T w_w, M' = M_{t-1} with slot z zeroed;
    MTp: (W, S) M_{t-1}^T, k: (H, W) the write content a_t, ww: (H, S). The reverse sweep recomputes M_t with
    this same function from the kept checkpoints, so it gets the forward's values."""
    W, S = MTp.shape
    for x in range(W):
        for i in range(S):
            MT[x, i] = MTp[x, i]
        MT[x, z] = 0
    _acc_xh(MT, k, ww)


@njit(fastmath=FM, cache=True)
def _fwd_step(k, a, g, MTp, wr_prev, wu_prev, wlu_prev, z, gamma, eps,
              MT, wr, ww, wu, r, c, kn, mn, ex):
    """One step of one episode (steps 2-7 of metacore.reference.lrua; step 1 and the slot z
    come from _select of wu_prev).

    k: (H, W) keys, a: (H, W) write content, g: (H,) gates, MTp: (W, S) M_{t-1}^T,
    wr_prev: (H, S), wu_prev: (S,), wlu_prev: (H, S) w_lu_{t-1}, z: the slot to zero; writes MT: (W, S) M_t^T, wr, ww: (H, S),
    wu: (S,), r: (H, W), c: (H, S) the cosines, kn: (H,), mn: (S,) the clamped norms;
    scratch ex: (2, S)."""
    H, W = k.shape
    S = MTp.shape[1]
    dt = k.dtype
    one = dt.type(1)
    # 2. write weights
    for h in range(H):
        gh = g[h]
        for i in range(S):
            ww[h, i] = gh * wr_prev[h, i] + (one - gh) * wlu_prev[h, i]
    # 3-4. zero slot z, write every head's content
    _write(MTp, z, a, ww, MT)
    # 5. cosines with clamped norms, softmax over slots
    for h in range(H):
        acc = dt.type(0)
        for x in range(W):
            acc += k[h, x] * k[h, x]
        kn[h] = max(np.sqrt(acc), eps)
    _sumsq_rows(MT, mn)
    for i in range(S):
        mn[i] = max(np.sqrt(mn[i]), eps)
    for h in range(H):
        for i in range(S):
            c[h, i] = 0
    _acc_hx(c, k, MT)
    for h in range(H):
        knh = kn[h]
        for i in range(S):
            c[h, i] = c[h, i] / (knh * mn[i])
        _softmax_row(c, wr, h, ex)
    # 6. reads r = w_r M_t
    for h in range(H):
        for x in range(W):
            r[h, x] = 0
    _dot_hx(r, wr, MT)
    # 7. usage
    for i in range(S):
        wu[i] = gamma * wu_prev[i]
    for h in range(H):
        for i in range(S):
            wu[i] += wr[h, i] + ww[h, i]


@njit(fastmath=FM, cache=True)
def _copy2(a, out):
    """out (R, C) = a (R, C), as a plain loop (a slice assignment is several times slower)."""
    R, C = a.shape
    for j in range(R):
        for i in range(C):
            out[j, i] = a[j, i]


@njit(fastmath=FM, cache=True)
def _episode_forward(b, keys, adds, per_head, g, memory0, read0, usage0, gamma, eps,
                     reads, w_r, w_w, w_u, w_lu, MTs, MTc, cs, kns, mns, wrs, wws, wlus, zs):
    """Run episode b over T steps, overwriting reads[:, b], w_r[:, b], w_w[:, b], w_u[:, b],
    w_lu[:, b], MTs[b] (two memories, ping-pong; M_T^T ends in MTs[b, T % 2]), and what the
    reverse sweep needs (when MTc.shape[1] > 0; else cs, kns, mns have one step and the
    rest is left alone): MTc[b, j] = M_{jK}^T, the checkpoint of every K-th memory
    (K = ceil(T / MTc.shape[1]); the sweep recomputes the others with _write), the cosines
    and clamped norms cs[b, t], kns[b, t], mns[b, t] of step t, copies wrs[b, t], wws[b, t]
    of w_r_t, w_w_t, wlus[b, t] = w_lu_{t-1} and zs[b, t], the slot step t zeroes.

    keys, adds: (T, B, H, W) (adds: the write content, keys again without an add vector),
    per_head: 1 for the "per_head" write rule, 0 for "shared", g: (T, B, H),
    memory0: (B, S, W), read0: (B, H, S), usage0: (B, S);
    reads: (T, B, H, W), w_r, w_w: (T, B, H, S), w_u, w_lu: (T, B, S), MTs: (B, 2, W, S),
    MTc: (B, C, W, S), cs: (B, T or 1, H, S), kns: (B, T or 1, H), mns: (B, T or 1, S),
    wrs, wws: (B, T, H, S) or (B, 0, H, S), wlus: (B, T, H, S), zs: (B, T) int64."""
    T, _, H, W = keys.shape
    S = memory0.shape[1]
    C = MTc.shape[1]
    K = (T + C - 1) // C if C > 0 else T + 1
    L = cs.shape[1]
    buf = np.empty(H, dtype=keys.dtype)
    ibuf = np.empty(H, dtype=np.int64)
    wlast = np.empty((H, S), dtype=keys.dtype)          # w_lu_{T-1}: returned only
    ex = np.empty((2, S), dtype=keys.dtype)
    for i in range(S):
        for x in range(W):
            MTs[b, 0, x, i] = memory0[b, i, x]
    z = _select(usage0[b], H, per_head, wlus[b, 0], buf, ibuf)
    for t in range(T):
        wr_prev = read0[b] if t == 0 else w_r[t - 1, b]  # (H, S)
        wu_prev = usage0[b] if t == 0 else w_u[t - 1, b]  # (S,)
        if C > 0 and t % K == 0:
            _copy2(MTs[b, t % 2], MTc[b, t // K])
        zs[b, t] = z
        _fwd_step(keys[t, b], adds[t, b], g[t, b], MTs[b, t % 2], wr_prev, wu_prev,
                  wlus[b, t], z,
                  gamma, eps, MTs[b, (t + 1) % 2], w_r[t, b], w_w[t, b], w_u[t, b],
                  reads[t, b], cs[b, t % L], kns[b, t % L], mns[b, t % L], ex)
        if C > 0:
            _copy2(w_r[t, b], wrs[b, t])
            _copy2(w_w[t, b], wws[b, t])
        # the least-used weights w_u_t implies: step t + 1's w_lu_{t-1}, and returned as
        # their union over heads
        wl = wlus[b, t + 1] if t + 1 < T else wlast
        z = _select(w_u[t, b], H, per_head, wl, buf, ibuf)
        for i in range(S):
            v = wl[0, i]
            for h in range(1, H):
                v = max(v, wl[h, i])
            w_lu[t, b, i] = v


@njit(parallel=True, fastmath=FM, cache=True)
def _forward(keys, adds, per_head, g, memory0, read0, usage0, gamma, eps,
             reads, w_r, w_w, w_u, w_lu, MTs, MTc, cs, kns, mns, wrs, wws, wlus, zs):
    """Every episode in parallel; see _episode_forward for the arguments."""
    for b in prange(keys.shape[1]):
        _episode_forward(b, keys, adds, per_head, g, memory0, read0, usage0, gamma, eps,
                         reads, w_r, w_w, w_u, w_lu, MTs, MTc, cs, kns, mns, wrs, wws, wlus,
                         zs)


# ---------------------------------------------------------------- one step, reverse
@njit(fastmath=FM, cache=True)
def _bwd_step(dr, k, a, g, MT, wr, ww, wr_prev, wlu, z, c, kn, mn, eps,
              dMT, dwr, dk, da, dalpha, gi, f, sm):
    """Reverse of one step of one episode (formulas: metacore.reference.lrua.lrua_backward).

    dr: (H, W) dL/dr_t, k: (H, W) keys, a: (H, W) write content, g: (H,), MT: (W, S) M_t^T,
    wr, ww: (H, S) w_r_t, w_w_t, wr_prev: (H, S) w_r_{t-1}, wlu: (H, S) w_lu_{t-1}, z: the
    zeroed slot, c: (H, S) the cosines, kn: (H,), mn: (S,) the clamped norms, all of step t.
    In place: dMT: (W, S) holds dL/dM_t^T on entry, dL/dM_{t-1}^T on exit; dwr: (H, S)
    holds dL/dw_r_t on entry, dL/dw_r_{t-1} on exit. Overwrites dk: (H, W) (through the
    reads only), da: (H, W) (dL/da_t, through the write), dalpha: (H,).
    Scratch: gi: (H, S), f: (H,), sm: (S,)."""
    H, W = k.shape
    S = MT.shape[1]
    dt = k.dtype
    # read r = w_r M: dL/dw_r += dr M_t^T
    _acc_hx(dwr, dr, MT)
    # softmax over slots, then the cosine's coefficients:
    # gi = dc / (a_h b_i), f_h = [|k^h| > EPS] sum_i dc c / a_h^2, sm_i likewise over h
    for i in range(S):
        sm[i] = 0
    for h in range(H):
        acc = dt.type(0)
        for i in range(S):
            acc += wr[h, i] * dwr[h, i]
        knh = kn[h]
        s = dt.type(0)
        for i in range(S):
            d = wr[h, i] * (dwr[h, i] - acc)
            dcc = d * c[h, i]
            s += dcc
            sm[i] += dcc
            gi[h, i] = d / (knh * mn[i])
        f[h] = s / (knh * knh) if knh > eps else 0
    for i in range(S):
        sm[i] = sm[i] / (mn[i] * mn[i]) if mn[i] > eps else 0
    # dL/dM_t^T: read (dr^T w_r) and cosine (k^T gi - sm M_t^T) parts
    for x in range(W):
        for i in range(S):
            dMT[x, i] -= sm[i] * MT[x, i]
    _acc_xh(dMT, dr, wr)
    _acc_xh(dMT, k, gi)
    # dL/dk: cosine (gi M_t - f k); dL/da: write (w_w dL/dM_t)
    for h in range(H):
        fh = f[h]
        for x in range(W):
            dk[h, x] = -fh * k[h, x]
            da[h, x] = 0
    _dot_hx(dk, gi, MT)
    _dot_hx(da, ww, dMT)
    # write M_t = M' + w_w^T a: dL/dw_w = a dL/dM_t^T (into dwr until the gate)
    for h in range(H):
        for i in range(S):
            dwr[h, i] = 0
    _acc_hx(dwr, a, dMT)
    # zeroing of the least-used slot
    for x in range(W):
        dMT[x, z] = 0
    # gate: w_w = g w_r_{t-1} + (1 - g) w_lu_{t-1}
    for h in range(H):
        gh = g[h]
        acc = dt.type(0)
        for i in range(S):
            acc += dwr[h, i] * (wr_prev[h, i] - wlu[h, i])
            dwr[h, i] *= gh
        dalpha[h] = gh * (1 - gh) * acc


@njit(parallel=True, fastmath=FM, cache=True)
def _backward(dreads, keys, adds, g, read0, MTc, cs, kns, mns, wrs, wws, wlus, zs, eps,
              dkeys, dadds, dalpha, dmemory0, dread0):
    """BPTT for every episode in parallel (formulas: metacore.reference.lrua.lrua_backward),
    over what _episode_forward kept: dreads, keys, adds: (T, B, H, W), g: (T, B, H), read0:
    (B, H, S), MTc: (B, C, W, S) the checkpoints M_{jK}^T, cs: (B, T, H, S), kns: (B, T, H),
    mns: (B, T, S), wrs, wws: (B, T, H, S), wlus: (B, T, H, S), zs: (B, T). Segment by segment
    from the last, M_{jK + 1} .. M_{jK + K} are recomputed from the checkpoint (the write
    only, into a ring of K memories) and the segment's steps run in reverse
    -> dkeys (through the reads), dadds (through the write): (T, B, H, W), dalpha:
    (T, B, H), dmemory0: (B, S, W), dread0: (B, H, S), all overwritten."""
    T, B, H, W = keys.shape
    S = MTc.shape[3]
    C = MTc.shape[1]
    K = (T + C - 1) // C
    for b in prange(B):
        dt = keys.dtype
        dMT = np.zeros((W, S), dtype=dt)
        dwr = np.zeros((H, S), dtype=dt)
        gi = np.empty((H, S), dtype=dt)
        f = np.empty(H, dtype=dt)
        sm = np.empty(S, dtype=dt)
        ring = np.empty((K, W, S), dtype=dt)            # ring[q] = M_{jK + q + 1}^T
        for j in range(C - 1, -1, -1):
            t0 = j * K
            t1 = min(T, t0 + K)
            for t in range(t0, t1):
                _write(MTc[b, j] if t == t0 else ring[t - t0 - 1], zs[b, t], adds[t, b],
                       wws[b, t], ring[t - t0])
            for t in range(t1 - 1, t0 - 1, -1):
                wr_prev = read0[b] if t == 0 else wrs[b, t - 1]
                _bwd_step(dreads[t, b], keys[t, b], adds[t, b], g[t, b], ring[t - t0],
                          wrs[b, t], wws[b, t], wr_prev, wlus[b, t], zs[b, t], cs[b, t],
                          kns[b, t], mns[b, t], eps, dMT, dwr, dkeys[t, b], dadds[t, b],
                          dalpha[t, b], gi, f, sm)
        for i in range(S):
            for x in range(W):
                dmemory0[b, i, x] = dMT[x, i]
        for h in range(H):
            for i in range(S):
                dread0[b, h, i] = dwr[h, i]


# ---------------------------------------------------------------- one step, a batch
@njit(fastmath=FM, cache=True)
def _transpose(a, out):
    """a: (R, C) -> out: (C, R) = a^T, overwritten."""
    R, C = a.shape
    for j in range(R):
        for x in range(C):
            out[x, j] = a[j, x]


@njit(fastmath=FM, cache=True)
def _one_step(key, add, per_head, g, memory_prev, w_r_prev, w_u_prev, gamma, eps,
              read, w_r, w_w, w_u, MTp, MT, wlu, c, kn, mn, ex):
    """lrua_step_forward of one episode, its memory transposed in and left in MT: (W, S);
    -> z. Scratch and kept values: MTp (W, S), wlu (H, S), c (H, S), kn (H,), mn (S,),
    ex (2, S)."""
    H = key.shape[0]
    _transpose(memory_prev, MTp)
    z = _select(w_u_prev, H, per_head, wlu, np.empty(H, dtype=key.dtype),
                np.empty(H, dtype=np.int64))
    _fwd_step(key, add, g, MTp, w_r_prev, w_u_prev, wlu, z, gamma, eps, MT, w_r, w_w, w_u, read,
              c, kn, mn, ex)
    return z


@njit(parallel=True, fastmath=FM, cache=True)
def _step_forward_batch(key, add, per_head, g, memory_prev, w_r_prev, w_u_prev, gamma, eps,
                        read, memory, w_r, w_w, w_u):
    """lrua_step_forward for every episode in parallel. key, add: (B, H, W), g: (B, H),
    memory_prev: (B, S, W), w_r_prev: (B, H, S), w_u_prev: (B, S); overwrites read: (B, H, W),
    memory: (B, S, W), w_r, w_w: (B, H, S), w_u: (B, S)."""
    B, H, W = key.shape
    S = memory_prev.shape[1]
    for b in prange(B):
        dt = key.dtype
        MT = np.empty((W, S), dt)
        _one_step(key[b], add[b], per_head, g[b], memory_prev[b], w_r_prev[b], w_u_prev[b],
                  gamma, eps, read[b], w_r[b], w_w[b], w_u[b], np.empty((W, S), dt), MT,
                  np.empty((H, S), dt), np.empty((H, S), dt), np.empty(H, dt), np.empty(S, dt),
                  np.empty((2, S), dt))
        _transpose(MT, memory[b])


@njit(parallel=True, fastmath=FM, cache=True)
def _step_backward_batch(dread, dmemory, dw_r, key, add, per_head, g, memory_prev, w_r_prev,
                         w_u_prev, gamma, eps, dkey, dadd, dalpha, dmemory_prev, dw_r_prev):
    """lrua_step_backward for every episode in parallel: recompute the step, then reverse it.
    Overwrites dkey (through the reads), dadd (through the write): (B, H, W), dalpha:
    (B, H), dmemory_prev: (B, S, W), dw_r_prev: (B, H, S)."""
    B, H, W = key.shape
    S = memory_prev.shape[1]
    for b in prange(B):
        dt = key.dtype
        MT = np.empty((W, S), dt)
        wr = np.empty((H, S), dt)
        ww = np.empty((H, S), dt)
        wlu = np.empty((H, S), dt)
        c = np.empty((H, S), dt)
        kn = np.empty(H, dt)
        mn = np.empty(S, dt)
        dMT = np.empty((W, S), dt)              # also the scratch M_{t-1}^T of the recompute
        z = _one_step(key[b], add[b], per_head, g[b], memory_prev[b], w_r_prev[b],
                      w_u_prev[b], gamma, eps, np.empty((H, W), dt), wr, ww, np.empty(S, dt), dMT, MT, wlu, c, kn, mn,
                      np.empty((2, S), dt))
        _transpose(dmemory[b], dMT)
        for h in range(H):
            for i in range(S):
                dw_r_prev[b, h, i] = dw_r[b, h, i]
        _bwd_step(dread[b], key[b], add[b], g[b], MT, wr, ww, w_r_prev[b], wlu, z, c, kn, mn,
                  eps, dMT, dw_r_prev[b], dkey[b], dadd[b], dalpha[b], np.empty((H, S), dt),
                  np.empty(H, dt), np.empty(S, dt))
        _transpose(dMT, dmemory_prev[b])


# ---------------------------------------------------------------- public functions
def _c(x):
    return np.ascontiguousarray(x)


def _gates(alpha, lead, dtype):
    """alpha: (H,) or lead + (H,) -> sigmoid(alpha): lead + (H,), a fresh writable array (a
    read-only broadcast view would be a different Numba type: a second compilation)."""
    half = dtype.type(0.5)
    g = np.empty(tuple(lead) + (alpha.shape[-1],), dtype)
    g[...] = half * (1 + np.tanh(half * np.asarray(alpha, dtype=dtype)))
    return g


# memories per checkpoint segment: the tape keeps every K-th M_t (B ceil(T / K) S W values,
# not B (T + 1) S W) and the sweep recomputes the others (the write only, H S W per step)
# into a ring of K memories that stays in cache; streaming every M_t out to memory and back
# cost more than that write
SEGMENT = 10


# One spare set of tape buffers per episode shape and dtype, refilled when a tape (or the
# recomputing lrua_backward) is done with its set. A training loop's next forward then
# reuses memory that is already mapped: fresh arrays of these sizes were handed back to the
# OS on every free and page-faulted in again on every call (about 2,800 faults, a third of
# the bench episode's time).
_SPARE = {}


def _tape_buffers(T, B, H, S, W, dt):
    """-> key, (MTc, cs, kns, mns, wrs, wws, wlus, zs): the spare set for this shape, or a
    fresh one; every array is overwritten by the forward kernel."""
    key = (T, B, H, S, W, dt.str)
    bufs = _SPARE.pop(key, None)
    if bufs is None:
        C = (T + SEGMENT - 1) // SEGMENT
        bufs = (np.empty((B, C, W, S), dt), np.empty((B, T, H, S), dt),
                np.empty((B, T, H), dt), np.empty((B, T, S), dt), np.empty((B, T, H, S), dt),
                np.empty((B, T, H, S), dt), np.empty((B, T, H, S), dt),
                np.empty((B, T), np.int64))
    return key, bufs


def _per_head(write_rule):
    if write_rule not in ("shared", "per_head"):
        raise ValueError(f"lrua (numba): write_rule must be 'shared' or 'per_head', got "
                         f"{write_rule!r}")
    return 1 if write_rule == "per_head" else 0


def _run_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule, adds, bufs=None):
    """The forward kernel; bufs (from _tape_buffers): also keep what the reverse sweep needs
    in them. -> outputs (reads, w_r, w_w, w_u, w_lu, memory) and the kept arrays (keys,
    adds (None without an add vector), g, read0, MTc, cs, kns, mns, wrs, wws, wlus, zs),
    keys, adds and read0 contiguous (not copied)."""
    keys, memory0, read0, usage0 = _c(keys), _c(memory0), _c(read0), _c(usage0)
    if adds is not None:
        adds = _c(adds)
    T, B, H, W = keys.shape
    S = memory0.shape[1]
    dt = keys.dtype
    g = _gates(alpha, (T, B), dt)
    reads = np.empty((T, B, H, W), dt)
    w_r = np.empty((T, B, H, S), dt)
    w_w = np.empty((T, B, H, S), dt)
    w_u = np.empty((T, B, S), dt)
    w_lu = np.empty((T, B, S), dt)
    MTs = np.empty((B, 2, W, S), dt)
    if bufs is None:                                    # nothing kept: one-step scratch
        bufs = (np.empty((B, 0, W, S), dt), np.empty((B, 1, H, S), dt),
                np.empty((B, 1, H), dt), np.empty((B, 1, S), dt),
                np.empty((B, 0, H, S), dt), np.empty((B, 0, H, S), dt),
                np.empty((B, T, H, S), dt), np.empty((B, T), np.int64))
    MTc, cs, kns, mns, wrs, wws, wlus, zs = bufs
    _forward(keys, keys if adds is None else adds, _per_head(write_rule), g, memory0, read0,
             usage0, dt.type(gamma), dt.type(EPS),
             reads, w_r, w_w, w_u, w_lu, MTs, MTc, cs, kns, mns, wrs, wws, wlus, zs)
    memory = np.ascontiguousarray(MTs[:, T % 2].transpose(0, 2, 1))     # (B, S, W)
    return ((reads, w_r, w_w, w_u, w_lu, memory),
            (keys, adds, g, read0, MTc, cs, kns, mns, wrs, wws, wlus, zs))


def _sweep(dreads, alpha_ndim, kept):
    """The reverse sweep over what _run_forward kept -> dkeys, dalpha, dmemory0, dread0,
    and dadds last when the forward had an add vector."""
    keys, adds, g, read0, MTc, cs, kns, mns, wrs, wws, wlus, zs = kept
    T, B, H, W = keys.shape
    S = MTc.shape[3]
    dt = keys.dtype
    dkeys = np.empty((T, B, H, W), dt)
    dadds = np.empty((T, B, H, W), dt)
    dalpha = np.empty((T, B, H), dt)
    dmemory0 = np.empty((B, S, W), dt)
    dread0 = np.empty((B, H, S), dt)
    _backward(_c(dreads), keys, keys if adds is None else adds, g, read0, MTc, cs, kns, mns,
              wrs, wws, wlus, zs, dt.type(EPS), dkeys, dadds, dalpha, dmemory0, dread0)
    if alpha_ndim == 1:
        dalpha = dalpha.sum(axis=(0, 1))                # (H,)
    if adds is None:
        dkeys += dadds                                  # the key was also the write content
        return dkeys, dalpha, dmemory0, dread0
    return dkeys, dalpha, dmemory0, dread0, dadds


def lrua_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule="shared", adds=None):
    """Same contract as metacore.reference.lrua.lrua_forward:
    -> reads (T, B, H, W), w_r, w_w (T, B, H, S), w_u, w_lu (T, B, S), memory (B, S, W);
    fresh arrays in the input dtype."""
    return _run_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule, adds)[0]


def _shape(keys, memory0):
    T, B, H, W = keys.shape
    return T, B, H, memory0.shape[1], W, np.dtype(keys.dtype)


def lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gamma, write_rule="shared",
                  adds=None):
    """Same contract as metacore.reference.lrua.lrua_backward (reruns the forward, keeping):
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S)
    (and dadds last when adds is given)."""
    key, bufs = _tape_buffers(*_shape(keys, memory0))
    _, kept = _run_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule, adds, bufs)
    grads = _sweep(dreads, np.ndim(alpha), kept)
    _SPARE[key] = bufs
    return grads


class _Tape:
    """This backend's tape (opaque to callers): alpha's ndim and the kept arrays; when it is
    garbage, its buffers become the spare set for the next forward of the same shape."""
    __slots__ = ("alpha_ndim", "kept", "__weakref__")

    def __init__(self, alpha_ndim, kept):
        self.alpha_ndim = alpha_ndim
        self.kept = kept


def lrua_forward_tape(keys, alpha, memory0, read0, usage0, gamma, write_rule="shared",
                      adds=None):
    """Same contract as metacore.reference.lrua.lrua_forward_tape:
    -> reads, w_r, w_w, w_u, w_lu, memory (as lrua_forward), tape. The tape (this
    backend's own; opaque) holds private copies of everything lrua_backward_tape reads (the
    kernel writes w_r and w_w twice), so changing the inputs or the returned arrays
    afterwards does not change the gradients."""
    key, bufs = _tape_buffers(*_shape(keys, memory0))
    out, kept = _run_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule, adds,
                             bufs)
    keys_, adds_, g, read0_, *rest = kept
    if keys_ is keys:
        keys_ = keys_.copy()
    if adds_ is not None and adds_ is adds:
        adds_ = adds_.copy()
    if read0_ is read0:
        read0_ = read0_.copy()
    tape = _Tape(np.ndim(alpha), (keys_, adds_, g, read0_, *rest))
    weakref.finalize(tape, _SPARE.__setitem__, key, bufs)
    return out + (tape,)


def lrua_backward_tape(dreads, tape):
    """Same contract as metacore.reference.lrua.lrua_backward_tape: the reverse sweep only.
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S);
    fresh arrays; the tape is left unchanged (it may be used again)."""
    return _sweep(dreads, tape.alpha_ndim, tape.kept)


def _run_step(key, alpha, memory_prev, w_r_prev, w_u_prev):
    key, memory_prev, w_r_prev, w_u_prev = (_c(key), _c(memory_prev), _c(w_r_prev),
                                            _c(w_u_prev))
    B, H, W = key.shape
    return key, memory_prev, w_r_prev, w_u_prev, _gates(alpha, (B,), key.dtype)


def lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma,
                      write_rule="shared", add=None):
    """Same contract as metacore.reference.lrua.lrua_step_forward:
    -> read (B, H, W), memory (B, S, W), w_r, w_w (B, H, S), w_u (B, S)."""
    key, memory_prev, w_r_prev, w_u_prev, g = _run_step(key, alpha, memory_prev, w_r_prev,
                                                        w_u_prev)
    B, H, W = key.shape
    S = memory_prev.shape[1]
    dt = key.dtype
    read = np.empty((B, H, W), dt)
    memory = np.empty((B, S, W), dt)
    w_r = np.empty((B, H, S), dt)
    w_w = np.empty((B, H, S), dt)
    w_u = np.empty((B, S), dt)
    _step_forward_batch(key, key if add is None else _c(add), _per_head(write_rule), g,
                        memory_prev, w_r_prev, w_u_prev, dt.type(gamma), dt.type(EPS), read,
                        memory, w_r, w_w, w_u)
    return read, memory, w_r, w_w, w_u


def lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev, w_u_prev,
                       gamma, write_rule="shared", add=None):
    """Same contract as metacore.reference.lrua.lrua_step_backward (recomputes the step):
    -> dkey (B, H, W), dalpha (shape of alpha), dmemory_prev (B, S, W), dw_r_prev (B, H, S)
    (and dadd last when add is given)."""
    key, memory_prev, w_r_prev, w_u_prev, g = _run_step(key, alpha, memory_prev, w_r_prev,
                                                        w_u_prev)
    B, H, W = key.shape
    S = memory_prev.shape[1]
    dt = key.dtype
    dkey = np.empty((B, H, W), dt)
    dadd = np.empty((B, H, W), dt)
    dalpha = np.empty((B, H), dt)
    dmemory_prev = np.empty((B, S, W), dt)
    dw_r_prev = np.empty((B, H, S), dt)
    _step_backward_batch(_c(dread), _c(dmemory), _c(dw_r), key,
                         key if add is None else _c(add), _per_head(write_rule), g,
                         memory_prev, w_r_prev, w_u_prev, dt.type(gamma), dt.type(EPS), dkey,
                         dadd, dalpha, dmemory_prev, dw_r_prev)
    if np.ndim(alpha) == 1:
        dalpha = dalpha.sum(axis=0)                     # (H,)
    if add is None:
        dkey += dadd                                    # the key was also the write content
        return dkey, dalpha, dmemory_prev, dw_r_prev
    return dkey, dalpha, dmemory_prev, dw_r_prev, dadd
