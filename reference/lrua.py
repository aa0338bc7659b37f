"""LRUA memory of MANN (Santoro et al. 2016, "Meta-learning with memory-augmented neural
networks", section "Least Recently Used Access"): plain float64 NumPy ground truth.

Shape letters (this module):
    T time steps, B episodes (the task axis of the rest of metacore), H heads (n = H, the
    number of reads), S memory slots, W slot width.

Arguments of every op (time-major):
    keys     (T, B, H, W)  k_t^h, one key per head per step, used to write and then to read
    alpha    (H,)          the paper's form: one learned scalar gate per head, the same at
                           every step; or (T, B, H): a gate per step from the controller.
                           dalpha comes back in the shape given.
    memory0  (B, S, W)     M_0
    read0    (B, H, S)     w_r_0, the read weights of "step 0" (they feed w_w_1)
    usage0   (B, S)        w_u_0
    gamma    float in [0, 1], the usage decay
    write_rule  "shared" (default of the ops) or "per_head": which least-used slots a head
             writes to (step 1 below)
    adds     None (default: the write content is the key, a_t^h = k_t^h) or (T, B, H, W):
             a separate add vector a_t^h per head (tristandeleu/ntm-one-shot's
             a_t = tanh(W_a h_t + b_a), computed by the caller); its gradient dadds is then
             returned after the others

One step t, for each episode b (the heads share the memory and the usage), in this order:
    0. the usage order: the slots sorted by (w_u_{t-1}(i), i) ascending, i.e. a stable sort
       of w_u_{t-1}, ties going to the lower slot index; o_j is the j-th slot of that order
       (j = 0, 1, ...). Every backend breaks ties this way.
    1. least-used weights of head h, w_lu_{t-1}^h (S,):
       "shared":   w_lu_{t-1}^h(i) = 1 if w_u_{t-1}(i) <= m else 0 for every head,
                   m = w_u_{t-1}(o_{n-1}) the n-th smallest usage (ties at m: every slot at
                   or below m is marked, so more than n may be); the paper's equation for
                   w^lu_t read literally (Santoro et al. 2016, section "Least Recently Used
                   Access"): one n-hot vector that every head writes into
       "per_head": w_lu_{t-1}^h = onehot(o_h): head h writes at the h-th least-used slot,
                   each head its own (as tristandeleu/ntm-one-shot, argsort(w_u)[:, :n])
    2. w_w_t^h = sigmoid(alpha^h) w_r_{t-1}^h + (1 - sigmoid(alpha^h)) w_lu_{t-1}^h
    3. z = o_0 = argmin_i w_u_{t-1}(i) (first index on ties); M'(i) = M_{t-1}(i) [i != z]
       (the least-used slot is zeroed before writing, as the paper states; one slot under
       both rules)
    4. M_t(i) = M'(i) + sum_h w_w_t^h(i) a_t^h,  a_t^h = k_t^h unless adds is given
    5. w_r_t^h(i) = softmax_i K(k_t^h, M_t(i)),
       K(u, v) = u.v / (max(|u|, EPS) max(|v|, EPS)), EPS = 1e-8: each norm clamped alone,
       as metacore.reference.distance.pairwise_cosine, so a zero row (the zeroed slot, a zero
       M_0) has similarity 0 with every key
    6. r_t^h = sum_i w_r_t^h(i) M_t(i)
    7. w_u_t = gamma w_u_{t-1} + sum_h (w_r_t^h + w_w_t^h)
The write uses the previous step's read weights, the read sees the memory just written.

The returned w_lu (T, B, S) is the union over heads, max_h w_lu_t^h: under "per_head" exactly
the n least-used slots o_0 .. o_{n-1}, under "shared" the n-hot vector itself.

Differentiability. w_u reaches the reads only through w_lu (piecewise constant in w_u) and
the choice of z (an argmin): both are treated as constants, their derivative being 0 almost
everywhere. Hence d/dgamma = 0 and d/dusage0 = 0 exactly, and the backward returns gradients
for keys, alpha, memory0 and read0 (and adds, when given) only; every path through those is
differentiated exactly (the formulas are in docs/DERIVATIONS.md, under lrua_backward).

Ops: lrua_forward / lrua_backward run whole episodes (every key known up front; the
backward recomputes the forward); lrua_forward_tape / lrua_backward_tape are the same pair
with the forward keeping a tape of what the backward needs, so that it is not recomputed;
lrua_step_forward / lrua_step_backward run one step t of a batch, for MANN, whose key k_t
depends on r_{t-1} through the controller. All share _step and _step_back, so the chained
step pair reproduces the whole-episode pair.

Every function computes in float64 and returns fresh arrays in the input dtype. Inputs are
assumed valid; `metacore.kernels.lrua` checks them before calling in here.
"""
import numpy as np

EPS = 1e-8


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))     # no overflow for large |x|


def gates(alpha, T, B, H):
    """alpha: (H,) or (T, B, H) -> sigmoid(alpha) broadcast to (T, B, H), float64."""
    return np.broadcast_to(_sigmoid(np.asarray(alpha, dtype=np.float64)), (T, B, H))


WRITE_RULES = ("shared", "per_head")


def least_used(wu, n, write_rule="shared"):
    """wu: (S,) -> w_lu: (n, S) float64, row h the least-used weights of head h (steps 0-1
    of the module docstring), and z: the first argmin (the slot step 3 zeroes)."""
    order = np.argsort(wu, kind="stable")            # ties: the lower slot index first
    S = wu.shape[0]
    if write_rule == "per_head":
        wlu = np.zeros((n, S))
        wlu[np.arange(n), order[:n]] = 1.0
    else:
        wlu = np.repeat((wu <= wu[order[n - 1]]).astype(np.float64)[None], n, axis=0)
    return wlu, int(order[0])


def _norms(x):
    """x: (R, W) -> clamped row norms (R,), 1.0 where the norm is above EPS else 0.0."""
    n = np.sqrt((x * x).sum(axis=1))
    return np.maximum(n, EPS), (n > EPS).astype(np.float64)


def _step(k, a, g, M_prev, wr_prev, wu_prev, gamma, rule):
    """One step of one episode, steps 0-7 of the module docstring.

    k: (H, W) keys, a: (H, W) write content (k itself without an add vector), g: (H,)
    gates, M_prev: (S, W), wr_prev: (H, S), wu_prev: (S,), rule: the write rule
    -> r: (H, W), M: (S, W), wr: (H, S), ww: (H, S), wu: (S,), wlu_prev: (H, S), z: int."""
    H = k.shape[0]
    wlu_prev, z = least_used(wu_prev, H, rule)                           # (H, S)
    ww = g[:, None] * wr_prev + (1.0 - g)[:, None] * wlu_prev            # (H, S)
    M = M_prev.copy()                                                    # (S, W)
    M[z] = 0.0
    M += ww.T @ a
    kn, _ = _norms(k)                                                    # (H,)
    mn, _ = _norms(M)                                                    # (S,)
    c = (k @ M.T) / (kn[:, None] * mn[None, :])                          # (H, S)
    e = np.exp(c - c.max(axis=1, keepdims=True))
    wr = e / e.sum(axis=1, keepdims=True)                                # (H, S)
    r = wr @ M                                                           # (H, W)
    wu = gamma * wu_prev + wr.sum(axis=0) + ww.sum(axis=0)               # (S,)
    return r, M, wr, ww, wu, wlu_prev, z


def _f64(*arrays):
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _run(keys, alpha, memory0, read0, usage0, gamma, keep, rule, adds):
    """The forward pass over every episode; keep: also what the reverse sweep needs.
    -> outputs (reads, w_r, w_w, w_u, w_lu, memory: float64) and, with keep, the tape (a
    dict of float64 copies: g, k, a (the write content), and per episode Ms (M_0 .. M_T),
    wrs (w_r_0 .. w_r_T), wws, wlus (w_lu_{t-1}, (H, S) each), zs), else None."""
    k64, m64, r64, u64 = _f64(keys, memory0, read0, usage0)
    a64 = k64 if adds is None else np.asarray(adds, dtype=np.float64)
    T, B, H, W = keys.shape
    S = memory0.shape[1]
    g = gates(alpha, T, B, H)                                            # (T, B, H)
    reads = np.zeros((T, B, H, W))
    w_r = np.zeros((T, B, H, S))
    w_w = np.zeros((T, B, H, S))
    w_u = np.zeros((T, B, S))
    w_lu = np.zeros((T, B, S))
    memory = np.zeros((B, S, W))
    episodes = []
    for b in range(B):
        M, wr, wu = m64[b], r64[b], u64[b]
        Ms, wrs, wws, wlus, zs = [M.copy()], [wr.copy()], [], [], []
        for t in range(T):
            r, M, wr, ww, wu, wlu_prev, z = _step(k64[t, b], a64[t, b], g[t, b], M, wr, wu,
                                                  float(gamma), rule)
            reads[t, b], w_r[t, b], w_w[t, b], w_u[t, b] = r, wr, ww, wu
            w_lu[t, b] = least_used(wu, H, rule)[0].max(axis=0)
            if keep:
                Ms.append(M)
                wrs.append(wr)
                wws.append(ww)
                wlus.append(wlu_prev)
                zs.append(z)
        memory[b] = M
        episodes.append((Ms, wrs, wws, wlus, zs))
    tape = None
    if keep:
        tape = dict(g=np.array(g), k=k64.copy(), a=None if adds is None else a64.copy(),
                    episodes=episodes, alpha_ndim=np.ndim(alpha), dtype=keys.dtype,
                    shape=(T, B, H, S, W))
    return (reads, w_r, w_w, w_u, w_lu, memory), tape


def _sweep(dreads, tape):
    """The reverse sweep over a tape of _run -> dkeys, dalpha, dmemory0, dread0 (float64),
    and dadds when the tape has an add vector."""
    dr64 = np.asarray(dreads, dtype=np.float64)
    T, B, H, S, W = tape["shape"]
    g, k64, a64 = tape["g"], tape["k"], tape["a"]
    dkeys = np.zeros((T, B, H, W))
    dadds = np.zeros((T, B, H, W))
    dalpha = np.zeros((T, B, H))
    dmemory0 = np.zeros((B, S, W))
    dread0 = np.zeros((B, H, S))
    for b, (Ms, wrs, wws, wlus, zs) in enumerate(tape["episodes"]):
        # Ms[t + 1] is M_t, wrs[t + 1] is w_r_t (index 0 holds step 0)
        dM = np.zeros((S, W))
        dwr = np.zeros((H, S))
        for t in range(T - 1, -1, -1):
            a = k64[t, b] if a64 is None else a64[t, b]
            dkeys[t, b], dadds[t, b], dalpha[t, b], dM, dwr = _step_back(
                dr64[t, b], dM, dwr, k64[t, b], a, g[t, b], Ms[t + 1], wrs[t + 1], wws[t],
                wrs[t], wlus[t], zs[t])
        dmemory0[b] = dM
        dread0[b] = dwr
    if tape["alpha_ndim"] == 1:
        dalpha = dalpha.sum(axis=(0, 1))                                 # (H,)
    if a64 is None:
        return dkeys + dadds, dalpha, dmemory0, dread0
    return dkeys, dalpha, dmemory0, dread0, dadds


def _as(dt, arrays):
    return tuple(a.astype(dt) for a in arrays)


def lrua_forward(keys, alpha, memory0, read0, usage0, gamma, write_rule="shared", adds=None):
    """Run the memory over an episode.

    -> reads (T, B, H, W) r_t, w_r (T, B, H, S), w_w (T, B, H, S), w_u (T, B, S),
       w_lu (T, B, S) (from w_u_t, i.e. the slots the next step writes to, the union over
       heads), memory (B, S, W) M_T; all in the dtype of keys."""
    out, _ = _run(keys, alpha, memory0, read0, usage0, gamma, False, write_rule, adds)
    return _as(keys.dtype, out)


def _step_back(dr, dM, dwr, k, a, g, M, wr, ww, wr_prev, wlu_prev, z):
    """Reverse of one step of one episode (the formulas in lrua_backward's docstring).

    dr: (H, W) dL/dr_t from this step's reads; dM: (S, W) dL/dM_t and dwr: (H, S)
    dL/dw_r_t, both arriving from later steps; k: (H, W) keys, a: (H, W) write content,
    g: (H,), M: (S, W) M_t, wr, ww: (H, S) w_r_t, w_w_t, wr_prev: (H, S) w_r_{t-1},
    wlu_prev: (H, S) w_lu_{t-1}, z: the zeroed slot
    -> dk (H, W) through the reads only, da (H, W) through the write (the caller adds it to
    dk when a is k), dalpha (H,) (per-step gate), dM_prev (S, W), dwr_prev (H, S); fresh."""
    dwr = dwr + dr @ M.T                                                 # (H, S)
    dM = dM + wr.T @ dr                                                  # (S, W)
    dc = wr * (dwr - (wr * dwr).sum(axis=1, keepdims=True))              # (H, S)
    kn, kon = _norms(k)                                                  # (H,)
    mn, mon = _norms(M)                                                  # (S,)
    inv = 1.0 / (kn[:, None] * mn[None, :])                              # (H, S)
    c = (k @ M.T) * inv                                                  # (H, S)
    dk = (dc * inv) @ M - ((dc * c).sum(axis=1) * kon / kn**2)[:, None] * k
    dM = dM + (dc * inv).T @ k - ((dc * c).sum(axis=0) * mon / mn**2)[:, None] * M
    da = ww @ dM                                                         # (H, W)
    dww = a @ dM.T                                                       # (H, S)
    dM[z] = 0.0                                                          # dM is fresh here
    dalpha = g * (1.0 - g) * (dww * (wr_prev - wlu_prev)).sum(axis=1)
    return dk, da, dalpha, dM, g[:, None] * dww


def lrua_backward(dreads, keys, alpha, memory0, read0, usage0, gamma, write_rule="shared",
                  adds=None):
    """Backpropagation through time for the loss L with dL/dreads = dreads: (T, B, H, W).

    Recomputes the forward pass (it keeps M_t for every t), then runs the steps in reverse.
    -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0 (B, S, W), dread0 (B, H, S),
    and dadds (T, B, H, W) last when adds is given.
    Step t in reverse, with dM = dL/dM_t and dwr = dL/dw_r_t arriving from step t + 1
    (a^h = k^h without an add vector, and then the two key terms add up):
        dwr^h(i) += dr^h . M_t(i);   dM(i) += sum_h w_r^h(i) dr^h               (read)
        dc^h(i) = w_r^h(i) (dwr^h(i) - sum_j w_r^h(j) dwr^h(j))                 (softmax)
        dk^h += sum_i dc^h(i) (M_t(i)/(a_h b_i) - [|k^h| > EPS] c^h(i) k^h/a_h^2)
        dM(i) += sum_h dc^h(i) (k^h/(a_h b_i) - [|M_t(i)| > EPS] c^h(i) M_t(i)/b_i^2)
            (a_h = max(|k^h|, EPS), b_i = max(|M_t(i)|, EPS), c = cosine)         (cosine)
        da^h = sum_i w_w^h(i) dM(i);   dww^h(i) = a^h . dM(i)                   (write)
        dM_{t-1}(i) = dM(i) [i != z]                                            (zeroing)
        dw_r_{t-1}^h = g_h dww^h;  dalpha_t^h = g_h (1 - g_h) sum_i dww^h(i)
                                               (w_r_{t-1}^h(i) - w_lu_{t-1}^h(i))  (gate)
    """
    _, tape = _run(keys, alpha, memory0, read0, usage0, gamma, True, write_rule, adds)
    return _as(keys.dtype, _sweep(dreads, tape))


def lrua_forward_tape(keys, alpha, memory0, read0, usage0, gamma, write_rule="shared",
                      adds=None):
    """lrua_forward, also keeping what the backward needs, so that the gradients of the same
    episode cost only the reverse sweep (no second forward pass).

    -> reads, w_r, w_w, w_u, w_lu, memory (exactly lrua_forward's), tape: an opaque object
    for lrua_backward_tape (this backend's own: float64 copies of every M_t, w_r_t, w_w_t,
    w_lu_{t-1}, the zeroed slots, the keys, the add vectors and the gates, so later changes
    to the inputs or outputs do not reach it)."""
    out, tape = _run(keys, alpha, memory0, read0, usage0, gamma, True, write_rule, adds)
    return _as(keys.dtype, out) + (tape,)


def lrua_backward_tape(dreads, tape):
    """lrua_backward of the episode that lrua_forward_tape ran, from its tape: dreads
    (T, B, H, W) dL/dreads -> dkeys (T, B, H, W), dalpha (shape of alpha), dmemory0
    (B, S, W), dread0 (B, H, S) (and dadds when that episode had adds), fresh arrays in the
    dtype of that episode's keys; equal to lrua_backward with the same inputs. The tape is
    not changed (it may be used again, for another dreads)."""
    return _as(tape["dtype"], _sweep(dreads, tape))


# ---------------------------------------------------------------- one step, a batch
def _step_gates(alpha, B, H):
    """alpha: (H,) or (B, H) -> sigmoid(alpha) broadcast to (B, H), float64."""
    return np.broadcast_to(_sigmoid(np.asarray(alpha, dtype=np.float64)), (B, H))


def lrua_step_forward(key, alpha, memory_prev, w_r_prev, w_u_prev, gamma,
                      write_rule="shared", add=None):
    """One step t of B episodes (steps 0-7 of the module docstring), for a caller whose key
    k_t depends on the previous read r_{t-1} (MANN's controller), so that the whole episode
    cannot be handed over at once.

    key (B, H, W) k_t, alpha (H,) or (B, H), memory_prev (B, S, W) M_{t-1},
    w_r_prev (B, H, S) w_r_{t-1}, w_u_prev (B, S) w_u_{t-1}, add None or (B, H, W) a_t
    -> read (B, H, W) r_t, memory (B, S, W) M_t, w_r (B, H, S), w_w (B, H, S), w_u (B, S),
       all in the dtype of key. Chaining T calls, feeding memory, w_r and w_u back, gives
       exactly lrua_forward's reads, w_r, w_w, w_u and M_T."""
    k64, m64, r64, u64 = _f64(key, memory_prev, w_r_prev, w_u_prev)
    a64 = k64 if add is None else np.asarray(add, dtype=np.float64)
    B, H, W = key.shape
    S = memory_prev.shape[1]
    g = _step_gates(alpha, B, H)                                         # (B, H)
    read = np.zeros((B, H, W))
    memory = np.zeros((B, S, W))
    w_r = np.zeros((B, H, S))
    w_w = np.zeros((B, H, S))
    w_u = np.zeros((B, S))
    for b in range(B):
        read[b], memory[b], w_r[b], w_w[b], w_u[b], _, _ = _step(
            k64[b], a64[b], g[b], m64[b], r64[b], u64[b], float(gamma), write_rule)
    dt = key.dtype
    return (read.astype(dt), memory.astype(dt), w_r.astype(dt), w_w.astype(dt),
            w_u.astype(dt))


def lrua_step_backward(dread, dmemory, dw_r, key, alpha, memory_prev, w_r_prev, w_u_prev,
                       gamma, write_rule="shared", add=None):
    """Reverse of lrua_step_forward for the loss L, given what flows back into step t:
    dread (B, H, W) dL/dr_t, dmemory (B, S, W) dL/dM_t and dw_r (B, H, S) dL/dw_r_t (the
    last two from step t + 1: zero after the last step; w_u has no gradient, see the module
    docstring). The step's forward is recomputed from its inputs.
    -> dkey (B, H, W), dalpha (shape of alpha), dmemory_prev (B, S, W) dL/dM_{t-1},
       dw_r_prev (B, H, S) dL/dw_r_{t-1}, and dadd (B, H, W) last when add is given; fresh
       arrays in the dtype of key."""
    dr64, dm64, dw64, k64, m64, r64, u64 = _f64(dread, dmemory, dw_r, key, memory_prev,
                                                w_r_prev, w_u_prev)
    a64 = k64 if add is None else np.asarray(add, dtype=np.float64)
    B, H, W = key.shape
    S = memory_prev.shape[1]
    g = _step_gates(alpha, B, H)                                         # (B, H)
    dkey = np.zeros((B, H, W))
    dadd = np.zeros((B, H, W))
    dalpha = np.zeros((B, H))
    dmemory_prev = np.zeros((B, S, W))
    dw_r_prev = np.zeros((B, H, S))
    for b in range(B):
        _, M, wr, ww, _, wlu_prev, z = _step(k64[b], a64[b], g[b], m64[b], r64[b], u64[b],
                                             float(gamma), write_rule)
        dkey[b], dadd[b], dalpha[b], dmemory_prev[b], dw_r_prev[b] = _step_back(
            dr64[b], dm64[b], dw64[b], k64[b], a64[b], g[b], M, wr, ww, r64[b], wlu_prev, z)
    if np.ndim(alpha) == 1:
        dalpha = dalpha.sum(axis=0)                                      # (H,)
    out = (dkey + dadd if add is None else dkey, dalpha, dmemory_prev, dw_r_prev)
    if add is not None:
        out += (dadd,)
    return _as(key.dtype, out)
