"""Memory-Augmented Neural Network (Santoro, Bartunov, Botvinick, Wierstra & Lillicrap 2016,
"Meta-Learning with Memory-Augmented Neural Networks", ICML), with backpropagation through
time written by hand: LSTM controller, LRUA memory with several read heads, softmax output.

Shape letters: T steps of an episode, B episodes, D input features (a flattened image),
N classes, C controller (LSTM) units, G = 4C gate pre-activations, H read heads,
S memory slots, W slot width, P parameters.

Step t (t = 0..T-1) of every episode, the label arriving one step late (Santoro et al.,
section 3: the input is (x_t, y_{t-1}), so the network must hold a class's first example
until its label shows up):
    u_t = [x_t, onehot(y_{t-1}), r_{t-1}]               (B, D + N + H W), y_{-1}: zeros
    h_t, c_t = LSTM(u_t, h_{t-1}, c_{t-1})              (B, C)  metacore.layers.lstm
    k_t = tanh(h_t W_k + b_k)                           (B, H, W) one key per head
    a_t = tanh(h_t W_a + b_a)                           (B, H, W) only with add_vector=True
    r_t, M_t, w_r_t, w_w_t, w_u_t = LRUA step(k_t, alpha, M_{t-1}, w_r_{t-1}, w_u_{t-1},
                                              write_rule, add = a_t or None)
                                                        metacore.kernels.lrua (step pair)
    z_t = [h_t, r_t] W_o + b_o                          (B, N) logits, p_t = softmax(z_t)
    L = -(1 / (T B)) sum_{t, b} log p_t[y_t]            cross-entropy over the episode
The previous read r_{t-1} enters the controller (as in the NTM the paper builds on), so the
key k_t depends on r_{t-1}: the memory runs one step at a time.

Settings of the memory that the paper's text and public reimplementations resolve
differently (docs/RESULTS_MANN.md):
  * write_rule: "per_head" (default) gives head h its own h-th least-used slot, as
    tristandeleu/ntm-one-shot does (argsort(w_u)[:, :n]); "shared" is the paper's
    equation read literally (Santoro et al. 2016, "Least Recently Used Access": one n-hot
    w^lu_t, marking the n least-used slots, that every head's write weights mix in), so
    with n = 4 heads every head writes its key into all four slots. Ties: the lower slot index first
    (metacore.reference.lrua).
  * add_vector: False (default) writes the key k_t, as the paper's write equation
    (M_t(i) = M_{t-1}(i) + w^w_t(i) k_t); True writes a separate add vector
    a_t = tanh(h_t W_a + b_a) per head, as tristandeleu/ntm-one-shot (new parameters
    add_W (C, H W), add_b (H W,); host backends only).

Choices the paper leaves open (stated here so that a run is reproducible):
  * keys pass through tanh (bounded writes); alpha is the paper's one learned scalar gate
    per head (H,); gamma (usage decay) is a fixed setting, 0.95 by default.
  * initial state (constants, not learned): h_0 = c_0 = 0, r_0 = 0, M_0 = 1e-6 everywhere,
    w_r_0 = 0 (nothing was read before step 0, so the first write goes to the least-used
    slots only), w_u_0(i) = 0.01 i / S: a small ramp that orders the untouched slots
    (otherwise every fresh slot ties for least used and the least-used rule marks them all;
    see metacore.reference.lrua for the tie rule).
  * what is non-differentiable: the least-used selection and the zeroed slot (as in
    metacore.kernels.lrua); every other path, through controller, keys, gates, reads and
    memory over the whole episode, is differentiated exactly.

Backward (t = T-1..0), carrying dh, dc (LSTM state), dr_next = dL/dr_t through u_{t+1},
dM = dL/dM_t and dwr = dL/dw_r_t from step t + 1:
    dz_t = (p_t - onehot(y_t)) / (T B);  dW_o += [h_t, r_t]^T dz_t;  [dh_o, dr_o] = dz_t W_o^T
    dk_t, dalpha_t, dM, dwr (, dadd_t) = LRUA step backward(dr_o + dr_next, dM, dwr)
    dq_t = dk_t (1 - k_t^2);  dW_k += h_t^T dq_t;  dh_t = dh + dh_o + dq_t W_k^T
    (add_vector: dp_t = dadd_t (1 - a_t^2);  dW_a += h_t^T dp_t;  dh_t += dp_t W_a^T)
    dg_t, dc = LSTM step backward(dh_t, dc);  [dr_next, dh] = dg_t [W_r; W_h]^T
    dW_lstm = sum_t [x_t, onehot(y_{t-1}), r_{t-1}, h_{t-1}]^T dg_t    (one product at the end)
(docs/DERIVATIONS.md, section MANN).
"""
from dataclasses import dataclass

import numpy as np

from metacore.kernels import lrua
# the LSTM's one-step pair without per-call checks: MANN checks its inputs once per episode
from metacore.layers.lstm import _step_backward, _step_forward, lstm_init
from metacore.nonfinite import check_loss_grad
from metacore.params import ParamLayout
from metacore.validate import check_float_array, check_int_array


@dataclass(frozen=True)
class MANN:
    """Sizes of one MANN; the parameters live in one flat (P,) vector (see `layout`).
    d_in: D, n_way: N, hidden: C, heads: H, slots: S, width: W, gamma: usage decay,
    write_rule: "per_head" | "shared", add_vector: write a_t = tanh(h_t W_a + b_a) instead
    of the key (module docstring)."""
    d_in: int
    n_way: int = 5
    hidden: int = 200
    heads: int = 4
    slots: int = 128
    width: int = 40
    gamma: float = 0.95
    write_rule: str = "per_head"
    add_vector: bool = False

    def __post_init__(self):
        for name in ("d_in", "n_way", "hidden", "heads", "slots", "width"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"MANN: {name} must be a positive int, got {v!r}")
        if self.slots < self.heads:
            raise ValueError(f"MANN: slots = {self.slots} must be >= heads = {self.heads} "
                             f"(the least-used rule marks one slot per read head)")
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
            raise ValueError(f"MANN: gamma must be a number in [0, 1], got {g!r}")
        if self.write_rule not in lrua.WRITE_RULES:
            raise ValueError(f"MANN: write_rule must be one of {lrua.WRITE_RULES}, got "
                             f"{self.write_rule!r}")
        if not isinstance(self.add_vector, (bool, np.bool_)):
            raise ValueError(f"MANN: add_vector must be a bool, got {self.add_vector!r}")

    # ------------------------------------------------------------------ parameters
    @property
    def layout(self):
        """lstm_W (D + N + H W + C, 4C), lstm_b (4C,), key_W (C, H W), key_b (H W,),
        [add_W (C, H W), add_b (H W,) with add_vector], alpha (H,), out_W (C + H W, N),
        out_b (N,)."""
        HW, C = self.heads * self.width, self.hidden
        add = [("add_W", (C, HW)), ("add_b", (HW,))] if self.add_vector else []
        return ParamLayout([("lstm_W", (self.d_in + self.n_way + HW + C, 4 * C)),
                            ("lstm_b", (4 * C,)),
                            ("key_W", (C, HW)), ("key_b", (HW,))] + add +
                           [("alpha", (self.heads,)),
                            ("out_W", (C + HW, self.n_way)), ("out_b", (self.n_way,))])

    @property
    def num_params(self):
        return self.layout.size

    def init_params(self, rng, dtype=np.float32):
        """LSTM: metacore.layers.lstm.lstm_init (forget bias 1); key, add and output layers
        uniform in +-1/sqrt(fan_in), zero biases; alpha = 0 (gate 1/2). -> (P,)."""
        lay = self.layout
        theta = np.zeros(lay.size, dtype)
        v = lay.views(theta[None])
        Din = self.d_in + self.n_way + self.heads * self.width
        W, b = lstm_init(rng, Din, self.hidden, dtype)
        v["lstm_W"][0], v["lstm_b"][0] = W, b
        for name in ("key_W", "add_W", "out_W") if self.add_vector else ("key_W", "out_W"):
            fan_in = lay.shapes[lay.names.index(name)][0]
            a = 1.0 / np.sqrt(fan_in)
            v[name][0] = rng.uniform(-a, a, v[name].shape[1:])
        return theta

    # ------------------------------------------------------------------ initial state
    def initial_state(self, B, dtype):
        """-> M_0 (B, S, W), w_r_0 (B, H, S), w_u_0 (B, S); see the module docstring."""
        S = self.slots
        M0 = np.full((B, S, self.width), 1e-6, dtype)                  # (B, S, W)
        wr0 = np.zeros((B, self.heads, S), dtype)                      # (B, H, S)
        wu0 = np.tile((0.01 / S) * np.arange(S, dtype=dtype), (B, 1))  # (B, S)
        return M0, wr0, wu0

    # ------------------------------------------------------------------ forward
    def _check(self, op, theta, x, y):
        check_float_array(op, "theta", theta, shape=(self.num_params,))
        check_float_array(op, "x", x, shape=(None, None, self.d_in), dtype=theta.dtype)
        T, B, _ = x.shape
        if T < 1 or B < 1:
            raise ValueError(f"{op}: x (T, B, D) needs at least one step and episode, got "
                             f"shape {x.shape}")
        check_int_array(op, "y", y, shape=(T, B), low=0, high=self.n_way)

    def forward(self, theta, x, y, backend="auto"):
        """theta (P,), x (T, B, D), y (T, B) int labels in 0..N-1 (y_t is the target at t and
        is shown to the controller at t + 1) -> logits (T, B, N), cache for backward.
        The LSTM's input projection of [x_t, onehot(y_{t-1})] for all T steps is one product
        before the loop; only [r_{t-1}, h_{t-1}] is multiplied inside it.
        backend: that of the LRUA step pair (metacore.kernels.lrua). With a device backend
        ('numba-cuda', 'cupy') the memory state M_t, w_r_t, w_u_t (and in backward dL/dM,
        dL/dw_r) stays on the device for the whole episode, and only k_t goes there and r_t
        comes back each step (dk_t, dalpha_t in backward); the controller runs on the host.
        Where the backend cannot run (no GPU) this raises BackendUnavailable saying why."""
        op = "MANN.forward"
        self._check(op, theta, x, y)
        T, B, D = x.shape
        N, C, H, W = self.n_way, self.hidden, self.heads, self.width
        dt = theta.dtype
        p = {k: v[0] for k, v in self.layout.views(theta[None]).items()}
        yprev = np.zeros((T, B, N), dt)                                # (T, B, N)
        yprev[1:] = np.eye(N, dtype=dt)[y[:-1]]
        xy = np.concatenate([x, yprev], axis=2)                        # (T, B, D + N)
        Wl = p["lstm_W"]
        zx = (xy.reshape(T * B, D + N) @ Wl[:D + N] + p["lstm_b"]).reshape(T, B, 4 * C)
        Wr, Wh = Wl[D + N:D + N + H * W], Wl[D + N + H * W:]           # (H W, G), (C, G)
        M, wr, wu = self.initial_state(B, dt)
        on_device = lrua.is_device_backend(backend)
        if on_device:                   # the memory state stays on the device all episode
            M, wr, wu = lrua.to_device(backend, M, wr, wu)
        h = np.zeros((B, C), dt)                                       # (B, C)
        c = np.zeros((B, C), dt)
        r = np.zeros((B, H * W), dt)                                   # (B, H W)
        logits = np.empty((T, B, N), dt)                               # (T, B, N)
        steps = []
        for t in range(T):
            rh_prev = np.concatenate([r, h], axis=1)                   # (B, H W + C)
            c_prev = c
            h, c, gates = _step_forward(zx[t] + r @ Wr, h, c, Wh)
            k = np.tanh(h @ p["key_W"] + p["key_b"])                   # (B, H W)
            a = np.tanh(h @ p["add_W"] + p["add_b"]) if self.add_vector else None
            mem_prev = (M, wr, wu)
            read, M, wr, _, wu = lrua.lrua_step_forward(
                k.reshape(B, H, W), p["alpha"], M, wr, wu, self.gamma, backend=backend,
                write_rule=self.write_rule, add=None if a is None else a.reshape(B, H, W))
            if on_device:
                (read,) = lrua.to_host(backend, read)
            r = read.reshape(B, H * W)                                 # (B, H W)
            hr = np.concatenate([h, r], axis=1)                        # (B, C + H W)
            logits[t] = hr @ p["out_W"] + p["out_b"]
            steps.append((rh_prev, c_prev, gates, k, mem_prev, hr, a))
        return logits, (theta, p, xy, steps, backend)

    def loss(self, logits, y):
        """Mean cross-entropy over T B steps -> (loss, probabilities (T, B, N))."""
        z = logits.astype(np.float64)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        prob = e / e.sum(axis=-1, keepdims=True)                      # (T, B, N)
        T, B = y.shape
        lp = np.take_along_axis(np.log(prob), y[..., None], axis=-1)
        return float(-lp.mean()), prob

    # ------------------------------------------------------------------ backward
    def backward(self, dlogits, cache):
        """dlogits (T, B, N) = dL/dlogits -> grad (P,) in the dtype of theta (a fresh array).
        The LSTM's weight gradient is one product over all T B rows after the loop."""
        theta, p, xy, steps, backend = cache
        T, B, N = dlogits.shape
        C, H, W, S = self.hidden, self.heads, self.width, self.slots
        dt = theta.dtype
        check_float_array("MANN.backward", "dlogits", dlogits, shape=(len(steps), None, N),
                          dtype=dt)
        grad = np.zeros(self.num_params, dt)
        g = {k: v[0] for k, v in self.layout.views(grad[None]).items()}
        dh = np.zeros((B, C), dt)                                      # (B, C)
        dc = None
        dr_next = np.zeros((B, H * W), dt)                             # (B, H W)
        dM = np.zeros((B, S, W), dt)                                   # (B, S, W)
        dwr = np.zeros((B, H, S), dt)                                  # (B, H, S)
        on_device = lrua.is_device_backend(backend)
        if on_device:                   # dL/dM and dL/dw_r stay on the device as well
            dM, dwr = lrua.to_device(backend, dM, dwr)
        Wo, Wk = p["out_W"], p["key_W"]
        DN = xy.shape[2]                                               # D + N
        Wrh = p["lstm_W"][DN:]                                         # (H W + C, G)
        dzs = np.empty((T, B, 4 * C), dt)                              # (T, B, G)
        for t in range(T - 1, -1, -1):
            rh_prev, c_prev, gates, k, (M_prev, wr_prev, wu_prev), hr, a = steps[t]
            dz = dlogits[t]                                            # (B, N)
            g["out_W"] += hr.T @ dz
            g["out_b"] += dz.sum(axis=0)
            dhr = dz @ Wo.T                                            # (B, C + H W)
            dr = (dhr[:, C:] + dr_next).reshape(B, H, W)
            dk, dalpha, dM, dwr, *dadd = lrua.lrua_step_backward(
                dr, dM, dwr, k.reshape(B, H, W), p["alpha"], M_prev, wr_prev, wu_prev,
                self.gamma, backend=backend, write_rule=self.write_rule,
                add=None if a is None else a.reshape(B, H, W))
            if on_device:
                dk, dalpha = lrua.to_host(backend, dk, dalpha)
            g["alpha"] += dalpha
            dq = dk.reshape(B, H * W) * (1 - k * k)                    # (B, H W)
            g["key_W"] += hr[:, :C].T @ dq
            g["key_b"] += dq.sum(axis=0)
            dh_t = dh + dhr[:, :C] + dq @ Wk.T                         # (B, C)
            if a is not None:
                dp = dadd[0].reshape(B, H * W) * (1 - a * a)           # (B, H W)
                g["add_W"] += hr[:, :C].T @ dp
                g["add_b"] += dp.sum(axis=0)
                dh_t += dp @ p["add_W"].T
            dzs[t], dc = _step_backward(dh_t, dc, c_prev, gates)
            drh = dzs[t] @ Wrh.T                                       # (B, H W + C)
            dr_next, dh = drh[:, :H * W], drh[:, H * W:]
        dz2 = dzs.reshape(T * B, 4 * C)                                # (T B, G)
        rh = np.stack([s[0] for s in steps]).reshape(T * B, -1)        # (T B, H W + C)
        g["lstm_W"][:DN] = xy.reshape(T * B, DN).T @ dz2
        g["lstm_W"][DN:] = rh.T @ dz2
        g["lstm_b"][:] = dz2.sum(axis=0)
        return grad

    def loss_grad(self, theta, x, y, backend="auto"):
        """-> loss (float), correct (T, B) bool (argmax of p_t == y_t), grad (P,)."""
        logits, cache = self.forward(theta, x, y, backend)
        loss, prob = self.loss(logits, y)
        T, B = y.shape
        dz = prob.copy()
        np.put_along_axis(dz, y[..., None], np.take_along_axis(dz, y[..., None], -1) - 1, -1)
        dz /= T * B
        grad = self.backward(dz.astype(theta.dtype), cache)
        check_loss_grad("MANN.loss_grad", loss, grad)
        return loss, prob.argmax(axis=-1) == y, grad


def instance_index(y):
    """y (T, B) labels -> (T, B) int: 1 + how often y[t, b] appeared in y[:t, b], i.e. which
    presentation of its class step t is (the paper's "instance")."""
    T, B = y.shape
    out = np.empty((T, B), np.int64)
    seen = np.zeros((B, int(y.max()) + 1), np.int64)
    cols = np.arange(B)
    for t in range(T):
        seen[cols, y[t]] += 1
        out[t] = seen[cols, y[t]]
    return out


def accuracy_by_instance(correct, y, n_instances):
    """correct (T, B) bool, y (T, B) -> (B, n_instances) float: per episode, the accuracy
    over the steps that show a class for the i-th time (i = 1..n_instances; NaN if none)."""
    inst = instance_index(y)
    T, B = y.shape
    out = np.full((B, n_instances), np.nan)
    for i in range(1, n_instances + 1):
        m = inst == i                                                  # (T, B)
        cnt = m.sum(axis=0)
        ok = cnt > 0
        out[ok, i - 1] = (correct & m).sum(axis=0)[ok] / cnt[ok]
    return out
