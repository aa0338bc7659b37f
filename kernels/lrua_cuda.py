"""LRUA memory of MANN (Santoro et al. 2016): Numba CUDA backend ('numba-cuda').

Shape letters (this module):
    T time steps, B episodes, H heads (n = H reads), S memory slots, W slot width.

Same contract and conventions as `metacore.reference.lrua` (the order of the operations in a
step, EPS, ties, what is non-differentiable). Arrays in, arrays out of the same kind: device
arrays (Numba's, or anything with __cuda_array_interface__) stay on the device and the
results are Numba device arrays; NumPy arrays are copied to the device and back. Device
inputs must be C-contiguous.

How the kernels work (whole episodes fused, not one launch per step):
  * One thread block per episode b; the time loop runs inside the kernel, and each phase
    of a step (least-used selection, write weights, memory write, norms, cosines, softmax,
    reads, usage) is a block-strided loop over its independent outputs, separated by
    __syncthreads. The recurrence is sequential in t, so the parallelism is over the
    H S, S W and H W outputs of a step and over the B episodes.
  * The least-used weights need no sort; each slot i counts on its own. "shared" (per_head
    0): w_lu^h(i) = 1 iff #{j : w_u(j) < w_u(i)} < n, which equals w_u(i) <= m(w_u, n)
    exactly (ties included), in every head's row. "per_head" (per_head 1): the rank of
    slot i in the order of (w_u(j), j), #{j : w_u(j) < w_u(i) or (w_u(j) = w_u(i), j < i)},
    is its position in the reference's stable sort, and head h takes the slot of rank h.
    The returned w_lu is the union over heads. The zeroed slot (first argmin) is one serial
    scan by thread 0. A separate add vector is not supported here (the entry point says so).
  * Memories M_t live in global memory, Ms: (B, K, S, W); lrua_forward ping-pongs two
    (K = 2), lrua_backward reruns the forward keeping all T + 1 (K = T + 1), then runs the
    reverse sweep (formulas: metacore.reference.lrua.lrua_backward) with dL/dM and
    dL/dw_r in per-episode scratch.
  * One step's forward (fwd_step) and one step's reverse (bwd_step) are device functions
    run by the whole block; the episode kernels loop over them and the step kernels call
    them once, so the step pair (MANN, one step at a time) and the episode pair run the
    same code. The step backward reruns the step's forward into scratch and then its
    reverse, in one launch.
  * Everything accumulates in the input dtype, each sum in the reference's order.
Kernels (one set per dtype; `kernel_signatures` lists them for the PTX tests):
    gates          g = sigmoid(alpha) = (1 + tanh(alpha / 2)) / 2 broadcast to (T, B, H)
    forward        the T steps of every episode
    backward       the reverse sweep of every episode
    sum_tb         dalpha (T, B, H) -> (H,) when alpha was one gate per head
    step_forward   one step of every episode (lrua_step_forward)
    step_backward  that step rerun, then reversed (lrua_step_backward)
Device functions (compiled into the kernels): fwd_step, bwd_step.
"""
import math

import numpy as np
from numba import config, cuda, float32, float64, int64

EPS = 1e-8
# The simulator runs every CUDA thread as a Python thread: 8 per block keeps its tests fast.
THREADS = 8 if config.ENABLE_CUDASIM else 128
_NBTYPES = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}
_cache = {}


def _build(nbt):
    """The kernels for one Numba float type `nbt` (float32 or float64)."""

    @cuda.jit
    def gates(alpha, per_step, g):
        """alpha: (H,) (per_step 0) or (T, B, H) flattened to (T B H,) (per_step 1)
        -> g: (T, B, H) = sigmoid(alpha), overwritten."""
        T, B, H = g.shape
        p = cuda.grid(1)
        if p < T * B * H:
            t = p // (B * H)
            r = p - t * B * H
            b = r // H
            h = r - b * H
            a = alpha[p] if per_step else alpha[h]
            half = nbt(0.5)
            g[t, b, h] = half * (nbt(1) + math.tanh(half * a))

    @cuda.jit(device=True)
    def lu_rank(wu, i):
        """wu: (S,) -> (#{j : wu(j) < wu(i)}, the rank of slot i in the (wu(j), j) order)."""
        below = 0
        rank = 0
        v = wu[i]
        for j in range(wu.shape[0]):
            if wu[j] < v:
                below += 1
                rank += 1
            elif wu[j] == v and j < i:
                rank += 1
        return below, rank

    @cuda.jit(device=True)
    def fwd_step(k, gr, Mp, M, wr_prev, wu_prev, gamma, eps, per_head, wlu, zout, zsh, ww,
                 wr, read, wu, kn, mn, c):
        """One step of one episode by the whole block (steps 1-7 of metacore.reference.lrua),
        shared by `forward` (every step of an episode) and `step_forward` / `step_backward`
        (one step), so that the chained step pair runs the very code of the whole episode.

        k: (H, W) k_t, gr: (H,) gates, Mp: (S, W) M_{t-1}, wr_prev: (H, S), wu_prev: (S,),
        per_head: 1 for the "per_head" write rule, 0 for "shared"
        -> M: (S, W) M_t, wlu: (H, S) w_lu_{t-1}, one row per head, zout: (1,) the zeroed
        slot, ww, wr: (H, S) w_w_t, w_r_t, read: (H, W) r_t, wu: (S,) w_u_t, all overwritten (M must not alias
        Mp); scratch zsh: (1,) int64 shared, kn: (H,), mn: (S,), c: (H, S). Ends with a
        __syncthreads, so every output is visible to the whole block."""
        H, W = k.shape
        S = Mp.shape[0]
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        # 1. least-used weights of the previous usage (counting, no sort)
        for i in range(tid, S, nt):
            below, rank = lu_rank(wu_prev, i)
            for h in range(H):
                if per_head:
                    wlu[h, i] = nbt(1) if rank == h else nbt(0)
                else:
                    wlu[h, i] = nbt(1) if below < H else nbt(0)
        # 3. the slot to zero: first argmin
        if tid == 0:
            z = 0
            for i in range(1, S):
                if wu_prev[i] < wu_prev[z]:
                    z = i
            zsh[0] = z
            zout[0] = z
        cuda.syncthreads()
        z = zsh[0]
        # 2. write weights
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            gh = gr[h]
            ww[h, i] = gh * wr_prev[h, i] + (nbt(1) - gh) * wlu[h, i]
        cuda.syncthreads()
        # 3-4. zero slot z, then write every head's key (sum over h in order)
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            v = nbt(0) if i == z else Mp[i, x]
            for h in range(H):
                v += ww[h, i] * k[h, x]
            M[i, x] = v
        cuda.syncthreads()
        # 5. clamped norms, cosines, softmax over slots
        for h in range(tid, H, nt):
            acc = nbt(0)
            for x in range(W):
                acc += k[h, x] * k[h, x]
            kn[h] = max(math.sqrt(acc), eps)
        for i in range(tid, S, nt):
            acc = nbt(0)
            for x in range(W):
                acc += M[i, x] * M[i, x]
            mn[i] = max(math.sqrt(acc), eps)
        cuda.syncthreads()
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            acc = nbt(0)
            for x in range(W):
                acc += k[h, x] * M[i, x]
            c[h, i] = acc / (kn[h] * mn[i])
        cuda.syncthreads()
        for h in range(tid, H, nt):
            cmax = c[h, 0]
            for i in range(1, S):
                cmax = max(cmax, c[h, i])
            tot = nbt(0)
            for i in range(S):
                e = math.exp(c[h, i] - cmax)
                wr[h, i] = e
                tot += e
            for i in range(S):
                wr[h, i] /= tot
        cuda.syncthreads()
        # 6. reads; 7. usage
        for p in range(tid, H * W, nt):
            h = p // W
            x = p - h * W
            acc = nbt(0)
            for i in range(S):
                acc += wr[h, i] * M[i, x]
            read[h, x] = acc
        for i in range(tid, S, nt):
            sr = nbt(0)
            sw = nbt(0)
            for h in range(H):
                sr += wr[h, i]
                sw += ww[h, i]
            wu[i] = gamma * wu_prev[i] + sr + sw
        cuda.syncthreads()

    @cuda.jit(device=True)
    def bwd_step(dr, k, gr, M, wr, ww, wr_prev, wlu, z, eps, dM, dwr, dk, da,
                 dc, gi, kn, kon, sk, mn, mon, sm):
        """Reverse of one step of one episode by the whole block (formulas:
        metacore.reference.lrua.lrua_backward), shared by `backward` and `step_backward`.

        dr: (H, W) dL/dr_t, k: (H, W), gr: (H,), M: (S, W) M_t, wr, ww: (H, S) w_r_t, w_w_t,
        wr_prev: (H, S) w_r_{t-1}, wlu: (H, S) w_lu_{t-1}, z: the zeroed slot;
        dM: (S, W) dL/dM_t in, dL/dM_{t-1} out; dwr: (H, S) dL/dw_r_t in, dL/dw_r_{t-1} out;
        dk: (H, W) dL/dk_t, da: (H,) dL/dalpha_t (per-step gate), overwritten;
        scratch dc, gi: (H, S), kn, kon, sk: (H,), mn, mon, sm: (S,). The caller
        synchronises after writing dM and dwr; this ends with a __syncthreads."""
        H, W = k.shape
        S = M.shape[0]
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        # read r = w_r M; and the clamped norms
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            acc = dwr[h, i]
            for x in range(W):
                acc += dr[h, x] * M[i, x]
            dwr[h, i] = acc
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            acc = dM[i, x]
            for h in range(H):
                acc += wr[h, i] * dr[h, x]
            dM[i, x] = acc
        for h in range(tid, H, nt):
            acc = nbt(0)
            for x in range(W):
                acc += k[h, x] * k[h, x]
            nrm = math.sqrt(acc)
            kn[h] = max(nrm, eps)
            kon[h] = nbt(1) if nrm > eps else nbt(0)
        for i in range(tid, S, nt):
            acc = nbt(0)
            for x in range(W):
                acc += M[i, x] * M[i, x]
            nrm = math.sqrt(acc)
            mn[i] = max(nrm, eps)
            mon[i] = nbt(1) if nrm > eps else nbt(0)
        cuda.syncthreads()
        # softmax over slots: dc = w_r (dwr - sum_j w_r dwr); sk holds the inner sums
        for h in range(tid, H, nt):
            acc = nbt(0)
            for i in range(S):
                acc += wr[h, i] * dwr[h, i]
            sk[h] = acc
        cuda.syncthreads()
        # cosine: c, gi = dc / (a_h b_i), and dc c (kept in dc)
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            d = wr[h, i] * (dwr[h, i] - sk[h])
            acc = nbt(0)
            for x in range(W):
                acc += k[h, x] * M[i, x]
            inv = nbt(1) / (kn[h] * mn[i])
            cv = acc * inv
            gi[h, i] = d * inv
            dc[h, i] = d * cv
        cuda.syncthreads()
        for h in range(tid, H, nt):
            acc = nbt(0)
            for i in range(S):
                acc += dc[h, i]
            sk[h] = acc * kon[h] / (kn[h] * kn[h])
        for i in range(tid, S, nt):
            acc = nbt(0)
            for h in range(H):
                acc += dc[h, i]
            sm[i] = acc * mon[i] / (mn[i] * mn[i])
        cuda.syncthreads()
        for p in range(tid, H * W, nt):
            h = p // W
            x = p - h * W
            acc = -sk[h] * k[h, x]
            for i in range(S):
                acc += gi[h, i] * M[i, x]
            dk[h, x] = acc
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            acc = dM[i, x] - sm[i] * M[i, x]
            for h in range(H):
                acc += gi[h, i] * k[h, x]
            dM[i, x] = acc
        cuda.syncthreads()
        # write M_t = M' + w_w^T k: key gradient, write-weight gradient (into dwr)
        for p in range(tid, H * W, nt):
            h = p // W
            x = p - h * W
            acc = dk[h, x]
            for i in range(S):
                acc += ww[h, i] * dM[i, x]
            dk[h, x] = acc
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            acc = nbt(0)
            for x in range(W):
                acc += k[h, x] * dM[i, x]
            dwr[h, i] = acc
        cuda.syncthreads()
        # zeroing of the least-used slot; gate w_w = g w_r_{t-1} + (1 - g) w_lu_{t-1}
        for x in range(tid, W, nt):
            dM[z, x] = nbt(0)
        for h in range(tid, H, nt):
            gh = gr[h]
            acc = nbt(0)
            for i in range(S):
                acc += dwr[h, i] * (wr_prev[h, i] - wlu[h, i])
                dwr[h, i] *= gh
            da[h] = gh * (nbt(1) - gh) * acc
        cuda.syncthreads()

    @cuda.jit
    def forward(keys, g, memory0, read0, usage0, gamma, eps, per_head,
                reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs, memory, kn, mn, c):
        """Block b runs episode b over T steps (steps 1-7 of metacore.reference.lrua),
        overwriting reads[:, b], w_r[:, b], w_w[:, b], w_u[:, b], w_lu[:, b],
        wlu_prev[b], zs[b] and Ms[b, (t + 1) % K] with M_t (K = Ms.shape[1]).

        keys: (T, B, H, W), g: (T, B, H), memory0: (B, S, W), read0: (B, H, S),
        usage0: (B, S), per_head: the write rule (fwd_step); reads: (T, B, H, W),
        w_r, w_w: (T, B, H, S), w_u, w_lu: (T, B, S), Ms: (B, K, S, W),
        wlu_prev: (B, T, H, S), zs: (B, T) int64, memory: (B, S, W) M_T;
        scratch kn: (B, H), mn: (B, S), c: (B, H, S)."""
        T, B, H, W = keys.shape
        S = memory0.shape[1]
        K = Ms.shape[1]
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        zsh = cuda.shared.array(1, int64)
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            Ms[b, 0, i, x] = memory0[b, i, x]
        cuda.syncthreads()
        for t in range(T):
            wr_prev = read0[b] if t == 0 else w_r[t - 1, b]     # (H, S)
            wu_prev = usage0[b] if t == 0 else w_u[t - 1, b]    # (S,)
            fwd_step(keys[t, b], g[t, b], Ms[b, t % K], Ms[b, (t + 1) % K], wr_prev, wu_prev,
                     gamma, eps, per_head, wlu_prev[b, t], zs[b, t:t + 1], zsh, w_w[t, b],
                     w_r[t, b], reads[t, b], w_u[t, b], kn[b], mn[b], c[b])
            # the least-used slots of the new usage, the union over heads (returned; step
            # t + 1 recomputes them)
            wu = w_u[t, b]                              # (S,)
            for i in range(tid, S, nt):
                below, rank = lu_rank(wu, i)
                n_lu = rank if per_head else below
                w_lu[t, b, i] = nbt(1) if n_lu < H else nbt(0)
            cuda.syncthreads()
        MT = Ms[b, T % K]                               # (S, W)  M_T
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            memory[b, i, x] = MT[i, x]

    @cuda.jit
    def backward(dreads, keys, g, read0, w_r, w_w, Ms, wlu_prev, zs, eps,
                 dkeys, dalpha, dmemory0, dread0, dM, dwr, dc, gi, kn, kon, sk, mn, mon,
                 sm):
        """Block b runs the reverse sweep of episode b (formulas:
        metacore.reference.lrua.lrua_backward), overwriting dkeys[:, b], dalpha[:, b],
        dmemory0[b], dread0[b].

        dreads, keys: (T, B, H, W), g: (T, B, H), read0: (B, H, S), w_r, w_w: (T, B, H, S),
        Ms: (B, T + 1, S, W) with M_t at index t, wlu_prev: (B, T, H, S), zs: (B, T);
        dkeys: (T, B, H, W), dalpha: (T, B, H), dmemory0: (B, S, W), dread0: (B, H, S);
        scratch dM: (B, S, W), dwr, dc, gi: (B, H, S), kn, kon, sk: (B, H),
        mn, mon, sm: (B, S)."""
        T, B, H, W = keys.shape
        S = Ms.shape[2]
        b = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            dM[b, i, x] = nbt(0)
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            dwr[b, h, i] = nbt(0)
        cuda.syncthreads()
        for t in range(T - 1, -1, -1):
            wr_prev = read0[b] if t == 0 else w_r[t - 1, b]     # (H, S)
            bwd_step(dreads[t, b], keys[t, b], g[t, b], Ms[b, t + 1], w_r[t, b], w_w[t, b],
                     wr_prev, wlu_prev[b, t], zs[b, t], eps, dM[b], dwr[b], dkeys[t, b],
                     dalpha[t, b], dc[b], gi[b], kn[b], kon[b], sk[b], mn[b], mon[b], sm[b])
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            dmemory0[b, i, x] = dM[b, i, x]
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            dread0[b, h, i] = dwr[b, h, i]

    @cuda.jit
    def step_forward(key, g, memory_prev, w_r_prev, w_u_prev, gamma, eps, per_head,
                     read, memory, w_r, w_w, w_u, wlu, zs, kn, mn, c):
        """Block b runs step t of episode b (fwd_step), overwriting read[b], memory[b],
        w_r[b], w_w[b], w_u[b].

        key: (B, H, W), g: (1, B, H), memory_prev: (B, S, W), w_r_prev: (B, H, S),
        w_u_prev: (B, S), per_head: the write rule; read: (B, H, W), memory: (B, S, W),
        w_r, w_w: (B, H, S), w_u: (B, S); scratch wlu: (B, H, S), zs: (B, 1) int64,
        kn: (B, H), mn: (B, S), c: (B, H, S)."""
        b = cuda.blockIdx.x
        if b >= key.shape[0]:
            return
        zsh = cuda.shared.array(1, int64)
        fwd_step(key[b], g[0, b], memory_prev[b], memory[b], w_r_prev[b], w_u_prev[b], gamma,
                 eps, per_head, wlu[b], zs[b], zsh, w_w[b], w_r[b], read[b], w_u[b], kn[b],
                 mn[b], c[b])

    @cuda.jit
    def step_backward(dread, dmemory, dw_r, key, g, memory_prev, w_r_prev, w_u_prev, gamma,
                      eps, per_head, dkey, dalpha, dmemory_prev, dw_r_prev, M, wr, ww, wu, wlu,
                      zs, dc, gi, kn, kon, sk, mn, mon, sm):
        """Block b reruns step t of episode b (fwd_step), then its reverse (bwd_step) from
        dread[b], dmemory[b], dw_r[b], overwriting dkey[b], dalpha[0, b], dmemory_prev[b],
        dw_r_prev[b] (the last two are bwd_step's running dM and dwr).

        dread, key: (B, H, W), dmemory, memory_prev: (B, S, W), dw_r, w_r_prev: (B, H, S),
        g: (1, B, H), w_u_prev: (B, S), per_head: the write rule; dkey: (B, H, W),
        dalpha: (1, B, H), dmemory_prev: (B, S, W), dw_r_prev: (B, H, S); scratch M:
        (B, S, W) M_t, wr, ww, dc, gi, wlu: (B, H, S), wu, mn, mon, sm: (B, S),
        zs: (B, 1) int64,
        kn, kon, sk: (B, H). The forward's read goes to dkey (overwritten by bwd_step) and
        its cosines to dc (bwd_step's scratch)."""
        H, S = wr.shape[1], wr.shape[2]
        W = key.shape[2]
        b = cuda.blockIdx.x
        if b >= key.shape[0]:
            return
        tid = cuda.threadIdx.x
        nt = cuda.blockDim.x
        zsh = cuda.shared.array(1, int64)
        for p in range(tid, S * W, nt):
            i = p // W
            x = p - i * W
            dmemory_prev[b, i, x] = dmemory[b, i, x]
        for p in range(tid, H * S, nt):
            h = p // S
            i = p - h * S
            dw_r_prev[b, h, i] = dw_r[b, h, i]
        fwd_step(key[b], g[0, b], memory_prev[b], M[b], w_r_prev[b], w_u_prev[b], gamma, eps,
                 per_head, wlu[b], zs[b], zsh, ww[b], wr[b], dkey[b], wu[b], kn[b], mn[b],
                 dc[b])
        bwd_step(dread[b], key[b], g[0, b], M[b], wr[b], ww[b], w_r_prev[b], wlu[b],
                 zsh[0], eps, dmemory_prev[b], dw_r_prev[b], dkey[b], dalpha[0, b], dc[b],
                 gi[b], kn[b], kon[b], sk[b], mn[b], mon[b], sm[b])

    @cuda.jit
    def sum_tb(dalpha, out):
        """dalpha: (T, B, H) -> out: (H,) = sum over t then b (in order), overwritten."""
        T, B, H = dalpha.shape
        h = cuda.grid(1)
        if h < H:
            acc = nbt(0)
            for t in range(T):
                for b in range(B):
                    acc += dalpha[t, b, h]
            out[h] = acc

    return {"gates": gates, "forward": forward, "backward": backward, "sum_tb": sum_tb,
            "step_forward": step_forward, "step_backward": step_backward}


def kernels(dtype):
    """The kernel dict for float32 or float64, built once per dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _cache:
        _cache[dtype] = _build(_NBTYPES[dtype])
    return _cache[dtype]


def kernel_signatures(dtype):
    """[(name, dispatcher, argument types)] for every kernel of one dtype (PTX tests)."""
    f = _NBTYPES[np.dtype(dtype)]
    a4, a3, a2, a1 = f[:, :, :, ::1], f[:, :, ::1], f[:, ::1], f[::1]
    i2 = int64[:, ::1]
    sigs = {
        "gates": (a1, int64, a3),
        "forward": (a4, a3, a3, a3, a2, f, f, int64, a4, a4, a4, a3, a3, a4, a4, i2, a3,
                    a2, a2, a3),
        "backward": (a4, a4, a3, a3, a4, a4, a4, a4, i2, f, a4, a3, a3, a3,
                     a3, a3, a3, a3, a2, a2, a2, a2, a2, a2),
        "sum_tb": (a3, a1),
        "step_forward": (a3, a3, a3, a3, a2, f, f, int64, a3, a3, a3, a3, a2, a3, i2, a2,
                         a2, a3),
        "step_backward": (a3, a3, a3, a3, a3, a3, a3, a2, f, f, int64, a3, a3, a3, a3,
                          a3, a3, a3, a2, a3, i2, a3, a3, a2, a2, a2, a2, a2, a2),
    }
    ks = kernels(dtype)
    return [(name, ks[name], sig) for name, sig in sigs.items()]


# ---------------------------------------------------------------- availability, arrays
def unavailable():
    """None when kernels can run here (a CUDA GPU and driver, or the simulator), else a
    sentence saying what is missing."""
    try:
        if cuda.is_available():
            return None
    except Exception as err:
        return f"numba.cuda could not initialise CUDA ({err})"
    return ("numba.cuda finds no usable CUDA GPU and driver on this machine "
            "(set NUMBA_ENABLE_CUDASIM=1 for the slow CPU simulator)")


def _is_device(x):
    if isinstance(x, np.ndarray):
        return False
    if hasattr(cuda, "is_cuda_array"):
        return cuda.is_cuda_array(x)
    return isinstance(x, cuda.devicearray.FakeCUDAArray)      # the simulator


def _dev(op, name, x, dtype):
    """A device view of x (device arrays: zero copy, must be C-contiguous; NumPy: copied)."""
    if _is_device(x):
        d = cuda.as_cuda_array(x) if hasattr(cuda, "as_cuda_array") else x
        if not d.is_c_contiguous():
            raise ValueError(f"{op}: {name} must be a C-contiguous device array, got "
                             f"strides {d.strides}")
        if d.dtype != np.dtype(dtype):
            raise TypeError(f"{op}: {name} has dtype {d.dtype}, expected {np.dtype(dtype)}")
        return d
    return cuda.to_device(np.ascontiguousarray(x, dtype=dtype))


def to_device(x):
    """A NumPy array -> a fresh Numba device array (C-contiguous)."""
    return cuda.to_device(np.ascontiguousarray(x))


def to_host(x):
    """A Numba device array -> a fresh NumPy array."""
    return x.copy_to_host()


def _per_head(op, write_rule):
    if write_rule not in ("shared", "per_head"):
        raise ValueError(f"{op}: write_rule must be 'shared' or 'per_head', got "
                         f"{write_rule!r}")
    return 1 if write_rule == "per_head" else 0


def _run_forward(op, keys, alpha, memory0, read0, usage0, gamma, keep, write_rule):
    """-> host flag, kernels and the device arrays of one forward run (see `forward`)."""
    host = not any(_is_device(a) for a in (keys, alpha, memory0, read0, usage0))
    dt = np.dtype(keys.dtype)
    keys = _dev(op, "keys", keys, dt)
    alpha = _dev(op, "alpha", alpha, dt)
    memory0 = _dev(op, "memory0", memory0, dt)
    read0 = _dev(op, "read0", read0, dt)
    usage0 = _dev(op, "usage0", usage0, dt)
    ks = kernels(dt)
    T, B, H, W = keys.shape
    S = memory0.shape[1]
    e = cuda.device_array
    g = e((T, B, H), dt)
    n = T * B * H
    per_step = int(alpha.ndim == 3)
    flat = alpha.reshape(alpha.size) if per_step else alpha    # contiguous: a view
    ks["gates"][(n + THREADS - 1) // THREADS, THREADS](flat, per_step, g)
    reads, w_r, w_w = e((T, B, H, W), dt), e((T, B, H, S), dt), e((T, B, H, S), dt)
    w_u, w_lu = e((T, B, S), dt), e((T, B, S), dt)
    Ms = e((B, T + 1 if keep else 2, S, W), dt)
    wlu_prev, zs, memory = e((B, T, H, S), dt), e((B, T), np.int64), e((B, S, W), dt)
    ks["forward"][B, THREADS](keys, g, memory0, read0, usage0, dt.type(gamma), dt.type(EPS),
                              _per_head(op, write_rule), reads, w_r, w_w, w_u, w_lu, Ms,
                              wlu_prev, zs, memory,
                              e((B, H), dt), e((B, S), dt), e((B, H, S), dt))
    return (host, ks, keys, alpha, read0, g, reads, w_r, w_w, w_u, w_lu, Ms, wlu_prev, zs,
            memory)


def lrua_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_forward (no add vector):
    -> reads (T, B, H, W), w_r, w_w (T, B, H, S), w_u, w_lu (T, B, S), memory (B, S, W)."""
    out = _run_forward("lrua_forward", keys, alpha, memory0, read0, usage0, gamma, False,
                       write_rule)
    host, _, _, _, _, _, reads, w_r, w_w, w_u, w_lu, _, _, _, memory = out
    res = (reads, w_r, w_w, w_u, w_lu, memory)
    return tuple(a.copy_to_host() for a in res) if host else res


def lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gamma, write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_backward (no add vector):
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S)."""
    op = "lrua_backward"
    host = not _is_device(dreads)
    out = _run_forward(op, keys, alpha, memory0, read0, usage0, gamma, True, write_rule)
    host_f, ks, keys, alpha, read0, g, _, w_r, w_w, _, _, Ms, wlu_prev, zs, _ = out
    host = host and host_f
    dt = keys.dtype
    dreads = _dev(op, "dreads", dreads, dt)
    T, B, H, W = keys.shape
    S = Ms.shape[2]
    e = cuda.device_array
    dkeys, dalpha = e((T, B, H, W), dt), e((T, B, H), dt)
    dmemory0, dread0 = e((B, S, W), dt), e((B, H, S), dt)
    ks["backward"][B, THREADS](dreads, keys, g, read0, w_r, w_w, Ms, wlu_prev, zs,
                               dt.type(EPS), dkeys, dalpha, dmemory0, dread0,
                               e((B, S, W), dt), e((B, H, S), dt), e((B, H, S), dt),
                               e((B, H, S), dt), e((B, H), dt), e((B, H), dt), e((B, H), dt),
                               e((B, S), dt), e((B, S), dt), e((B, S), dt))
    if alpha.ndim == 1:
        da = e((H,), dt)
        ks["sum_tb"][(H + THREADS - 1) // THREADS, THREADS](dalpha, da)
        dalpha = da
    res = (dkeys, dalpha, dmemory0, dread0)
    return tuple(a.copy_to_host() for a in res) if host else res


# ---------------------------------------------------------------- one step, a batch
def _step_inputs(op, key, alpha, memory_prev, w_r_prev, w_u_prev):
    """-> host flag, dtype, kernels, device arrays and the gates g (1, B, H) of one step."""
    host = not any(_is_device(a) for a in (key, alpha, memory_prev, w_r_prev, w_u_prev))
    dt = np.dtype(key.dtype)
    key = _dev(op, "key", key, dt)
    alpha = _dev(op, "alpha", alpha, dt)
    memory_prev = _dev(op, "memory_prev", memory_prev, dt)
    w_r_prev = _dev(op, "w_r_prev", w_r_prev, dt)
    w_u_prev = _dev(op, "w_u_prev", w_u_prev, dt)
    ks = kernels(dt)
    B, H, _ = key.shape
    g = cuda.device_array((1, B, H), dt)
    n = B * H
    per_episode = int(alpha.ndim == 2)
    flat = alpha.reshape(alpha.size) if per_episode else alpha  # contiguous: a view
    ks["gates"][(n + THREADS - 1) // THREADS, THREADS](flat, per_episode, g)
    return host, dt, ks, key, alpha, memory_prev, w_r_prev, w_u_prev, g


def lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma,
                      write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_step_forward (no add vector):
    -> read (B, H, W), memory (B, S, W), w_r (B, H, S), w_w (B, H, S), w_u (B, S).
    One launch of `step_forward` (one block per episode) after the gates."""
    op = "lrua_step_forward"
    host, dt, ks, key, alpha, memory_prev, w_r_prev, w_u_prev, g = _step_inputs(
        op, key, alpha, memory_prev, w_r_prev, w_u_prev)
    B, H, W = key.shape
    S = memory_prev.shape[1]
    e = cuda.device_array
    read, memory = e((B, H, W), dt), e((B, S, W), dt)
    w_r, w_w, w_u = e((B, H, S), dt), e((B, H, S), dt), e((B, S), dt)
    ks["step_forward"][B, THREADS](key, g, memory_prev, w_r_prev, w_u_prev, dt.type(gamma),
                                   dt.type(EPS), _per_head(op, write_rule), read, memory,
                                   w_r, w_w, w_u, e((B, H, S), dt),
                                   e((B, 1), np.int64), e((B, H), dt), e((B, S), dt),
                                   e((B, H, S), dt))
    res = (read, memory, w_r, w_w, w_u)
    return tuple(a.copy_to_host() for a in res) if host else res


def lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev, w_u_prev,
                       gamma, write_rule="shared"):
    """Same contract as metacore.reference.lrua.lrua_step_backward (no add vector):
    -> dkey (B, H, W), dalpha (shape of alpha), dmemory_prev (B, S, W), dw_r_prev (B, H, S).
    One launch of `step_backward` (the step's forward rerun, then its reverse, in one
    block per episode), and `sum_tb` over the episodes when alpha is (H,)."""
    op = "lrua_step_backward"
    host, dt, ks, key, alpha, memory_prev, w_r_prev, w_u_prev, g = _step_inputs(
        op, key, alpha, memory_prev, w_r_prev, w_u_prev)
    host = host and not any(_is_device(a) for a in (dread, dmemory, dw_r))
    dread = _dev(op, "dread", dread, dt)
    dmemory = _dev(op, "dmemory", dmemory, dt)
    dw_r = _dev(op, "dw_r", dw_r, dt)
    B, H, W = key.shape
    S = memory_prev.shape[1]
    e = cuda.device_array
    dkey, dalpha = e((B, H, W), dt), e((1, B, H), dt)
    dmemory_prev, dw_r_prev = e((B, S, W), dt), e((B, H, S), dt)
    ks["step_backward"][B, THREADS](
        dread, dmemory, dw_r, key, g, memory_prev, w_r_prev, w_u_prev, dt.type(gamma),
        dt.type(EPS), _per_head(op, write_rule), dkey, dalpha, dmemory_prev, dw_r_prev,
        e((B, S, W), dt), e((B, H, S), dt), e((B, H, S), dt), e((B, S), dt),
        e((B, H, S), dt),
        e((B, 1), np.int64), e((B, H, S), dt), e((B, H, S), dt),
        e((B, H), dt), e((B, H), dt), e((B, H), dt), e((B, S), dt), e((B, S), dt),
        e((B, S), dt))
    if alpha.ndim == 1:
        da = e((H,), dt)
        ks["sum_tb"][(H + THREADS - 1) // THREADS, THREADS](dalpha, da)
    else:
        da = dalpha.reshape(B, H)
    res = (dkey, da, dmemory_prev, dw_r_prev)
    return tuple(a.copy_to_host() for a in res) if host else res
