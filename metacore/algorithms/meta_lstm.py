"""The LSTM meta-learner of Ravi & Larochelle (2017, "Optimization as a model for few-shot
learning"): the learner's parameters are the cell state of an LSTM whose gates are learned,
with a hand-written backward through the whole unroll.

Shape letters (this module):
    T tasks (episodes) in the meta-batch, P learner parameters (one "coordinate" each),
    B = T * P coordinates in all, H hidden units of the first LSTM layer (20 in the paper),
    S inner steps, N support images, M query images. Q meta-parameters (flat vector phi).

The meta-learner (Section 3.2 of the paper; one copy per coordinate, parameters shared across
coordinates, each coordinate with its own states):
    loss_s, g_s = L_support(theta_{s-1}), grad L_support(theta_{s-1})     (learner, batch BN)
    x_s = [pre(loss_s), pre(g_s)]                       (B, 4): loss broadcast over coordinates
    h_s, m_s = LSTM1(x_s; h_{s-1}, m_{s-1})             first layer, a standard LSTM (B, H)
    f_s = sigmoid(W_F . [h_s, theta_{s-1}, f_{s-1}] + b_F)     forget gate (per coordinate)
    i_s = sigmoid(W_I . [h_s, theta_{s-1}, i_{s-1}] + b_I)     input gate ("learning rate")
    theta_s = c_s = f_s * c_{s-1} + i_s * (-g_s),   c_0 = theta_0 learned
Meta-objective: F(phi) = mean_t L_query_t(theta_S^t). The first LSTM layer reads the
preprocessed gradient and loss (Andrychowicz et al. 2016, p = 10):
    pre(x) = (log|x| / p, sign x)   if |x| >= e^-p,   (-1, e^p x)   otherwise
(continuous in x; piecewise smooth). The previous gate f_{s-1}, i_{s-1} fed back is the gate
value (the paper's equation); f_0 = i_0 = 0, h_0 = m_0 = 0. The raw gradient g_s enters only
the cell update, as in the authors' code.

Seed's identity: with f_s = 1 and i_s = alpha the update is theta_s = theta_{s-1} - alpha g_s,
plain SGD with rate alpha (`gates=(1, alpha)` below; tests/test_meta_lstm.py).

Meta-gradient. As the paper does (Section 3.2, "we ignore the gradients through the learner's
gradient/loss"), g_s and loss_s are inputs of the meta-learner with their dependence on
theta_{s-1} dropped: dF/dphi is the exact gradient of the unroll with g_1..g_S and
loss_1..loss_S held at their values (what the finite-difference test checks). With
second_order=True the dropped terms are added back exactly:
    d theta_{s-1} += H_{s-1} dg_s + dloss_s g_s,   H_{s-1} = hess L_support(theta_{s-1})
through Model.hvp, giving the gradient of the true F. Backward recursion (adjoints d.):
    dc_S = grad L_query(theta_S) / T
    for s = S .. 1:
        df = dc_s * c_{s-1} + (df from step s+1's gate input), di = -dc_s * g_s + (...)
        dzf = df f (1 - f),  dzi = di i (1 - i)
        dW_F += sum [h_s, c_{s-1}, f_{s-1}] dzf,  db_F += sum dzf     (I likewise)
        dh_s = dzf W_F[:H] + dzi W_I[:H]      -> backward through LSTM1 step s
        dc_{s-1} = dc_s f_s + dzf W_F[H] + dzi W_I[H]
        (df, di to step s: dzf W_F[H+1], dzi W_I[H+1])
    dc_0 = sum over tasks.
Memory: the caches of the S steps, about 8 B*H + 6 T*P numbers per step (first layer states
and gates dominate: 20 floats per coordinate per array).
"""
import math

import numpy as np

from metacore.algorithms.maml import _check_model
from metacore.layers.lstm import lstm_cell_backward, lstm_cell_forward, sigmoid
from metacore.network import LOSSES
from metacore.nonfinite import check_loss_grad
from metacore.params import ParamLayout, tile_tasks
from metacore.validate import check_float_array


# ----------------------------------------------------------------------- preprocessing
def preprocess(x, p=10.0):
    """Andrychowicz et al. 2016's preprocessing: x any shape -> (..., 2), same dtype:
    (log|x| / p, sign x) where |x| >= e^-p, (-1, e^p x) elsewhere (continuous at the switch)."""
    a = np.abs(x)
    big = a >= math.exp(-p)
    out = np.empty(x.shape + (2,), x.dtype)
    out[..., 0] = np.where(big, np.log(np.where(big, a, 1)) / p, -1)
    out[..., 1] = np.where(big, np.sign(x), math.exp(p) * x)
    return out


def preprocess_backward(dy, x, p=10.0):
    """dy: (..., 2) upstream -> dx shaped like x: d/dx log|x|/p = 1/(p x), d/dx e^p x = e^p."""
    big = np.abs(x) >= math.exp(-p)
    safe = np.where(big, x, 1)
    return np.where(big, dy[..., 0] / (p * safe), math.exp(p) * dy[..., 1]).astype(x.dtype)


# ----------------------------------------------------------------------- the learner's passes
def _loss_grad_out(model, theta, x, y):
    """-> loss (T,), grad (T, P), out (T, N, O), unchecked (validated once by the caller)."""
    lfwd, lbwd, _ = LOSSES[model.loss_name]
    out, caches = model.forward(theta, x, _checked=True)
    loss, lcache = lfwd(out, y)
    return loss, model.backward(lbwd(lcache), caches, theta.shape[0]), out


def _accuracy(out, y):
    """out: (T, M, O) logits, y: (T, M) -> (T,) fraction correct."""
    return (out.argmax(axis=-1) == y).mean(axis=1)


class MetaLSTM:
    """The meta-learner around one learner model (a metacore.network.Model with a loss).

    hidden: H, the first layer's width (20 in the paper); p: the preprocessing constant.
    Meta-parameters phi (Q,), named views by self.layout:
        c0 (P,)             the learner's initial parameters theta_0 (learned)
        lstm.W (4 + H, 4H), lstm.b (4H,)   first layer (metacore.layers.lstm, gates i, f, o, g)
        WF (H + 2,), bF (1,), WI (H + 2,), bI (1,)   forget and input gate of the cell
    """

    def __init__(self, model, hidden=20, p=10.0):
        _check_model("MetaLSTM", model)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"MetaLSTM: hidden must be a positive int, got {hidden!r}")
        if not (isinstance(p, (int, float)) and math.isfinite(p) and p > 0):
            raise ValueError(f"MetaLSTM: p must be a finite number > 0, got {p!r}")
        self.model, self.H, self.p = model, hidden, float(p)
        P, H = model.num_params, hidden
        self.layout = ParamLayout([("c0", (P,)), ("lstm.W", (4 + H, 4 * H)),
                                   ("lstm.b", (4 * H,)), ("WF", (H + 2,)), ("bF", (1,)),
                                   ("WI", (H + 2,)), ("bI", (1,))])
        self.num_params = self.layout.size

    # ------------------------------------------------------------------ parameters
    def init_params(self, rng, dtype=np.float64, init_scale=0.01, forget_bias=(4.0, 5.0),
                    input_bias=(-5.0, -4.0)):
        """The authors' initialisation: c0 the learner's own initialiser; every meta-learner
        weight and bias U(-init_scale, init_scale), then b_F ~ U(4, 5) (f near 1: the learner
        keeps its parameters) and b_I ~ U(-5, -4) (i near 0.01: small first steps)."""
        phi = np.empty(self.num_params, dtype)
        v = self.views(phi)
        v["c0"][...] = self.model.init_params(rng, dtype)
        for name in ("lstm.W", "lstm.b", "WF", "WI"):
            v[name][...] = rng.uniform(-init_scale, init_scale, v[name].shape)
        v["bF"][...] = rng.uniform(*forget_bias, 1)
        v["bI"][...] = rng.uniform(*input_bias, 1)
        return phi

    def views(self, phi):
        """phi (Q,) -> {name: view}; writing a view writes phi."""
        return {k: a[0] for k, a in self.layout.views(phi[None, :]).items()}

    # ------------------------------------------------------------------ checks
    def _check(self, op, phi, sx, sy, qx=None, qy=None, steps=1):
        check_float_array(op, "phi", phi, shape=(self.num_params,))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{op}: steps must be an int >= 0, got {steps!r}")
        if not isinstance(sx, np.ndarray) or sx.ndim < 2:
            raise ValueError(f"{op}: support_x must be a (T, N, ...) array, got "
                             f"{getattr(sx, 'shape', type(sx).__name__)}")
        T = sx.shape[0]
        self.model._check_data(T, phi.dtype, sx, sy)
        if qx is not None:
            self.model._check_data(T, phi.dtype, qx, qy)
        return T

    # ------------------------------------------------------------------ forward
    def unroll(self, phi, sx, sy, steps, keep=False, gates=None, inputs=None):
        """Run the meta-learner for `steps` updates on the support set (sx, sy) of T tasks.

        gates: None (learned), or (f, i) constants replacing the gates (the seed's identity:
            (1, alpha) is SGD with rate alpha).
        inputs: None (computed), or (losses, grads), lists of S arrays (T,) and (T, P): the
            learner's loss and gradient to use at each step instead of computing them (the
            stopped inputs of the first-order meta-gradient, for finite differences).
        -> dict with "theta" (T, P) theta_S, "losses" [S x (T,)], "grads" [S x (T, P)], and
           with keep=True "cache" (what backward needs).
        """
        v = self.views(phi)
        P, H, p = self.model.num_params, self.H, self.p
        T = sx.shape[0]
        B = T * P
        dt = phi.dtype
        c = tile_tasks(v["c0"], T)                                     # (T, P)
        h1 = np.zeros((B, H), dt)                                      # (B, H)
        m1 = np.zeros((B, H), dt)                                      # (B, H)
        f = np.zeros((T, P), dt)                                       # (T, P)
        i = np.zeros((T, P), dt)                                       # (T, P)
        WF, WI, bF, bI = v["WF"], v["WI"], v["bF"][0], v["bI"][0]
        losses, grads, cache = [], [], []
        for s in range(steps):
            if inputs is None:
                loss, g, _ = _loss_grad_out(self.model, c, sx, sy)    # (T,), (T, P)
            else:
                loss, g = inputs[0][s], inputs[1][s]
            losses.append(loss)
            grads.append(g)
            if gates is not None:
                f_new = np.full((T, P), gates[0], dt)                  # (T, P)
                i_new = np.full((T, P), gates[1], dt)
                c_new = f_new * c + i_new * (-g)                       # (T, P)
                c, f, i = c_new, f_new, i_new
                continue
            x = np.empty((T, P, 4), dt)                                # (T, P, 4)
            x[:, :, 0:2] = preprocess(loss, p)[:, None, :]
            x[:, :, 2:4] = preprocess(g, p)
            h1, m1, c1 = lstm_cell_forward(x.reshape(B, 4), h1, m1, v["lstm.W"], v["lstm.b"])
            hh = h1.reshape(T, P, H)                                   # (T, P, H)
            f_new = sigmoid(hh @ WF[:H] + WF[H] * c + WF[H + 1] * f + bF)   # (T, P)
            i_new = sigmoid(hh @ WI[:H] + WI[H] * c + WI[H + 1] * i + bI)   # (T, P)
            c_new = f_new * c + i_new * (-g)                           # (T, P)
            if keep:
                cache.append((c, f, i, f_new, i_new, hh, c1))
            c, f, i = c_new, f_new, i_new
        out = {"theta": c, "losses": losses, "grads": grads}
        if keep:
            out["cache"] = cache
        return out

    def adapt(self, phi, sx, sy, steps, gates=None):
        """Checked public forward: -> theta_S (T, P) after `steps` meta-learner updates."""
        self._check("MetaLSTM.adapt", phi, sx, sy, steps=steps)
        return self.unroll(phi, sx, sy, steps, gates=gates)["theta"]

    def objective(self, phi, sx, sy, qx, qy, steps, inputs=None):
        """F(phi) = mean_t L_query_t(theta_S^t) (float); `inputs` as in unroll (stopped)."""
        self._check("MetaLSTM.objective", phi, sx, sy, qx, qy, steps)
        theta = self.unroll(phi, sx, sy, steps, inputs=inputs)["theta"]
        out, _ = self.model.forward(theta, qx, _checked=True)
        return float(LOSSES[self.model.loss_name][0](out, qy)[0].mean())

    # ------------------------------------------------------------------ meta-gradient
    def meta_gradient(self, phi, sx, sy, qx, qy, steps, second_order=False):
        """dF/dphi by the backward recursion of the module docstring.

        second_order False: the paper's gradient (learner's g_s and loss_s as stopped inputs);
        True: the exact gradient of F, with H_{s-1} dg_s through Model.hvp.
        -> dict: grad (Q,), query_loss (T,), query_accuracy (T,) (None without softmax_ce),
           support_loss (T,) (the learner's loss before the first update; None if steps = 0).
        """
        T = self._check("MetaLSTM.meta_gradient", phi, sx, sy, qx, qy, steps)
        model, H, p = self.model, self.H, self.p
        P = model.num_params
        B = T * P
        v = self.views(phi)
        WF, WI, W1 = v["WF"], v["WI"], v["lstm.W"]
        run = self.unroll(phi, sx, sy, steps, keep=True)
        qloss, dc, out = _loss_grad_out(model, run["theta"], qx, qy)   # (T,), (T, P)
        acc = _accuracy(out, qy) if model.loss_name == "softmax_ce" else None
        dc = dc / T                                                    # (T, P) dF/dtheta_S
        grad = np.zeros_like(phi)                                      # (Q,)
        dv = self.views(grad)
        df = np.zeros((T, P), phi.dtype)                               # (T, P) into f_s
        di = np.zeros((T, P), phi.dtype)
        dh1 = np.zeros((B, H), phi.dtype)                              # (B, H) into h_s
        dm1 = None                                                     # (B, H) into m_s
        for s in range(steps - 1, -1, -1):
            c_prev, f_prev, i_prev, f, i, hh, c1 = run["cache"][s]
            g = run["grads"][s]                                        # (T, P)
            df = df + dc * c_prev                                      # c_s = f c + i (-g)
            di = di - dc * g
            dzf = df * f * (1 - f)                                     # (T, P)
            dzi = di * i * (1 - i)
            for dz, Wn, bn, gate_prev in ((dzf, "WF", "bF", f_prev), (dzi, "WI", "bI", i_prev)):
                dv[Wn][:H] += np.einsum("tph,tp->h", hh, dz)
                dv[Wn][H] += np.vdot(dz, c_prev)
                dv[Wn][H + 1] += np.vdot(dz, gate_prev)
                dv[bn][0] += dz.sum()
            dhh = dzf[..., None] * WF[:H] + dzi[..., None] * WI[:H]    # (T, P, H)
            dx, dh1, dm1, dW, db = lstm_cell_backward(dhh.reshape(B, H) + dh1, dm1, c1)
            dv["lstm.W"] += dW
            dv["lstm.b"] += db
            dc_prev = dc * f + dzf * WF[H] + dzi * WI[H]               # (T, P)
            df = dzf * WF[H + 1]                                       # to f_{s-1}
            di = dzi * WI[H + 1]
            if second_order:
                dx = dx.reshape(T, P, 4)                               # (T, P, 4)
                dg = -i * dc + preprocess_backward(dx[:, :, 2:4], g, p)   # (T, P)
                loss = run["losses"][s]                                # (T,)
                dl = preprocess_backward(dx[:, :, 0:2].sum(axis=1), loss, p)   # (T,)
                _, _, hdg = model.hvp(c_prev, sx, sy, dg)              # (T, P)
                dc_prev = dc_prev + hdg + dl[:, None] * g
            dc = dc_prev
        dv["c0"] += dc.sum(axis=0)
        check_loss_grad("MetaLSTM.meta_gradient", qloss, grad)
        return {"grad": grad, "query_loss": qloss, "query_accuracy": acc,
                "support_loss": run["losses"][0] if steps else None}
