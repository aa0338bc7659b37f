"""The LSTM meta-learner (Ravi & Larochelle 2017), metacore.algorithms.meta_lstm and the
`metalstm` method.

What the finite-difference tests check, exactly:
  first order   F_stop(phi) = mean_t L_query_t(theta_S^t(phi)) where the learner's gradients
                g_1..g_S and losses loss_1..loss_S are recorded once at the base point phi_0
                and then held fixed (MetaLSTM.objective(..., inputs=recorded)); its central
                differences at phi_0 equal the paper's meta-gradient (dependence of g_s,
                loss_s on theta_{s-1} dropped), which is what meta_gradient returns.
  second order  the true F(phi), g_s and loss_s recomputed at every perturbed phi, against
                meta_gradient(second_order=True).
Both on a tiny conv4_maml (8x8 images, 3 channels, BN in batch mode), float64, every
meta-parameter block (c0, first-layer LSTM W and b, W_F, b_F, W_I, b_I).
"""
import math

import numpy as np
import pytest

from metacore.algorithms.maml import adapt, maml_gradient
from metacore.algorithms.meta_lstm import MetaLSTM, preprocess, preprocess_backward
from metacore.gradcheck import numerical_gradient, numerical_gradient_at, rel_error
from metacore.layers.lstm import sigmoid
from metacore.models import conv4_maml


def _tiny(p=10.0, T=2, seed=0):
    """A tiny learner and meta-learner with non-trivial gates (weights N(0, 0.5), so the
    first layer, theta and the previous gates all move the gates), T episodes."""
    rng = np.random.default_rng(seed)
    model = conv4_maml(n_way=3, image_shape=(8, 8, 1), channels=3)
    ml = MetaLSTM(model, hidden=4, p=p)
    phi = ml.init_params(rng, np.float64)
    v = ml.views(phi)
    for k in ("lstm.W", "lstm.b", "WF", "WI"):
        v[k][...] = rng.normal(0, 0.5, v[k].shape)
    v["bF"][...], v["bI"][...] = 1.0, -1.0
    sx = rng.random((T, 3, 8, 8, 1))
    sy = np.tile(np.arange(3), (T, 1))
    qx = rng.random((T, 6, 8, 8, 1))
    qy = np.tile(np.arange(3), (T, 2))
    return rng, model, ml, phi, (sx, sy, qx, qy)


def _indices(ml, rng, per_block=12):
    """Every entry of the small blocks, a random sample of the large ones."""
    idx = []
    for name in ml.layout.names:
        sl = ml.layout.slice(name)
        n = sl.stop - sl.start
        pick = np.arange(n) if n <= per_block else rng.choice(n, per_block, replace=False)
        idx += [sl.start + int(i) for i in pick]
    return idx


# ----------------------------------------------------------------------- preprocessing
def test_preprocess_values_continuity_and_backward():
    p = 10.0
    x = np.array([2.0, -0.5, 1e-3, -1e-6, 0.0, math.exp(-p), -math.exp(-p)])
    out = preprocess(x, p)
    assert out.shape == (7, 2) and out.dtype == np.float64
    np.testing.assert_allclose(out[:3, 0], np.log(np.abs(x[:3])) / p, rtol=1e-15)
    np.testing.assert_array_equal(out[:3, 1], [1.0, -1.0, 1.0])
    np.testing.assert_array_equal(out[3:5, 0], [-1.0, -1.0])
    np.testing.assert_allclose(out[3:5, 1], math.exp(p) * x[3:5], rtol=1e-15)
    # continuous where the two branches meet, |x| = e^-p: (-1, +-1) from both sides
    for edge in (math.exp(-p), -math.exp(-p)):
        inside = preprocess(np.array([edge * (1 - 1e-12)]), p)[0]
        np.testing.assert_allclose(inside, preprocess(np.array([edge]), p)[0], atol=1e-10)
    # backward against central differences, both branches, away from the switch
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, 6), rng.normal(0, 1e-5, 6)])
    x = x[np.abs(np.abs(x) - math.exp(-p)) > 1e-6]
    dy = rng.normal(size=x.shape + (2,))
    num = numerical_gradient(lambda: float((preprocess(x, p) * dy).sum()), x, h=1e-9)
    assert rel_error(preprocess_backward(dy, x, p), num) < 1e-7
    assert preprocess(x.astype(np.float32), p).dtype == np.float32


# ----------------------------------------------------------------------- meta-gradient
def test_first_order_meta_gradient_matches_finite_differences_with_stopped_inputs():
    rng, _, ml, phi, (sx, sy, qx, qy) = _tiny()
    S = 3
    r = ml.meta_gradient(phi, sx, sy, qx, qy, S)
    rec = ml.unroll(phi, sx, sy, S)
    inputs = (rec["losses"], rec["grads"])                 # recorded at phi, then held fixed
    assert ml.objective(phi, sx, sy, qx, qy, S, inputs) == ml.objective(phi, sx, sy, qx, qy, S)
    assert r["query_loss"].mean() == pytest.approx(ml.objective(phi, sx, sy, qx, qy, S),
                                                   rel=1e-14)
    idx = _indices(ml, rng)
    num = numerical_gradient_at(lambda: ml.objective(phi, sx, sy, qx, qy, S, inputs), phi,
                                idx, h=1e-6)
    for name in ml.layout.names:                          # every block carries signal
        sl = ml.layout.slice(name)
        sel = [j for j, i in enumerate(idx) if sl.start <= i < sl.stop]
        assert np.abs(num[sel]).max() > 1e-4, name
        assert rel_error(r["grad"][np.array(idx)[sel]], num[sel]) < 1e-7, name


def test_second_order_meta_gradient_matches_finite_differences_of_the_true_objective():
    """p = 3 here: the curvature of log|g|/p is 1/(p g^2), about e^(2p)/p just above the
    switch |g| = e^-p, so with p = 10 gradient entries near 1e-4 make central differences
    inaccurate (error ~ h^2 f''', seen shrinking 200x from h = 1e-5 to 1e-6); p = 3 keeps
    the same formulas in a well-conditioned range. The exact second-order terms are large
    here: the first-order gradient differs from the exact one."""
    rng, _, ml, phi, (sx, sy, qx, qy) = _tiny(p=3.0)
    S = 3
    r2 = ml.meta_gradient(phi, sx, sy, qx, qy, S, second_order=True)
    r1 = ml.meta_gradient(phi, sx, sy, qx, qy, S)
    idx = _indices(ml, rng, per_block=10)
    num = numerical_gradient_at(lambda: ml.objective(phi, sx, sy, qx, qy, S), phi, idx, h=1e-6)
    assert rel_error(r2["grad"][idx], num) < 1e-7
    assert rel_error(r1["grad"][idx], num) > 1e-2         # the dropped terms do matter here
    np.testing.assert_array_equal(r1["query_loss"], r2["query_loss"])


# ----------------------------------------------------------------------- seed's identity
def _identity_point(ml, phi, alpha):
    """W_F = W_I = 0, b_F = 40 (sigmoid(40) == 1.0 in float64), b_I = logit(alpha): the
    learned gate path then computes f = 1 and i = sigmoid(b_I) exactly; the first layer
    keeps its random weights (its output is ignored by the zero gate weights)."""
    v = ml.views(phi)
    v["WF"][...], v["WI"][...] = 0.0, 0.0
    v["bF"][...], v["bI"][...] = 40.0, math.log(alpha / (1 - alpha))
    rate = float(sigmoid(v["bI"].copy())[0])
    assert float(sigmoid(v["bF"].copy())[0]) == 1.0 and rate == pytest.approx(alpha, rel=1e-14)
    return rate


def test_seed_identity_forget_one_input_alpha_is_sgd():
    _, model, ml, phi, (sx, sy, qx, qy) = _tiny()
    S, alpha = 4, 0.3
    c0 = ml.views(phi)["c0"].copy()
    theta = np.repeat(c0[None], sx.shape[0], axis=0)       # plain SGD loop, (T, P)
    for _ in range(S):
        theta = theta - alpha * model.loss_and_grad(theta, sx, sy)[1]
    fixed = ml.adapt(phi, sx, sy, S, gates=(1.0, alpha))
    np.testing.assert_array_equal(fixed, theta)            # bit for bit
    np.testing.assert_array_equal(fixed, adapt(model, c0, sx, sy, alpha, S)[-1])
    # the learned gates at the identity point: the same rule through the real gate path
    rate = _identity_point(ml, phi, alpha)
    learned = ml.adapt(phi, sx, sy, S)
    np.testing.assert_array_equal(learned, adapt(model, c0, sx, sy, rate, S)[-1])
    assert rel_error(learned, theta) < 1e-13               # rate = alpha to 1e-14


@pytest.mark.parametrize("second_order", [False, True])
def test_seed_identity_meta_gradient_of_c0_is_maml(second_order):
    """At the identity point dF/dc0 is first-order MAML's gradient (paper's meta-gradient)
    or exact second-order MAML's (second_order=True) with rate alpha and S steps."""
    _, model, ml, phi, (sx, sy, qx, qy) = _tiny()
    S, alpha = 3, 0.2
    rate = _identity_point(ml, phi, alpha)
    r = ml.meta_gradient(phi, sx, sy, qx, qy, S, second_order=second_order)
    ref = maml_gradient(model, ml.views(phi)["c0"].copy(), sx, sy, qx, qy, rate, steps=S,
                        first_order=not second_order)
    sl = ml.layout.slice("c0")
    assert rel_error(r["grad"][sl], ref.grad) < 1e-13
    np.testing.assert_allclose(r["query_loss"], ref.query_loss, rtol=1e-13)
    np.testing.assert_allclose(r["support_loss"], ref.support_loss, rtol=1e-13)


# ----------------------------------------------------------------------- input checks
def test_input_checks():
    _, model, ml, phi, (sx, sy, qx, qy) = _tiny()
    with pytest.raises(ValueError, match="phi must have shape"):
        ml.meta_gradient(phi[:-1], sx, sy, qx, qy, 2)
    with pytest.raises(TypeError, match="dtype float32, expected float64"):
        ml.adapt(phi, sx.astype(np.float32), sy, 2)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        ml.adapt(phi, sx, sy, -1)
    with pytest.raises(ValueError, match="hidden must be a positive int"):
        MetaLSTM(model, hidden=0)
    with pytest.raises(ValueError, match="p must be a finite number > 0"):
        MetaLSTM(model, p=0.0)
    bad = phi.copy()
    bad[0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        ml.adapt(bad, sx, sy, 1)


# ----------------------------------------------------------------------- the method
def _cfg(tmp_path, **over):
    from metacore.training import make_config
    small = dict(iterations=4, eval_every=4, eval_tasks=2, log_every=2, ckpt_every=2,
                 inner_steps=2, hidden=3, channels=3, queries=2, seed=5)
    small.update(over)
    return make_config("metalstm", "omniglot", tmp_path, **small)


def test_method_trains_resumes_bit_identically_and_evaluates(tmp_path):
    import json

    from metacore.training import Trainer
    full = Trainer(_cfg(tmp_path / "full"), progress=False)
    start = full.params.copy()
    full.train()
    part = Trainer(_cfg(tmp_path / "part", iterations=2), progress=False)
    part.train()
    resumed = Trainer(_cfg(tmp_path / "part"), resume=True, progress=False)
    assert resumed.step == 2
    resumed.train()
    assert resumed.params.tobytes() == full.params.tobytes()
    assert not np.array_equal(start, full.params)
    with open(tmp_path / "full" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["query_accuracy"] <= 1 for r in train)
    ev = [r for r in recs if r["kind"] == "eval"][-1]
    assert 0 <= ev["val_accuracy"] <= 1 and np.isfinite(ev["val_loss"])
    m = full.method
    opts = dict(tasks=13, steps=None, shots=None, way=None, seed=3, bn=None, inner_lr=None)
    r = m.evaluate(full.params, opts)
    assert r["episodes"] == 13 and r["steps"] == 2 and r["update"] == "meta-lstm"
    assert 0 <= r["accuracy_mean"] <= 1 and r["accuracy_ci95"] > 0
    assert r == m.evaluate(full.params, opts)              # seeded: the same episodes
    assert "13 test episodes" in m.format_result(r)
    sgd = m.evaluate(full.params, dict(opts, inner_lr=0.0, steps=0))
    zero = m.evaluate(full.params, dict(opts, steps=0))    # no update: c0 either way
    assert sgd["accuracy_mean"] == zero["accuracy_mean"] and sgd["update"] == "sgd lr=0.0"
    with pytest.raises(ValueError, match="way must be the run's n_way"):
        m.evaluate(full.params, dict(opts, way=7))
    with pytest.raises(ValueError, match="keeps no running"):
        m.evaluate(full.params, dict(opts, bn="running"))


def test_gradient_clipping_and_config_checks(tmp_path):
    from metacore.training import build_method
    cfg = _cfg(tmp_path, clip_norm=1e-6)
    m = build_method(cfg)
    params = m.init_params(m.rng)
    grad, metrics = m.gradient(params, m.sample())
    assert metrics["grad_norm"] > 1e-6
    assert np.sqrt(np.vdot(grad, grad)) == pytest.approx(1e-6, rel=1e-5)
    assert _cfg(tmp_path)["inner_steps"] == 2
    from metacore.training import make_config
    assert make_config("metalstm", "omniglot", tmp_path)["inner_steps"] == 15
    assert make_config("metalstm", "omniglot", tmp_path, shots=5)["inner_steps"] == 5
    with pytest.raises(ValueError, match="shots \\+ queries must be <= 20"):
        _cfg(tmp_path, shots=6, queries=15)
    with pytest.raises(ValueError, match="second_order must be true or false"):
        _cfg(tmp_path, second_order="yes")
    with pytest.raises(ValueError, match="clip_norm must be a finite number"):
        _cfg(tmp_path, clip_norm=-1.0)
