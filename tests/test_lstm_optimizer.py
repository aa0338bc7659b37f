"""The coordinatewise LSTM optimizer (Andrychowicz et al. 2016): the hand-written truncated-BPTT
meta-gradient against float64 central differences of the "dropped second derivatives"
surrogate (see metacore/algorithms/lstm_optimizer.py for exactly what is checked), the
quadratic optimizee, the preprocessing, the baselines, and the method through the trainer
(exact resume, evaluation table and plot).

Shape letters: M optimizees, n parameters each, N = M n coordinates, H hidden units, S steps.
"""

import numpy as np
import pytest

from metacore.algorithms import lstm_optimizer as A
from metacore.gradcheck import numerical_gradient, rel_error

from _run_helpers import metrics_without_time as _strip  # noqa: E402  (tests/ on sys.path)
from metacore.tasks.quadratic import Quadratics, quadratic_loss_grad, sample_quadratics

FD_TOL = 1e-7


def _setup(M, n, H, seed, state_scale=0.5, phi_noise=0.3):
    """A random float64 phi (perturbed away from the init so every gate matters), quadratics
    with theta_0 of unit scale (the paper's 0.01 makes the first gradients nearly equal), and
    a random incoming hidden state (an unroll that is not the first)."""
    rng = np.random.default_rng(seed)
    layout = A.lstm_optimizer_layout(H)
    phi = A.init_lstm_optimizer(rng, H) + phi_noise * rng.standard_normal(layout.size)
    q, theta0 = sample_quadratics(rng, M, n)
    theta0 = theta0 + rng.standard_normal(theta0.shape)
    state0 = state_scale * rng.standard_normal((4, M * n, H))
    return layout, phi, q, theta0, state0


def _surrogate(phi, layout, theta0, state0, loss_grad, fixed, **kw):
    return lambda: A.meta_loss(A.unroll(phi, layout, theta0, state0, loss_grad,
                                        fixed.shape[0], fixed_grads=fixed, **kw)["losses"])


# ------------------------------------------------------------------------------ optimizee
def test_quadratic_value_and_gradient():
    rng = np.random.default_rng(0)
    q, _ = sample_quadratics(rng, 3, 5)
    theta = rng.standard_normal((3, 5))
    f, g = q.loss_grad(theta)
    for m in range(3):
        r = q.W[m] @ theta[m] - q.y[m]
        assert f[m] == pytest.approx(r @ r, rel=1e-13)
    for m in range(3):
        num = numerical_gradient(lambda: q.loss(theta)[m], theta)
        assert rel_error(g[m], num[m]) < FD_TOL
        assert np.all(num[np.arange(3) != m] == 0)          # optimizees are independent


def test_sample_quadratics_contract():
    q, th = sample_quadratics(np.random.default_rng(1), 4, 10, np.float32)
    assert q.W.shape == (4, 10, 10) and q.y.shape == (4, 10) and th.shape == (4, 10)
    assert q.W.dtype == q.y.dtype == th.dtype == np.float32
    assert 0.005 < th.std() < 0.02                          # theta_0 ~ N(0, 0.01^2)
    # the draw order is W, y, theta_0 from one generator
    rng = np.random.default_rng(1)
    W = rng.standard_normal((4, 10, 10))
    assert np.array_equal(q.W, W.astype(np.float32))
    with pytest.raises(ValueError, match="sample_quadratics: n must be an int >= 1, got 0"):
        sample_quadratics(np.random.default_rng(0), 0)
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        sample_quadratics(0, 2)
    with pytest.raises(ValueError, match=r"quadratic_loss_grad: y must have shape \(4, 10\)"):
        quadratic_loss_grad(th, q.W, q.y[:, :3])


# ------------------------------------------------------------------------------ preprocessing
def test_preprocess_values_and_continuity():
    p = 10.0
    t = np.exp(-p)
    g = np.array([1.0, -np.exp(-5.0), 1e-6, 0.0, -2e-5, t, np.nextafter(t, 0.0)])
    x = A.preprocess(g, p)
    assert x.shape == (7, 2) and x.dtype == g.dtype
    np.testing.assert_allclose(x[0], [0.0, 1.0], atol=1e-15)
    np.testing.assert_allclose(x[1], [-0.5, -1.0], rtol=1e-14)
    np.testing.assert_allclose(x[2], [-1.0, np.exp(p) * 1e-6], rtol=1e-14)
    np.testing.assert_array_equal(x[3], [-1.0, 0.0])
    np.testing.assert_allclose(x[4], [-1.0, -2e-5 * np.exp(p)], rtol=1e-14)
    # both branches meet at |g| = e^-p: (-1, +1) on either side
    np.testing.assert_allclose(x[5], [-1.0, 1.0], rtol=1e-14)
    np.testing.assert_allclose(x[6], [-1.0, 1.0], rtol=1e-12)
    assert A.preprocess(g.astype(np.float32), p).dtype == np.float32


# ------------------------------------------------------------------------------ meta-gradient
@pytest.mark.parametrize("M, n, H, S", [(2, 3, 3, 4), (1, 1, 1, 1), (3, 2, 4, 3), (1, 4, 2, 2)])
def test_meta_gradient_matches_fd_of_surrogate(M, n, H, S):
    layout, phi, q, theta0, state0 = _setup(M, n, H, seed=M * 100 + n * 10 + S)
    L, dphi, r = A.meta_gradient(phi, layout, theta0, state0, q.loss_grad, S, scale=0.5)
    fixed = r["grads"][:S].copy()                           # the recorded optimizee gradients
    f = _surrogate(phi, layout, theta0, state0, q.loss_grad, fixed, scale=0.5)
    assert f() == L                                          # same trajectory at phi0
    err = rel_error(dphi, numerical_gradient(f, phi))
    assert err < FD_TOL, err
    assert np.abs(dphi).max() > 0


def test_meta_gradient_paper_constants_and_mlp_optimizee():
    """The paper's p = 10 and 0.1 output scale, on a tiny softmax MLP optimizee (a loss with
    curvature of its own, through metacore.network)."""
    from metacore.network import Linear, Model, ReLU
    rng = np.random.default_rng(7)
    model = Model("tiny", [Linear(4, 3), ReLU(), Linear(3, 2)], in_shape=(4,),
                  loss="softmax_ce")
    M, H, S = 2, 3, 4
    x = rng.standard_normal((M, 6, 4))
    y = rng.integers(0, 2, (M, 6))
    theta0 = np.stack([model.init_params(rng) for _ in range(M)])

    def loss_grad(theta):
        return model.loss_and_grad(theta, x, y)
    layout = A.lstm_optimizer_layout(H)
    phi = A.init_lstm_optimizer(rng, H) + 0.3 * rng.standard_normal(layout.size)
    state0 = A.zero_state(theta0.size, H, np.float64)
    L, dphi, r = A.meta_gradient(phi, layout, theta0, state0, loss_grad, S)
    f = _surrogate(phi, layout, theta0, state0, loss_grad, r["grads"][:S].copy())
    assert f() == L
    err = rel_error(dphi, numerical_gradient(f, phi))
    assert err < FD_TOL, err


def test_dropped_second_derivatives_are_really_dropped():
    """The full objective (gradients recomputed along the perturbed trajectory) has a
    different derivative: the check above is about the surrogate, not a coincidence."""
    layout, phi, q, theta0, state0 = _setup(2, 3, 3, seed=234)   # the first FD case above
    S = 4
    L, dphi, _ = A.meta_gradient(phi, layout, theta0, state0, q.loss_grad, S, scale=0.5)
    full = lambda: A.meta_loss(A.unroll(phi, layout, theta0, state0, q.loss_grad, S,   # noqa
                                        scale=0.5)["losses"])
    assert full() == L
    assert rel_error(dphi, numerical_gradient(full, phi)) > 1e-5    # measured 3.1e-3


def test_unrolls_chain_exactly():
    """Two unrolls of 3 carrying theta and the hidden state = one unroll of 6, bit for bit:
    the truncation changes only the gradient, never the optimization."""
    layout, phi, q, theta0, _ = _setup(3, 4, 5, seed=3)
    state0 = A.zero_state(12, 5, np.float64)
    whole = A.unroll(phi, layout, theta0, state0, q.loss_grad, 6)
    a = A.unroll(phi, layout, theta0, state0, q.loss_grad, 3)
    b = A.unroll(phi, layout, a["theta"], a["state"], q.loss_grad, 3)
    assert np.array_equal(whole["theta"], b["theta"])
    assert np.array_equal(whole["state"], b["state"])
    assert np.array_equal(whole["losses"], np.concatenate([a["losses"], b["losses"][1:]]))
    _, _, r = A.meta_gradient(phi, layout, theta0, state0, q.loss_grad, 3)
    assert np.array_equal(r["theta"], a["theta"]) and np.array_equal(r["state"], a["state"])


def test_unroll_bad_input():
    layout, phi, q, theta0, state0 = _setup(2, 3, 3, seed=0)
    with pytest.raises(ValueError, match=r"lstm_optimizer.unroll: phi must have shape"):
        A.unroll(phi[:-1], layout, theta0, state0, q.loss_grad, 2)
    with pytest.raises(ValueError, match=r"state0 must have shape \(4, 6, 3\)"):
        A.unroll(phi, layout, theta0, state0[:, :5], q.loss_grad, 2)
    with pytest.raises(TypeError, match="theta0 has dtype float32, expected float64"):
        A.unroll(phi, layout, theta0.astype(np.float32), state0, q.loss_grad, 2)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        A.meta_gradient(phi, layout, theta0, state0, q.loss_grad, 0)
    with pytest.raises(ValueError, match="hidden must be an int >= 1"):
        A.lstm_optimizer_layout(0)


# ------------------------------------------------------------------------------ baselines
def test_flat_baseline_equals_separate_runs():
    """Every baseline is coordinatewise, so one flat vector of all optimizees is M runs."""
    q, theta0 = sample_quadratics(np.random.default_rng(2), 3, 4)
    for name in ("sgd", "momentum", "adagrad", "adam"):
        together, th = A.run_baseline(name, 0.01, theta0, q.loss_grad, 7)
        for m in range(3):
            qm = Quadratics(q.W[m:m + 1], q.y[m:m + 1])
            alone, thm = A.run_baseline(name, 0.01, theta0[m:m + 1], qm.loss_grad, 7)
            assert np.array_equal(together[:, m], alone[:, 0]), name
            assert np.array_equal(th[m], thm[0]), name


def test_sgd_baseline_is_gradient_descent_and_divergence_is_inf():
    q, theta0 = sample_quadratics(np.random.default_rng(4), 2, 3)
    losses, th = A.run_baseline("sgd", 0.003, theta0, q.loss_grad, 2)
    t = theta0.copy()
    for _ in range(2):
        t = t - 0.003 * q.loss_grad(t)[1]
    np.testing.assert_allclose(th, t, rtol=1e-14)
    losses, _ = A.run_baseline("sgd", 1e3, theta0, q.loss_grad, 200)   # far past 2 / L
    assert np.isinf(losses[-1]).all() and np.isfinite(losses[0]).all()
    best, scores = A.tune_lr("sgd", (1e-4, 1e-2, 1e3), theta0, q.loss_grad, 50)
    assert scores[1e3] == float("inf") and best == 1e-2 and scores[1e-2] < scores[1e-4]


# ------------------------------------------------------------------------------ the method
def _cfg(tmp_path, **over):
    from metacore.training import make_config
    base = dict(meta_batch=3, dims=4, unroll=2, opt_steps=6, hidden=3, eval_tasks=2,
                eval_every=3, log_every=1, ckpt_every=1, iterations=7, seed=5)
    base.update(over)
    return make_config("lstm_optimizer", "quadratic", tmp_path, **base)


def test_resume_mid_optimization_is_bit_identical(tmp_path):
    """Stopped after step 4 (inside the second 6-step optimization: its theta, hidden state and
    quadratics live in the buffers, its position in the state) and resumed to step 7."""
    from metacore.checkpoint import load_checkpoint
    from metacore.training import Trainer
    full = Trainer(_cfg(tmp_path / "full"), progress=False)
    full.train()
    part = Trainer(_cfg(tmp_path / "part", iterations=4), progress=False)
    part.train()
    assert part.method.segment == 1
    resumed = Trainer(_cfg(tmp_path / "part"), resume=True, progress=False)
    assert resumed.method.segment == 1
    resumed.train()
    a, ma = load_checkpoint(tmp_path / "full" / "checkpoint.npz")
    b, mb = load_checkpoint(tmp_path / "part" / "checkpoint.npz")
    assert sorted(a) == sorted(b) and {"buf.theta", "buf.state", "buf.W", "buf.y"} <= set(a)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k
    assert ma["method_state"] == mb["method_state"] and ma["opt"] == mb["opt"]
    # the part run also evaluated at its last step (4), as every run does at its end
    extra = [r for r in _strip(tmp_path / "part" / "metrics.jsonl")
             if not (r["kind"] == "eval" and r["step"] == 4)]
    assert len(extra) == len(_strip(tmp_path / "part" / "metrics.jsonl")) - 1
    assert _strip(tmp_path / "full" / "metrics.jsonl") == extra


def test_training_lowers_validation_loss(tmp_path):
    from metacore.training import Trainer
    cfg = _cfg(tmp_path, meta_batch=16, dims=5, unroll=5, opt_steps=20, hidden=6,
               eval_tasks=16, iterations=80, eval_every=80, log_every=40, ckpt_every=80,
               outer_lr=1e-2, dtype="float64")
    t = Trainer(cfg, progress=False)
    before = t.evaluate_val()["val_final_loss"]
    t.train()
    after = t.evaluate_val()["val_final_loss"]
    assert np.isfinite(after) and after < 0.7 * before, (before, after)


def test_evaluate_table_and_plot(tmp_path):
    from metacore.methods import lstm_optimizer as LM
    from metacore.training import Trainer
    t = Trainer(_cfg(tmp_path, iterations=2), progress=False)
    t.train()
    plot = tmp_path / "curves.png" if _has_matplotlib() else None
    r = t.method.evaluate(t.params, dict(tasks=5, steps=6, seed=11, shots=None, way=None,
                                         bn=None, inner_lr=None, plot=plot and str(plot)))
    assert set(r["rows"]) == {"lstm", "sgd", "momentum", "adagrad", "adam"}
    for name, row in r["rows"].items():
        assert len(row["curve_mean"]) == 7 and np.isfinite(row["final_mean"]), name
        assert row["curve_mean"][-1] == pytest.approx(row["final_mean"])
    for name in LM.BASELINES:
        assert r["tuned_lr"][name] in LM.LR_GRID
        tuning = r["tuning_final_loss"][name]
        assert tuning[str(r["tuned_lr"][name])] == min(tuning.values())
    lstm, adam = r["rows"]["lstm"]["final_mean"], r["rows"]["adam"]["final_mean"]
    assert r["adam_minus_lstm"]["mean"] == pytest.approx(adam - lstm, rel=1e-9, abs=1e-12)
    text = t.method.format_result(r)
    assert "LSTM / tuned Adam" in text and "adagrad" in text
    if plot is not None:
        with open(plot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def test_config_errors(tmp_path):
    from metacore.training import make_config
    with pytest.raises(ValueError, match=r"opt_steps \(7\) must be a multiple of unroll"):
        make_config("lstm_optimizer", "quadratic", tmp_path, opt_steps=7, unroll=2)
    with pytest.raises(ValueError, match="preproc_p must be a finite number > 0"):
        make_config("lstm_optimizer", "quadratic", tmp_path, preproc_p=0)
    with pytest.raises(ValueError, match="train_per_class must be < 20"):
        make_config("lstm_optimizer", "omniglot_mlp", tmp_path, train_per_class=20)
    with pytest.raises(ValueError, match="unknown settings"):
        make_config("lstm_optimizer", "quadratic", tmp_path, n_way=5)


def test_omniglot_mlp_task_one_unroll(tmp_path):
    """The MLP optimizee family: problem shapes, labels, held-out drawings, one unroll and the
    buffer round trip (characters, not images, are stored)."""
    from metacore.methods import lstm_optimizer as LM
    from metacore.training import make_config
    cfg = make_config("lstm_optimizer", "omniglot_mlp", tmp_path, n_way=3,
                      train_per_class=4, mlp_hidden=5, unroll=2, opt_steps=4, hidden=3,
                      eval_tasks=2)
    m = LM.Method(cfg)
    phi = m.init_params(m.rng)
    prob, theta, hstate = m.sample()
    assert prob.x.shape == (1, 12, 28, 28, 1) and prob.xt.shape == (1, 48, 28, 28, 1)
    assert list(prob.y[0]) == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(prob.x[0, 5, :, :, 0], m.source.data.images[prob.chars[0, 1], 1])
    assert np.isin(prob.chars, m.source.pools["train"]).all()
    assert np.isin(m.val[0].chars, m.source.pools["val"]).all()
    assert theta.shape == (1, 784 * 5 + 5 + 5 * 3 + 3) and hstate.shape == (4, theta.size, 3)
    grad, metrics = m.gradient(phi, (prob, theta, hstate))
    assert grad.shape == phi.shape and np.isfinite(grad).all() and m.segment == 1
    m2 = LM.Method(cfg)
    m2.load_buffers(m.buffers())
    assert np.array_equal(m2.prob.x, m.prob.x) and np.array_equal(m2.theta, m.theta)
    acc = prob.test_accuracy(theta)
    assert acc.shape == (1,) and 0 <= acc[0] <= 1


def test_pool_images_block_mean(tmp_path):
    from metacore.methods import lstm_optimizer as LM
    from metacore.training import make_config
    img = np.arange(2 * 1 * 4 * 4, dtype=np.float64).reshape(2, 1, 4, 4)
    out = LM.pool_images(img, 2)
    assert out.shape == (2, 1, 2, 2)
    assert out[1, 0, 0, 1] == img[1, 0, 0:2, 2:4].mean()
    assert LM.pool_images(img, 1) is img
    with pytest.raises(ValueError, match="pool must divide the image size 28, got 3"):
        make_config("lstm_optimizer", "omniglot_mlp", tmp_path, pool=3)
