"""Episodic distances and the ProtoNet loss: Numba CUDA backend ('numba-cuda').

Shape letters (this module):
    T tasks, Q queries per task, N supports (or prototypes) per task, D features.

Same contract and conventions as `metacore.reference.distance` (EPS, sign(0) = 0, logits);
the seven public functions take the reference's arguments. Arrays in, arrays out of the same
kind: CUDA device arrays (Numba device arrays, or anything with __cuda_array_interface__
such as CuPy arrays) stay on the device and the results are Numba device arrays; NumPy
arrays are copied to the device and the results copied back (the caller asked for this
backend by name, so the copy is not silent). Device inputs must be C-contiguous.

Kernels (one set per dtype, built by _build; `KERNELS` lists them for the PTX tests):
    pair_fwd    out[t,i,j] = sum_k term(q_ik, s_jk), term = (q-s)^2 | |q-s| | q*s.
                A TILE x TILE block of outputs per thread block; the queries and supports
                of the block stream through shared memory KT features at a time, so each
                value loaded from global memory is used TILE times. Direct difference
                formula (never |q|^2 + |s|^2 - 2 q.s: see distance_numba), sum over k in
                order, accumulated in the input dtype, as the Numba CPU backend.
    pair_grad   out[t,i,k] = sum_j g[t,i,j] f(a_ik, b_jk), f = 2 (a-b) | sign(a-b) | b;
                g is read transposed (g[t,j,i]) for the supports' gradient, so no transpose
                is materialised. Tiles of g and b in shared memory, sum over j in order.
    row_norms   clamped norms max(|x|, EPS) and the mask |x| > EPS, one thread per row.
    cos_div     c /= qn sn (elementwise), the cosine from the dot products.
    cos_prep    gi = g / (qn sn), gc = g c (elementwise), for the cosine backward.
    cos_fix     dx[t,i,:] -= (sum_j gc[t,i,j]) on_i / n_i^2 x[t,i,:], one thread per row.
    softmax_ce  one thread per query row: logits = ss * d, loss row, w (softmax - onehot)
                times ss, first argmax; a label outside [0, N) gives NaN (device guard).
    row_mean    loss[t] = sum_i loss_rows[t,i] / Q, one thread per task.
protonet_loss = pair_fwd (+ cos_div) -> softmax_ce -> pair_grad (+ cos fixes), all on the
device: nothing comes back to the host between the kernels.
"""
import math

import numpy as np
from numba import config, cuda, float32, float64, int64

EPS = 1e-8
# The simulator (NUMBA_ENABLE_CUDASIM=1) runs every CUDA thread as a Python thread, so under
# it the tiles shrink to 4 x 4: the same code, more tile boundaries per test shape, 16 times
# fewer threads. Compiled kernels (and the PTX tests) use the real sizes.
_SIM = bool(config.ENABLE_CUDASIM)
TILE = 4 if _SIM else 16   # outputs per block side (blocks are TILE x TILE threads)
KT = TILE                  # features (forward) / partners (backward) per shared-memory tile
ROWS = 8 if _SIM else 128  # threads per block of the one-thread-per-row kernels
PAD = TILE + 1             # shared rows padded by one: column reads hit distinct banks
_NBTYPES = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}
_cache = {}


def _build(nbt):
    """The kernels for one Numba float type `nbt` (float32 or float64)."""

    # The per-pair terms are written inline in the kernels, not as @cuda.jit(device=True)
    # functions: numba-cuda compiles a called device function for the current device,
    # which compile_ptx without a GPU does not have.

    @cuda.jit
    def pair_fwd(q, s, mode, out):
        """q: (T, Q, D), s: (T, N, D) -> out: (T, Q, N), overwritten. Grid (ceil(N/TILE),
        ceil(Q/TILE), T), block (TILE, TILE): thread (x, y) owns out[t, i0 + y, j0 + x]."""
        qs = cuda.shared.array((TILE, PAD), nbt)      # q rows i0.., features k0..
        ss = cuda.shared.array((TILE, PAD), nbt)      # s rows j0.., features k0..
        T, Q, D = q.shape
        N = s.shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        t = cuda.blockIdx.z
        i0 = cuda.blockIdx.y * TILE
        j0 = cuda.blockIdx.x * TILE
        acc = nbt(0)
        for k0 in range(0, D, KT):
            # coalesced loads along k; outside the arrays load 0, never summed (nk below)
            iq = i0 + ty
            js = j0 + ty
            kk = k0 + tx
            qs[ty, tx] = q[t, iq, kk] if (iq < Q and kk < D) else nbt(0)
            ss[ty, tx] = s[t, js, kk] if (js < N and kk < D) else nbt(0)
            cuda.syncthreads()
            nk = min(KT, D - k0)
            for k in range(nk):
                a = qs[ty, k]
                v = ss[tx, k]
                if mode == 0:
                    d = a - v
                    acc += d * d
                elif mode == 1:
                    acc += abs(a - v)
                else:
                    acc += a * v
            cuda.syncthreads()
        i = i0 + ty
        j = j0 + tx
        if i < Q and j < N:
            out[t, i, j] = acc

    @cuda.jit
    def pair_grad(g, gtrans, a, b, mode, out):
        """out[t,i,k] = sum_j G[t,i,j] f(a[t,i,k], b[t,j,k]) (times 2 for mode 0), with
        G = g (gtrans 0) or g transposed (gtrans 1: G[t,i,j] = g[t,j,i]); a: (T, A, D),
        b: (T, B, D) -> out: (T, A, D), overwritten. Grid (ceil(D/TILE), ceil(A/TILE), T),
        block (TILE, TILE): thread (x, y) owns out[t, i0 + y, k0 + x]."""
        gs = cuda.shared.array((TILE, PAD), nbt)      # G[t, i0 + y, j0 + x]
        bs = cuda.shared.array((KT, PAD), nbt)      # b[t, j0 + y, k0 + x]
        T, A, D = a.shape
        B = b.shape[1]
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        t = cuda.blockIdx.z
        i0 = cuda.blockIdx.y * TILE
        k0 = cuda.blockIdx.x * TILE
        i = i0 + ty
        k = k0 + tx
        inside = i < A and k < D
        av = a[t, i, k] if inside else nbt(0)
        acc = nbt(0)
        for j0 in range(0, B, KT):
            if gtrans == 0:
                ii = i0 + ty
                jj = j0 + tx
                gs[ty, tx] = g[t, ii, jj] if (ii < A and jj < B) else nbt(0)
            else:
                # read g[t, j, i] along i (coalesced), store it as G[i, j]
                jj = j0 + ty
                ii = i0 + tx
                gs[tx, ty] = g[t, jj, ii] if (ii < A and jj < B) else nbt(0)
            jb = j0 + ty
            bs[ty, tx] = b[t, jb, k] if (jb < B and k < D) else nbt(0)
            cuda.syncthreads()
            nj = min(KT, B - j0)
            for j in range(nj):
                v = bs[j, tx]
                if mode == 0:
                    f = av - v
                elif mode == 1:
                    d = av - v
                    f = nbt(1) if d > 0 else (nbt(-1) if d < 0 else nbt(0))
                else:
                    f = v
                acc += gs[ty, j] * f
            cuda.syncthreads()
        if inside:
            if mode == 0:
                acc += acc                              # the factor 2, exact
            out[t, i, k] = acc

    @cuda.jit
    def row_norms(x, eps, norm, on):
        """x: (T, M, D) -> norm: (T, M) = max(|x|, eps), on: (T, M) = 1 if |x| > eps."""
        T, M, D = x.shape
        p = cuda.grid(1)
        if p < T * M:
            t = p // M
            m = p - t * M
            acc = nbt(0)
            for k in range(D):
                acc += x[t, m, k] * x[t, m, k]
            n = math.sqrt(acc)
            if n > eps:
                norm[t, m] = n
                on[t, m] = nbt(1)
            else:
                norm[t, m] = eps
                on[t, m] = nbt(0)

    @cuda.jit
    def cos_div(c, qn, sn):
        """c: (T, Q, N) /= qn[t, i] sn[t, j], in place."""
        T, Q, N = c.shape
        p = cuda.grid(1)
        if p < T * Q * N:
            t = p // (Q * N)
            r = p - t * Q * N
            i = r // N
            j = r - i * N
            c[t, i, j] /= qn[t, i] * sn[t, j]

    @cuda.jit
    def cos_prep(g, c, qn, sn, gi, gc):
        """g, c: (T, Q, N) -> gi = g / (qn sn), gc = g c: (T, Q, N), overwritten."""
        T, Q, N = g.shape
        p = cuda.grid(1)
        if p < T * Q * N:
            t = p // (Q * N)
            r = p - t * Q * N
            i = r // N
            j = r - i * N
            gv = g[t, i, j]
            gi[t, i, j] = gv / (qn[t, i] * sn[t, j])
            gc[t, i, j] = gv * c[t, i, j]

    @cuda.jit
    def cos_fix(gc, gtrans, on, n, x, dx):
        """dx[t,m,:] -= (sum_j G[t,m,j]) on[t,m] / n[t,m]^2 x[t,m,:], G = gc or its
        transpose (gtrans 1: G[t,m,j] = gc[t,j,m]); x, dx: (T, M, D), in place."""
        T, M, D = x.shape
        p = cuda.grid(1)
        if p < T * M:
            t = p // M
            m = p - t * M
            acc = nbt(0)
            if gtrans == 0:
                for j in range(gc.shape[2]):
                    acc += gc[t, m, j]
            else:
                for j in range(gc.shape[1]):
                    acc += gc[t, j, m]
            f = acc * on[t, m] / (n[t, m] * n[t, m])
            for k in range(D):
                dx[t, m, k] -= f * x[t, m, k]

    @cuda.jit
    def softmax_ce(d, ss, y, gloss, loss_rows, dlogits, pred):
        """d: (T, Q, N) distances, ss = sign * scale, y: (T, Q), gloss: (T,)
        -> loss_rows: (T, Q), dlogits: (T, Q, N) = ss w (softmax - onehot(y)) with
        w = gloss / Q, pred: (T, Q) first argmax; overwritten. One thread per row."""
        T, Q, N = d.shape
        p = cuda.grid(1)
        if p < T * Q:
            t = p // Q
            i = p - t * Q
            yi = y[t, i]
            if yi < 0 or yi >= N:                       # the host checks; a device guard
                loss_rows[t, i] = nbt(math.nan)
                for j in range(N):
                    dlogits[t, i, j] = nbt(math.nan)
                pred[t, i] = -1
                return
            m = d[t, i, 0] * ss
            am = 0
            for j in range(1, N):
                v = d[t, i, j] * ss
                if v > m:
                    m = v
                    am = j
            z = nbt(0)
            for j in range(N):
                z += math.exp(d[t, i, j] * ss - m)
            lz = math.log(z)
            loss_rows[t, i] = lz + m - d[t, i, yi] * ss
            wt = gloss[t] / nbt(Q)
            for j in range(N):
                v = wt * math.exp(d[t, i, j] * ss - m - lz)
                if j == yi:
                    v -= wt
                dlogits[t, i, j] = v * ss
            pred[t, i] = am

    @cuda.jit
    def row_mean(rows, out):
        """rows: (T, Q) -> out: (T,) = sum_i rows[t, i] / Q (in order), overwritten."""
        T, Q = rows.shape
        t = cuda.grid(1)
        if t < T:
            acc = nbt(0)
            for i in range(Q):
                acc += rows[t, i]
            out[t] = acc / nbt(Q)

    @cuda.jit
    def fill(x, v):
        """x: (M,) = v, overwritten."""
        p = cuda.grid(1)
        if p < x.shape[0]:
            x[p] = v

    return {"fill": fill, "pair_fwd": pair_fwd, "pair_grad": pair_grad, "row_norms": row_norms,
            "cos_div": cos_div, "cos_prep": cos_prep, "cos_fix": cos_fix,
            "softmax_ce": softmax_ce, "row_mean": row_mean}


def kernels(dtype):
    """The kernel dict for float32 or float64, built once per dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _cache:
        _cache[dtype] = _build(_NBTYPES[dtype])
    return _cache[dtype]


def kernel_signatures(dtype):
    """[(name, dispatcher, argument types)] for every kernel of one dtype: what
    tests/test_cuda_compile.py hands to numba.cuda.compile_ptx."""
    f = _NBTYPES[np.dtype(dtype)]
    a3, a2, a1 = f[:, :, ::1], f[:, ::1], f[::1]
    i2 = int64[:, ::1]
    sigs = {
        "pair_fwd": (a3, a3, int64, a3),
        "pair_grad": (a3, int64, a3, a3, int64, a3),
        "row_norms": (a3, f, a2, a2),
        "cos_div": (a3, a2, a2),
        "cos_prep": (a3, a3, a2, a2, a3, a3),
        "cos_fix": (a3, int64, a2, a2, a3, a3),
        "softmax_ce": (a3, f, i2, a1, a2, a3, i2),
        "row_mean": (a2, a1),
        "fill": (a1, f),
    }
    ks = kernels(dtype)
    return [(name, ks[name], sig) for name, sig in sigs.items()]


# ---------------------------------------------------------------- availability, arrays
def unavailable():
    """None when kernels can run here (a CUDA GPU and driver, or the simulator under
    NUMBA_ENABLE_CUDASIM=1), else a sentence saying what is missing."""
    try:
        if cuda.is_available():
            return None
    except Exception as err:                              # a broken driver install
        return f"numba.cuda could not initialise CUDA ({err})"
    return ("numba.cuda finds no usable CUDA GPU and driver on this machine "
            "(set NUMBA_ENABLE_CUDASIM=1 for the slow CPU simulator)")


def _is_device(x):
    """True for a CUDA device array (Numba's, CuPy's, any __cuda_array_interface__), or
    for the simulator's fake device array under NUMBA_ENABLE_CUDASIM=1."""
    if isinstance(x, np.ndarray):
        return False
    if hasattr(cuda, "is_cuda_array"):
        return cuda.is_cuda_array(x)
    return isinstance(x, cuda.devicearray.FakeCUDAArray)      # the simulator


def _as_device(x):
    return cuda.as_cuda_array(x) if hasattr(cuda, "as_cuda_array") else x


def _dev(op, name, x, dtype=None):
    """A device view of x (device arrays: zero copy, must be C-contiguous; NumPy: copied)."""
    if _is_device(x):
        d = _as_device(x)
        if not d.is_c_contiguous():
            raise ValueError(f"{op}: {name} must be a C-contiguous device array (the kernels "
                             f"index it densely), got strides {d.strides}")
        if dtype is not None and d.dtype != np.dtype(dtype):
            raise TypeError(f"{op}: {name} has dtype {d.dtype}, expected {np.dtype(dtype)}")
        return d
    x = np.ascontiguousarray(x if dtype is None else np.asarray(x, dtype=dtype))
    return cuda.to_device(x)


def _grid1(n):
    return (max(1, (n + ROWS - 1) // ROWS),)


def _grid_tiles(cols, rows, T):
    if T > 65535:
        raise ValueError(f"distance_cuda: T = {T} tasks exceeds the grid's z limit 65535; "
                         f"split the batch")
    return ((cols + TILE - 1) // TILE, (rows + TILE - 1) // TILE, T)


def _out(host, *arrays):
    """Results to the host when the inputs came from it, else the device arrays."""
    res = tuple(a.copy_to_host() if host else a for a in arrays)
    return res[0] if len(res) == 1 else res


def _empty(shape, dtype):
    return cuda.device_array(shape, dtype=dtype)


# ---------------------------------------------------------------- device pipelines
def _fwd_dev(ks, q, s, mode):
    """q: (T, Q, D), s: (T, N, D) device -> (T, Q, N) device, term `mode` summed over k."""
    T, Q, _ = q.shape
    N = s.shape[1]
    out = _empty((T, Q, N), q.dtype)
    if T * Q * N:
        ks["pair_fwd"][_grid_tiles(N, Q, T), (TILE, TILE)](q, s, mode, out)
    return out


def _grad_dev(ks, g, gtrans, a, b, mode):
    """-> out: (T, A, D) device, sum over the partner axis of b (see pair_grad)."""
    out = _empty(a.shape, a.dtype)
    T, A, D = a.shape
    if T * A * D:
        # B = 0 partners runs no tile and writes zeros, the gradient of an empty sum
        ks["pair_grad"][_grid_tiles(D, A, T), (TILE, TILE)](g, gtrans, a, b, mode, out)
    return out


def _norms_dev(ks, x):
    T, M, _ = x.shape
    n, on = _empty((T, M), x.dtype), _empty((T, M), x.dtype)
    if T * M:
        ks["row_norms"][_grid1(T * M), (ROWS,)](x, x.dtype.type(EPS), n, on)
    return n, on


def _cosine_dev(ks, q, s):
    """-> c: (T, Q, N), qn, qon: (T, Q), sn, son: (T, N), all device."""
    qn, qon = _norms_dev(ks, q)
    sn, son = _norms_dev(ks, s)
    c = _fwd_dev(ks, q, s, 2)
    if c.size:
        ks["cos_div"][_grid1(c.size), (ROWS,)](c, qn, sn)
    return c, qn, qon, sn, son


def _cos_bwd_dev(ks, g, q, s):
    c, qn, qon, sn, son = _cosine_dev(ks, q, s)
    gi, gc = _empty(c.shape, c.dtype), _empty(c.shape, c.dtype)
    if c.size:
        ks["cos_prep"][_grid1(c.size), (ROWS,)](g, c, qn, sn, gi, gc)
    dq = _grad_dev(ks, gi, 0, q, s, 2)
    ds = _grad_dev(ks, gi, 1, s, q, 2)
    T, Q, _ = q.shape
    N = s.shape[1]
    if T * Q:
        ks["cos_fix"][_grid1(T * Q), (ROWS,)](gc, 0, qon, qn, q, dq)
    if T * N:
        ks["cos_fix"][_grid1(T * N), (ROWS,)](gc, 1, son, sn, s, ds)
    return dq, ds


_MODE = {"sqeuclidean": 0, "l1": 1, "cosine": 2}


def _forward_dev(ks, q, s, metric):
    if metric == "cosine":
        return _cosine_dev(ks, q, s)[0]
    return _fwd_dev(ks, q, s, _MODE[metric])


def _backward_dev(ks, g, q, s, metric):
    if metric == "cosine":
        return _cos_bwd_dev(ks, g, q, s)
    mode = _MODE[metric]
    # f(s - q) = -f(q - s) for modes 0 and 1, so ds uses the same kernel with a, b swapped
    return _grad_dev(ks, g, 0, q, s, mode), _grad_dev(ks, g, 1, s, q, mode)


# ---------------------------------------------------------------- public functions
def _pair(op, q, s):
    host = not (_is_device(q) or _is_device(s))
    dq = _dev(op, "q", q)
    ds = _dev(op, "s", s, dtype=dq.dtype)
    return host, kernels(dq.dtype), dq, ds


def _forward(op, metric, q, s):
    host, ks, q, s = _pair(op, q, s)
    return _out(host, _forward_dev(ks, q, s, metric))


def _backward(op, metric, g, q, s):
    host, ks, q, s = _pair(op, q, s)
    host = host and not _is_device(g)
    g = _dev(op, "g", g, dtype=q.dtype)
    return _out(host, *_backward_dev(ks, g, q, s, metric))


def pairwise_sqeuclidean(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N), direct difference formula."""
    return _forward("pairwise_sqeuclidean", "sqeuclidean", q, s)


def pairwise_sqeuclidean_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D); fresh arrays."""
    return _backward("pairwise_sqeuclidean_backward", "sqeuclidean", g, q, s)


def pairwise_l1(q, s):
    """q: (T, Q, D), s: (T, N, D) -> d: (T, Q, N) = sum_k |q - s|."""
    return _forward("pairwise_l1", "l1", q, s)


def pairwise_l1_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D), sign(0) = 0; fresh arrays."""
    return _backward("pairwise_l1_backward", "l1", g, q, s)


def pairwise_cosine(q, s):
    """q: (T, Q, D), s: (T, N, D) -> c: (T, Q, N) = q.s / (max(|q|,EPS) max(|s|,EPS))."""
    return _forward("pairwise_cosine", "cosine", q, s)


def pairwise_cosine_backward(g, q, s):
    """g: (T, Q, N) -> dq: (T, Q, D), ds: (T, N, D); see the reference for the formula."""
    return _backward("pairwise_cosine_backward", "cosine", g, q, s)


def protonet_loss(q, s, y, gloss=None, metric="sqeuclidean", scale=1.0):
    """Same contract as metacore.reference.distance.protonet_loss:
    -> loss: (T,), dq: (T, Q, D), ds: (T, N, D), pred: (T, Q) int64."""
    op = "protonet_loss"
    host, ks, q, s = _pair(op, q, s)
    host = host and not _is_device(y) and not (gloss is not None and _is_device(gloss))
    T, Q, _ = q.shape
    N = s.shape[1]
    dt = q.dtype
    y = _dev(op, "y", y, dtype=None if _is_device(y) else np.int64)
    if gloss is None:
        gl = _empty((T,), dt)
        if T:
            ks["fill"][_grid1(T), (ROWS,)](gl, dt.type(1))   # on the device, no copy
    else:
        gl = _dev(op, "gloss", gloss, dtype=dt)
    ss = dt.type((1.0 if metric == "cosine" else -1.0) * scale)
    d = _forward_dev(ks, q, s, metric)                    # (T, Q, N)
    loss_rows = _empty((T, Q), dt)
    dlogits = _empty((T, Q, N), dt)
    pred = _empty((T, Q), np.int64)
    loss = _empty((T,), dt)
    if T * Q:
        ks["softmax_ce"][_grid1(T * Q), (ROWS,)](d, ss, y, gl, loss_rows, dlogits, pred)
    if T:
        ks["row_mean"][_grid1(T), (ROWS,)](loss_rows, loss)
    dq, ds = _backward_dev(ks, dlogits, q, s, metric)
    return _out(host, loss, dq, ds, pred)
