"""The coordinatewise LSTM optimizer of Andrychowicz et al. 2016, "Learning to learn by gradient
descent by gradient descent", with its truncated-BPTT meta-gradient written by hand.

Shape letters (this module):
    M optimizees in a batch        n parameters of one optimizee (theta: (M, n))
    N = M * n coordinates          H hidden units of each LSTM layer (20 in the paper)
    S steps of one unroll          G = 4H gate pre-activations
    P entries of the flat optimizer parameter vector phi

The optimizer m(. ; phi) sees one coordinate at a time (all N coordinates are one LSTM batch,
sharing phi; each keeps its own hidden state). At step t, with gradient g_t = grad f(theta_t):

    x_t = pre(g_t)                                   (N, 2), see preprocess()
    h1_t, c1_t = LSTM1(x_t, h1_{t-1}, c1_{t-1})      (N, H)   layer 1: W1 (2 + H, G), b1 (G,)
    h2_t, c2_t = LSTM2(h1_t, h2_{t-1}, c2_{t-1})     (N, H)   layer 2: W2 (2H, G), b2 (G,)
    u_t = 0.1 (h2_t Wo + bo)                         (N,)     Wo (H, 1), bo (1,)
    theta_{t+1} = theta_t + u_t

Meta-objective of one unroll (Section 2, w_t = 1), averaged over the M optimizees:

    L(phi) = (1/M) sum_m sum_{t=1..S} f_m(theta_{m,t})

Dropped second derivatives (Section 2.1, the dashed edges of Figure 2): g_t is treated as an
input that does not depend on phi, although it does through theta_t. Then theta_s =
theta_0 + sum_{r<s} u_r, and f_m(theta_s) reaches phi only through the u_r, so

    dL/du_t = (1/M) sum_{s=t+1..S} grad f(theta_s)   (a reverse cumulative sum; the gradients
                                                       at theta_1..theta_S are computed in the
                                                       forward pass anyway, plus one at theta_S)

and the rest is ordinary backpropagation through a two-layer LSTM over the S recorded inputs
x_0..x_{S-1}, with zero gradient on the final hidden state (truncation) and the initial state
and theta_0 taken as constants (they come from the previous unroll).

What the finite-difference check checks (tests/test_lstm_optimizer.py): meta_gradient()
returns exactly the gradient at phi0 of the SURROGATE

    L~(phi) = (1/M) sum_m sum_{t=1..S} f_m(theta~_{m,t}(phi)),  where theta~ runs the same
              recursion but the LSTM reads the FIXED gradients g_0..g_{S-1} recorded at phi0
              (unroll(..., fixed_grads=recorded)) instead of grad f(theta~_t),

because L~ and L agree at phi0 along with every derivative except the dropped terms. The test
takes central differences of L~ in float64 (so it checks the hand backward, the output layer,
both LSTM layers and the reverse cumulative sum), and separately shows that the FULL objective
L (gradients recomputed along the perturbed trajectory) has a different derivative, i.e. that
the dropped terms are really dropped and not silently present.
"""
import numbers

import numpy as np

from metacore.layers.lstm import lstm_cell_backward, lstm_cell_forward, lstm_init
from metacore.nonfinite import check_loss_grad
from metacore.params import ParamLayout
from metacore.validate import check_float_array

HIDDEN = 20          # units per LSTM layer (paper)
PREPROC_P = 10.0     # p of the gradient preprocessing (paper, Appendix A)
OUT_SCALE = 0.1      # the output of the LSTM is multiplied by 0.1 (paper, Section 3)


def lstm_optimizer_layout(hidden=HIDDEN):
    """ParamLayout of phi: W1 (2 + H, G), b1 (G,), W2 (2H, G), b2 (G,), Wo (H, 1), bo (1,)."""
    if isinstance(hidden, bool) or not isinstance(hidden, numbers.Integral) or hidden < 1:
        raise ValueError(f"lstm_optimizer_layout: hidden must be an int >= 1, got {hidden!r}")
    H = int(hidden)
    return ParamLayout([("W1", (2 + H, 4 * H)), ("b1", (4 * H,)),
                        ("W2", (2 * H, 4 * H)), ("b2", (4 * H,)),
                        ("Wo", (H, 1)), ("bo", (1,))])


def init_lstm_optimizer(rng, hidden=HIDDEN, dtype=np.float64):
    """phi: (P,). Both LSTM layers from metacore.layers.lstm.lstm_init (uniform +-1/sqrt(H),
    forget bias 1); Wo uniform +-1/sqrt(H), bo = 0. Draw order: layer 1, layer 2, Wo."""
    layout = lstm_optimizer_layout(hidden)
    H = int(hidden)
    phi = np.zeros(layout.size, np.dtype(dtype))                       # (P,)
    v = views(layout, phi)
    v["W1"][...], v["b1"][...] = lstm_init(rng, 2, H, dtype)
    v["W2"][...], v["b2"][...] = lstm_init(rng, H, H, dtype)
    a = 1.0 / np.sqrt(H)
    v["Wo"][...] = rng.uniform(-a, a, (H, 1))
    return phi


def views(layout, phi):
    """phi: (P,) -> {name: view}; writing a view writes phi."""
    return {k: a[0] for k, a in layout.views(phi[None]).items()}


def zero_state(n_coords, hidden, dtype):
    """The hidden state of every coordinate at the start of an optimization: (4, N, H) zeros,
    stacked as (h1, c1, h2, c2)."""
    return np.zeros((4, n_coords, hidden), np.dtype(dtype))


def preprocess(g, p=PREPROC_P):
    """Andrychowicz et al. 2016, Appendix A: each gradient coordinate becomes two inputs,
        (log|g| / p, sign g)   if |g| >= e^-p
        (-1, e^p g)            otherwise
    (continuous in the first entry at |g| = e^-p). g: (N,) -> x: (N, 2), g's dtype.
    No backward: the gradient is an input that the meta-gradient treats as constant."""
    a = np.abs(g)                                                       # (N,)
    big = a >= np.exp(-p)
    x = np.empty(g.shape + (2,), g.dtype)                              # (N, 2)
    x[:, 0] = np.where(big, np.log(np.where(big, a, 1.0)) / p, -1.0)
    x[:, 1] = np.where(big, np.sign(g), np.exp(p) * g)
    return x


def _check_inputs(op, phi, layout, theta0, state0):
    check_float_array(op, "phi", phi, shape=(layout.size,))
    check_float_array(op, "theta0", theta0, ndim=2, dtype=phi.dtype)
    H = layout.shapes[layout.names.index("Wo")][0]
    check_float_array(op, "state0", state0, shape=(4, theta0.size, H), dtype=phi.dtype)


def unroll(phi, layout, theta0, state0, loss_grad, steps, *, p=PREPROC_P, scale=OUT_SCALE,
           fixed_grads=None, keep_caches=False):
    """Run the learned optimizer for `steps` steps from theta0 and the hidden state state0.

    phi: (P,); theta0: (M, n); state0: (4, N, H); loss_grad(theta (M, n)) -> (f (M,),
    grad (M, n)). fixed_grads: (steps, M, n) or None; if given, the LSTM reads fixed_grads[t]
    at step t instead of grad f(theta_t) (the surrogate of the module docstring).
    -> dict(losses (steps + 1, M) = f(theta_0..theta_S), grads (steps + 1, M, n) = grad f
    at the same points, theta (M, n) = theta_S, state (4, N, H) = the state after step S,
    and with keep_caches the per-step LSTM caches and h2 outputs for meta_gradient()).
    Non-finite values are not checked here (a divergent optimizer is reported by the caller)."""
    op = "lstm_optimizer.unroll"
    _check_inputs(op, phi, layout, theta0, state0)
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"{op}: steps must be an int >= 0, got {steps!r}")
    if fixed_grads is not None:
        check_float_array(op, "fixed_grads", fixed_grads, shape=(steps,) + theta0.shape,
                          dtype=phi.dtype)
    v = views(layout, phi)
    W1, b1, W2, b2, Wo, bo = (v[k] for k in ("W1", "b1", "W2", "b2", "Wo", "bo"))
    M, n = theta0.shape
    theta = theta0.copy()                                               # (M, n)
    h1, c1, h2, c2 = (s.copy() for s in state0)                         # each (N, H)
    losses = np.empty((steps + 1, M), phi.dtype)                        # (S + 1, M)
    grads = np.empty((steps + 1, M, n), phi.dtype)                      # (S + 1, M, n)
    caches1, caches2, hs2 = [], [], []
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps + 1):
            f, g = loss_grad(theta)
            losses[t], grads[t] = f, g
            if t == steps:
                break
            x = preprocess((g if fixed_grads is None else fixed_grads[t]).reshape(-1), p)
            h1, c1, cache1 = lstm_cell_forward(x, h1, c1, W1, b1)      # (N, H)
            h2, c2, cache2 = lstm_cell_forward(h1, h2, c2, W2, b2)     # (N, H)
            u = scale * (h2 @ Wo + bo)                                  # (N, 1)
            theta = theta + u.reshape(M, n)
            if keep_caches:
                caches1.append(cache1)
                caches2.append(cache2)
                hs2.append(h2)
    out = dict(losses=losses, grads=grads, theta=theta, state=np.stack([h1, c1, h2, c2]))
    if keep_caches:
        out.update(caches1=caches1, caches2=caches2, hs2=hs2)
    return out


def meta_loss(losses):
    """(S + 1, M) losses of an unroll -> L = (1/M) sum_m sum_{t=1..S} f_m(theta_t)."""
    return float(losses[1:].sum(axis=0).mean())


def meta_gradient(phi, layout, theta0, state0, loss_grad, steps, *, p=PREPROC_P,
                  scale=OUT_SCALE):
    """One truncated unroll and its meta-gradient with the optimizee's second derivatives
    dropped (module docstring). phi: (P,), theta0: (M, n), state0: (4, N, H), steps = S >= 1.
    -> (L float, dphi (P,) fresh, the unroll's dict (losses, grads, theta, state))."""
    op = "lstm_optimizer.meta_gradient"
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"{op}: steps must be an int >= 1, got {steps!r}")
    r = unroll(phi, layout, theta0, state0, loss_grad, steps, p=p, scale=scale,
               keep_caches=True)
    M = theta0.shape[0]
    S = steps
    # dL/dtheta_s through f only, s = 1..S; du_t = sum_{s > t} of those (reverse cumsum)
    G = (r["grads"][1:] / M).reshape(S, -1)                             # (S, N)
    du = np.cumsum(G[::-1], axis=0)[::-1]                               # (S, N)
    v = views(layout, phi)
    Wo = v["Wo"]                                                        # (H, 1)
    d = {k: np.zeros_like(a) for k, a in v.items()}
    hs2 = np.stack(r["hs2"])                                            # (S, N, H)
    d["Wo"][:, 0] = scale * np.einsum("snh,sn->h", hs2, du)
    d["bo"][0] = scale * du.sum()
    dh1n = dc1n = dh2n = dc2n = None                                    # from step t + 1
    for t in range(S - 1, -1, -1):
        dh2 = scale * du[t][:, None] * Wo[:, 0][None, :]                # (N, H)
        if dh2n is not None:
            dh2 += dh2n
        dx2, dh2n, dc2n, dW, db = lstm_cell_backward(dh2, dc2n, r["caches2"][t])
        d["W2"] += dW
        d["b2"] += db
        dh1 = dx2 if dh1n is None else dx2 + dh1n                       # (N, H)
        _, dh1n, dc1n, dW, db = lstm_cell_backward(dh1, dc1n, r["caches1"][t])
        d["W1"] += dW
        d["b1"] += db
    dphi = np.empty_like(phi)                                           # (P,)
    for k, a in views(layout, dphi).items():
        a[...] = d[k]
    for k in ("caches1", "caches2", "hs2"):
        del r[k]
    check_loss_grad("lstm_optimizer.meta_gradient", r["losses"], dphi)
    return meta_loss(r["losses"]), dphi, r


# ------------------------------------------------------------------------------ evaluation
def run_learned(phi, layout, theta0, loss_grad, steps, *, p=PREPROC_P, scale=OUT_SCALE,
                state0=None):
    """The learned optimizer from theta0 for `steps` steps, no truncation: the hidden state is
    carried through all steps. -> (losses (steps + 1, M), theta_S (M, n)); a non-finite loss
    (divergence) is reported as inf from its step on."""
    if state0 is None:
        H = layout.shapes[layout.names.index("Wo")][0]
        state0 = zero_state(theta0.size, H, phi.dtype)
    r = unroll(phi, layout, theta0, state0, _finite_or_stop(loss_grad), steps, p=p,
               scale=scale)
    return _inf_after_divergence(r["losses"]), r["theta"]


def run_baseline(name, lr, theta0, loss_grad, steps):
    """A hand-designed optimizer of metacore.optim (sgd, momentum (mu = 0.9), adagrad, adam
    with the paper defaults besides lr) on every optimizee at once: these optimizers act on
    each coordinate separately, so one flat (N,) vector of all optimizees is the same as M
    separate runs. -> (losses (steps + 1, M), theta_S (M, n)), inf after divergence."""
    from metacore.optim import make_optimizer
    theta = theta0.astype(theta0.dtype, copy=True)                      # (M, n)
    flat = theta.reshape(-1)                                            # (N,) view
    opt = make_optimizer(name, flat.size, theta.dtype, lr=lr)
    losses = np.empty((steps + 1, theta.shape[0]), theta.dtype)         # (S + 1, M)
    lg = _finite_or_stop(loss_grad)
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(steps + 1):
            f, g = lg(theta)
            losses[t] = f
            if t == steps:
                break
            opt.step(flat, np.ascontiguousarray(g).reshape(-1), check=False)
    return _inf_after_divergence(losses), theta


def _finite_or_stop(loss_grad):
    """Wrap loss_grad so that a diverged optimizee (non-finite theta, loss or gradient) gets a
    zero gradient and an inf loss instead of feeding NaN/inf to the next update."""
    def lg(theta):
        ok = np.isfinite(theta).all(axis=1)                             # (M,)
        safe = theta if ok.all() else np.where(ok[:, None], theta, 0.0).astype(theta.dtype)
        f, g = loss_grad(safe)
        ok &= np.isfinite(f) & np.isfinite(g).all(axis=1)
        if ok.all():
            return f, g
        f = np.where(ok, f, np.inf).astype(f.dtype)
        g = np.where(ok[:, None], g, 0.0).astype(g.dtype)
        return f, g
    return lg


def _inf_after_divergence(losses):
    bad = ~np.isfinite(losses)                                          # (S + 1, M)
    bad = np.logical_or.accumulate(bad, axis=0)
    out = losses.astype(np.float64)
    out[bad] = np.inf
    return out


def tune_lr(name, grid, theta0, loss_grad, steps):
    """The rate of `grid` with the lowest mean loss at step `steps` on the tuning optimizees
    (ties: the smaller rate). -> (best lr, {lr: mean final loss})."""
    scores = {}
    for lr in grid:
        losses, _ = run_baseline(name, float(lr), theta0, loss_grad, steps)
        final = losses[-1]
        scores[float(lr)] = float(final.mean()) if np.isfinite(final).all() else float("inf")
    best = min(scores, key=lambda k: (scores[k], k))
    return best, scores

