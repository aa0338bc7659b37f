"""LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000): one cell,
a sequence, and a bidirectional pair, each a forward/backward pair written by hand.

Shapes (one letter per axis, used on every array line below):
  S steps, B sequences in the batch (any flattening of tasks x items the caller chooses),
  D input features, H hidden units, G = 4H gate pre-activations.
Sequences are time-major: x (S, B, D).

One step, with z = [x, h] W + b split into four H-wide blocks in the order (i, f, o, g):
    i = sigmoid(z_i)   input gate         f = sigmoid(z_f)   forget gate
    o = sigmoid(z_o)   output gate        g = tanh(z_g)      candidate
    c_new = f * c + i * g                 h_new = o * tanh(c_new)
W: (D + H, 4H) acts on the concatenation [x, h] (rows 0..D-1 read x, rows D.. read h).

Backward of one step (dh_new, dc_new upstream; tc = tanh(c_new)):
    dc_tot = dc_new + dh_new * o * (1 - tc^2)
    dz_o = dh_new * tc * o (1 - o)        dz_i = dc_tot * g * i (1 - i)
    dz_f = dc_tot * c * f (1 - f)         dz_g = dc_tot * i * (1 - g^2)
    dc = dc_tot * f     [dx, dh] = dz W^T     dW = [x, h]^T dz     db = sum_b dz
Through time the same step runs backwards with dh_s = dhs[s] + (dh from step s+1) and
dc_s = (dc from step s+1); dW and db are sums over the steps (computed as one product over
all S * B rows after the loop rather than accumulated step by step).

Every array is computed in the input dtype (float32 or float64, preserved); no R-operator.
"""
import numpy as np

from metacore.validate import check_float_array

GATES = ("i", "f", "o", "g")     # order of the four H-wide blocks of z, W's columns and b


def sigmoid(z):
    """1 / (1 + exp(-z)) without overflow: exp only ever sees -|z|."""
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def lstm_param_shapes(d_in, hidden):
    """[('W', (D + H, 4H)), ('b', (4H,))], for a metacore.params.ParamLayout."""
    return [("W", (d_in + hidden, 4 * hidden)), ("b", (4 * hidden,))]


def lstm_init(rng, d_in, hidden, dtype=np.float64, forget_bias=1.0):
    """W uniform in +-1/sqrt(H); b zero except the forget-gate block, set to forget_bias
    (Gers et al. 2000; Jozefowicz et al. 2015 recommend 1: the cell starts out remembering).
    -> W: (D + H, 4H), b: (4H,)."""
    a = 1.0 / np.sqrt(hidden)
    W = rng.uniform(-a, a, (d_in + hidden, 4 * hidden)).astype(dtype)    # (D+H, G)
    b = np.zeros(4 * hidden, dtype)                                       # (G,)
    b[hidden:2 * hidden] = forget_bias
    return W, b


# ---------------------------------------------------------------------- checks
def _check_params(op, D, H, W, b, dtype):
    check_float_array(op, "W", W, shape=(D + H, 4 * H), dtype=dtype)
    check_float_array(op, "b", b, shape=(4 * H,), dtype=dtype)


def _check_state(op, B, h, c, dtype, hname="h", cname="c"):
    check_float_array(op, hname, h, ndim=2, dtype=dtype)
    if h.shape[0] != B:
        raise ValueError(f"{op}: {hname} must have shape ({B}, H) to match the batch of x, "
                         f"got {h.shape}")
    check_float_array(op, cname, c, shape=h.shape, dtype=dtype)
    return h.shape[1]


# ---------------------------------------------------------------------- one step
def _step_forward(zx, h, c, Wh):
    """zx = x W_x + b: (B, G) precomputed; h, c: (B, H); Wh: (H, G)
    -> h_new, c_new: (B, H), gates (i, f, o, g, tc) each (B, H)."""
    H = h.shape[1]
    z = zx + h @ Wh                                     # (B, G)
    i = sigmoid(z[:, :H])                               # (B, H)
    f = sigmoid(z[:, H:2 * H])
    o = sigmoid(z[:, 2 * H:3 * H])
    g = np.tanh(z[:, 3 * H:])
    c_new = f * c + i * g                               # (B, H)
    tc = np.tanh(c_new)
    return o * tc, c_new, (i, f, o, g, tc)


def _step_backward(dh_new, dc_new, c, gates):
    """-> dz: (B, G) (pre-activation gradient), dc: (B, H) (to the previous cell state)."""
    i, f, o, g, tc = gates
    dc_tot = dh_new * o * (1 - tc * tc)                 # (B, H)
    if dc_new is not None:
        dc_tot += dc_new
    dz = np.concatenate([dc_tot * g * i * (1 - i),      # (B, G)
                         dc_tot * c * f * (1 - f),
                         dh_new * tc * o * (1 - o),
                         dc_tot * i * (1 - g * g)], axis=1)
    return dz, dc_tot * f


def lstm_cell_forward(x, h, c, W, b):
    """One step. x: (B, D), h, c: (B, H), W: (D + H, 4H), b: (4H,)
    -> h_new (B, H), c_new (B, H), cache = (x, h, c, W, gates)."""
    op = "lstm_cell"
    check_float_array(op, "x", x, ndim=2)
    B, D = x.shape
    H = _check_state(op, B, h, c, x.dtype)
    _check_params(op, D, H, W, b, x.dtype)
    zx = x @ W[:D] + b                                  # (B, G)
    h_new, c_new, gates = _step_forward(zx, h, c, W[D:])
    return h_new, c_new, (x, h, c, W, gates)


def lstm_cell_backward(dh_new, dc_new, cache):
    """dh_new, dc_new: (B, H) (dc_new may be None: zero) -> dx (B, D), dh (B, H), dc (B, H),
    dW (D + H, 4H), db (4H,); all fresh arrays."""
    x, h, c, W, gates = cache
    op = "lstm_cell backward"
    check_float_array(op, "dh_new", dh_new, shape=h.shape, dtype=x.dtype)
    if dc_new is not None:
        check_float_array(op, "dc_new", dc_new, shape=h.shape, dtype=x.dtype)
    D = x.shape[1]
    dz, dc = _step_backward(dh_new, dc_new, c, gates)   # (B, G), (B, H)
    dxh = dz @ W.T                                      # (B, D + H)
    dW = np.concatenate([x, h], axis=1).T @ dz          # (D + H, G)
    return dxh[:, :D].copy(), dxh[:, D:].copy(), dc, dW, dz.sum(axis=0)


# ---------------------------------------------------------------------- a sequence
def lstm_forward(x, h0, c0, W, b):
    """x: (S, B, D), h0, c0: (B, H), W: (D + H, 4H), b: (4H,)
    -> hs (S, B, H) (the hidden state after every step), (h_S, c_S) each (B, H), cache.
    The input projection x W_x + b of all S steps is one product before the loop."""
    op = "lstm"
    check_float_array(op, "x", x, ndim=3)
    S, B, D = x.shape
    if S < 1:
        raise ValueError(f"{op}: x must hold at least one step, got shape {x.shape}")
    H = _check_state(op, B, h0, c0, x.dtype, "h0", "c0")
    _check_params(op, D, H, W, b, x.dtype)
    zx = (x.reshape(S * B, D) @ W[:D] + b).reshape(S, B, 4 * H)    # (S, B, G)
    Wh = W[D:]                                                      # (H, G)
    hs = np.empty((S, B, H), x.dtype)                               # (S, B, H)
    cs = np.empty((S, B, H), x.dtype)                               # (S, B, H)
    gates = []
    h, c = h0, c0
    for s in range(S):
        h, c, gt = _step_forward(zx[s], h, c, Wh)
        hs[s], cs[s] = h, c
        gates.append(gt)
    return hs, (h, c), (x, h0, c0, W, hs, cs, gates)


def lstm_backward(dhs, dh_S, dc_S, cache):
    """Backward through time. dhs: (S, B, H) gradient on every output (None: zero), dh_S,
    dc_S: (B, H) on the final state (None: zero)
    -> dx (S, B, D), dh0 (B, H), dc0 (B, H), dW (D + H, 4H), db (4H,): fresh arrays;
    dW and db are the sums over the S steps of each step's contribution."""
    x, h0, c0, W, hs, cs, gates = cache
    op = "lstm backward"
    S, B, D = x.shape
    H = h0.shape[1]
    if dhs is not None:
        check_float_array(op, "dhs", dhs, shape=(S, B, H), dtype=x.dtype)
    for name, a in (("dh_S", dh_S), ("dc_S", dc_S)):
        if a is not None:
            check_float_array(op, name, a, shape=(B, H), dtype=x.dtype)
    Wh = W[D:]                                                      # (H, G)
    dz = np.empty((S, B, 4 * H), x.dtype)                           # (S, B, G)
    dh = np.zeros((B, H), x.dtype) if dh_S is None else dh_S.copy() # (B, H)
    dc = dc_S
    for s in range(S - 1, -1, -1):
        if dhs is not None:
            dh = dh + dhs[s]
        c_prev = c0 if s == 0 else cs[s - 1]
        dz[s], dc = _step_backward(dh, dc, c_prev, gates[s])
        dh = dz[s] @ Wh.T                                           # (B, H)
    h_prev = np.concatenate([h0[None], hs[:-1]], axis=0)            # (S, B, H)
    dz2 = dz.reshape(S * B, 4 * H)                                  # (S*B, G)
    dx = (dz2 @ W[:D].T).reshape(S, B, D)                           # (S, B, D)
    dW = np.concatenate([x.reshape(S * B, D).T @ dz2,               # (D + H, G)
                         h_prev.reshape(S * B, H).T @ dz2], axis=0)
    return dx, dh, dc, dW, dz2.sum(axis=0)


# ---------------------------------------------------------------------- bidirectional
def bilstm_forward(x, Wf, bf, Wb, bb):
    """Two LSTMs with zero initial states (as Vinyals et al. 2016's g): the forward one reads
    x[0], ..., x[S-1]; the backward one reads x[S-1], ..., x[0].
    x: (S, B, D), Wf, Wb: (D + H, 4H), bf, bb: (4H,)
    -> hf (S, B, H): forward state after reading x[0..s];
       hb (S, B, H): backward state after reading x[S-1..s] (aligned with step s); cache."""
    op = "bilstm"
    check_float_array(op, "x", x, ndim=3)
    S, B, D = x.shape
    check_float_array(op, "Wf", Wf, ndim=2, dtype=x.dtype)
    if Wf.shape[1] % 4 or Wf.shape[0] != D + Wf.shape[1] // 4:
        raise ValueError(f"{op}: Wf must have shape (D + H, 4H) = ({D} + H, 4H) for x of shape "
                         f"{x.shape}, got {Wf.shape}")
    H = Wf.shape[1] // 4
    _check_params(op, D, H, Wf, bf, x.dtype)
    _check_params(op + " (backward direction)", D, H, Wb, bb, x.dtype)
    zero = np.zeros((B, H), x.dtype)                                # (B, H)
    hf, _, cache_f = lstm_forward(x, zero, zero, Wf, bf)
    hb_rev, _, cache_b = lstm_forward(x[::-1], zero, zero, Wb, bb)
    return hf, hb_rev[::-1].copy(), (cache_f, cache_b)


def bilstm_backward(dhf, dhb, cache):
    """dhf, dhb: (S, B, H) gradients on the two output sequences (None: zero)
    -> dx (S, B, D), dWf, dbf, dWb, dbb (fresh arrays)."""
    cache_f, cache_b = cache
    dxf, _, _, dWf, dbf = lstm_backward(dhf, None, None, cache_f)
    dhb_rev = None if dhb is None else np.ascontiguousarray(dhb[::-1])
    dxb_rev, _, _, dWb, dbb = lstm_backward(dhb_rev, None, None, cache_b)
    return dxf + dxb_rev[::-1], dWf, dbf, dWb, dbb
