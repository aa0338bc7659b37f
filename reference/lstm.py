"""LSTM, one sequence at a time: plain float64 NumPy ground truth for metacore.layers.lstm.

Shape letters (this module):
    S steps, B sequences, D input features, H hidden units.

Each gate has its own input and recurrent matrices, cut out of the packed W: (D + H, 4H) whose
column blocks are (i, f, o, g) and whose rows are (x rows, then h rows):
    i_t = sigma(x_t Wxi + h_{t-1} Whi + b_i)     f_t = sigma(x_t Wxf + h_{t-1} Whf + b_f)
    o_t = sigma(x_t Wxo + h_{t-1} Who + b_o)     g_t = tanh(x_t Wxg + h_{t-1} Whg + b_g)
    c_t = f_t c_{t-1} + i_t g_t                  h_t = o_t tanh(c_t)
The backward pass is written per gate and per step, accumulating into dW and db with +=
(those local arrays start at zero). sigma(z) = 1/2 (1 + tanh(z / 2)), an identity that never
overflows (a different formula from the fast module's). Every function returns fresh float64
arrays; inputs are assumed valid (the fast module checks them).
"""
import numpy as np


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


def _sigma(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _split(W, b, D, H):
    """-> {gate: (Wx (D, H), Wh (H, H), b (H,))} for the gates i, f, o, g."""
    out = {}
    for k, name in enumerate("ifog"):
        cols = slice(k * H, (k + 1) * H)
        out[name] = (W[:D, cols], W[D:, cols], b[cols])
    return out


def _run(x, h0, c0, W, b):
    """One sequence. x: (S, D), h0, c0: (H,) -> per-step lists of (h_prev, c_prev, i, f, o, g,
    c, h)."""
    S, D = x.shape
    H = h0.shape[0]
    p = _split(W, b, D, H)
    steps, h, c = [], h0, c0
    for t in range(S):
        pre = {k: x[t] @ Wx + h @ Wh + bk for k, (Wx, Wh, bk) in p.items()}   # each (H,)
        i, f, o = _sigma(pre["i"]), _sigma(pre["f"]), _sigma(pre["o"])
        g = np.tanh(pre["g"])
        c_new = f * c + i * g
        h_new = o * np.tanh(c_new)
        steps.append((h, c, i, f, o, g, c_new, h_new))
        h, c = h_new, c_new
    return steps


def lstm_forward_one(x, h0, c0, W, b):
    """x: (S, D), h0, c0: (H,) -> hs (S, H), h_S (H,), c_S (H,)."""
    x, h0, c0, W, b = _f64(x, h0, c0, W, b)
    steps = _run(x, h0, c0, W, b)
    hs = np.array([st[7] for st in steps])                  # (S, H)
    return hs, steps[-1][7].copy(), steps[-1][6].copy()


def lstm_backward_one(dhs, dh_S, dc_S, x, h0, c0, W, b):
    """dhs: (S, H), dh_S, dc_S: (H,) -> dx (S, D), dh0 (H,), dc0 (H,), dW (D + H, 4H),
    db (4H,). Recomputes the forward pass."""
    dhs, dh_S, dc_S, x, h0, c0, W, b = _f64(dhs, dh_S, dc_S, x, h0, c0, W, b)
    S, D = x.shape
    H = h0.shape[0]
    p = _split(W, b, D, H)
    steps = _run(x, h0, c0, W, b)
    dW = np.zeros_like(W)                                   # (D + H, 4H), accumulated
    db = np.zeros_like(b)                                   # (4H,), accumulated
    dx = np.zeros_like(x)                                   # (S, D)
    dh, dc = dh_S.copy(), dc_S.copy()
    for t in range(S - 1, -1, -1):
        h_prev, c_prev, i, f, o, g, c, _ = steps[t]
        dh = dh + dhs[t]
        tc = np.tanh(c)
        do = dh * tc
        dc = dc + dh * o * (1.0 - tc ** 2)
        dpre = {"i": dc * g * i * (1.0 - i), "f": dc * c_prev * f * (1.0 - f),
                "o": do * o * (1.0 - o), "g": dc * i * (1.0 - g ** 2)}
        dh_prev = np.zeros(H)
        for k, name in enumerate("ifog"):
            Wx, Wh, _ = p[name]
            cols = slice(k * H, (k + 1) * H)
            dW[:D, cols] += np.outer(x[t], dpre[name])
            dW[D:, cols] += np.outer(h_prev, dpre[name])
            db[cols] += dpre[name]
            dx[t] += Wx @ dpre[name]
            dh_prev += Wh @ dpre[name]
        dh, dc = dh_prev, dc * f
    return dx, dh, dc, dW, db


def lstm_forward(x, h0, c0, W, b):
    """Batched by a loop over sequences. x: (S, B, D), h0, c0: (B, H)
    -> hs (S, B, H), h_S (B, H), c_S (B, H)."""
    outs = [lstm_forward_one(x[:, n], h0[n], c0[n], W, b) for n in range(x.shape[1])]
    return (np.stack([o[0] for o in outs], axis=1), np.stack([o[1] for o in outs]),
            np.stack([o[2] for o in outs]))


def lstm_backward(dhs, dh_S, dc_S, x, h0, c0, W, b):
    """dhs: (S, B, H), dh_S, dc_S: (B, H) -> dx (S, B, D), dh0 (B, H), dc0 (B, H),
    dW (D + H, 4H) and db (4H,) summed over the sequences."""
    outs = [lstm_backward_one(dhs[:, n], dh_S[n], dc_S[n], x[:, n], h0[n], c0[n], W, b)
            for n in range(x.shape[1])]
    return (np.stack([o[0] for o in outs], axis=1), np.stack([o[1] for o in outs]),
            np.stack([o[2] for o in outs]), sum(o[3] for o in outs), sum(o[4] for o in outs))


def bilstm_forward(x, Wf, bf, Wb, bb):
    """x: (S, B, D) -> hf (S, B, H), hb (S, B, H): zero initial states; the backward LSTM
    reads x in reverse and its outputs are put back in forward order."""
    x = np.asarray(x, np.float64)
    S, B, _ = x.shape
    H = Wf.shape[1] // 4
    z = np.zeros((B, H))
    hf = lstm_forward(x, z, z, Wf, bf)[0]
    hb = lstm_forward(x[::-1], z, z, Wb, bb)[0][::-1]
    return hf, hb.copy()


def bilstm_backward(dhf, dhb, x, Wf, bf, Wb, bb):
    """-> dx (S, B, D), dWf, dbf, dWb, dbb."""
    x = np.asarray(x, np.float64)
    S, B, _ = x.shape
    H = Wf.shape[1] // 4
    z = np.zeros((B, H))
    dxf, _, _, dWf, dbf = lstm_backward(dhf, z, z, x, z, z, Wf, bf)
    dxb, _, _, dWb, dbb = lstm_backward(np.asarray(dhb)[::-1], z, z, x[::-1], z, z, Wb, bb)
    return dxf + dxb[::-1], dWf, dbf, dWb, dbb
