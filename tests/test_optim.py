"""Tests for metacore.optim: each optimizer against its textbook update written out here as a
scalar loop per coordinate (float64, Python floats, independent of the vectorised code),
Adam's first step, bit-exact resume through state_dict, a quadratic, and bad input.

Shape letters: P number of parameters.
"""
import math

import numpy as np
import pytest

from metacore.optim import SGD, AdaGrad, Adam, Momentum, RMSProp, make_optimizer

SIZES = [1, 7, 13]          # size 1, odd, prime
STEPS = 6


def _grads(seed, size, steps, dtype=np.float64):
    """Random gradients with mixed signs and magnitudes (including a 0 coordinate-step)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((steps, size)) * np.exp(rng.uniform(-3, 3, (steps, size)))
    g[1, 0] = 0.0
    return g.astype(dtype)                                    # (steps, P)


def _assert_close(a, b, rel=1e-15):
    """max|a - b| <= rel * max|b|, elementwise relative to the largest reference entry."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(b).max(), 1e-300)
    err = np.abs(a - b).max() / scale
    assert err <= rel, f"relative error {err:.3e} > {rel:.1e}"


# --- textbook updates, one coordinate at a time -------------------------------------------

def textbook_sgd(theta0, grads, lr):
    theta = [float(x) for x in theta0]
    out = []
    for g in grads:
        for i in range(len(theta)):
            theta[i] = theta[i] - lr * float(g[i])
        out.append(list(theta))
    return out


def textbook_momentum(theta0, grads, lr, mu, nesterov):
    theta = [float(x) for x in theta0]
    vel = [0.0] * len(theta)
    out = []
    for g in grads:
        for i in range(len(theta)):
            gi = float(g[i])
            vel[i] = mu * vel[i] - lr * gi
            if nesterov:
                theta[i] = theta[i] + (mu * vel[i] - lr * gi)
            else:
                theta[i] = theta[i] + vel[i]
        out.append(list(theta))
    return out


def textbook_adagrad(theta0, grads, lr, eps, g0):
    theta = [float(x) for x in theta0]
    acc = [g0] * len(theta)
    out = []
    for g in grads:
        for i in range(len(theta)):
            gi = float(g[i])
            acc[i] = acc[i] + gi * gi
            theta[i] = theta[i] - lr * gi / (math.sqrt(acc[i]) + eps)
        out.append(list(theta))
    return out


def textbook_rmsprop(theta0, grads, lr, rho, eps):
    theta = [float(x) for x in theta0]
    ms = [0.0] * len(theta)
    out = []
    for g in grads:
        for i in range(len(theta)):
            gi = float(g[i])
            ms[i] = rho * ms[i] + (1 - rho) * (gi * gi)
            theta[i] = theta[i] - lr * gi / (math.sqrt(ms[i]) + eps)
        out.append(list(theta))
    return out


def textbook_adam(theta0, grads, lr, b1, b2, eps):
    theta = [float(x) for x in theta0]
    m = [0.0] * len(theta)
    v = [0.0] * len(theta)
    out = []
    for t, g in enumerate(grads, start=1):
        for i in range(len(theta)):
            gi = float(g[i])
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * (gi * gi)
            mhat = m[i] / (1 - b1 ** t)
            vhat = v[i] / (1 - b2 ** t)
            theta[i] = theta[i] - lr * mhat / (math.sqrt(vhat) + eps)
        out.append(list(theta))
    return out


CASES = [
    ("sgd", dict(lr=0.37), lambda th, gs: textbook_sgd(th, gs, 0.37)),
    ("momentum", dict(lr=0.11, momentum=0.83),
     lambda th, gs: textbook_momentum(th, gs, 0.11, 0.83, False)),
    ("nesterov", dict(lr=0.11, momentum=0.83),
     lambda th, gs: textbook_momentum(th, gs, 0.11, 0.83, True)),
    ("adagrad", dict(lr=0.29, eps=1e-10),
     lambda th, gs: textbook_adagrad(th, gs, 0.29, 1e-10, 0.0)),
    ("adagrad", dict(lr=0.29, eps=1e-7, initial_accumulator=0.1),
     lambda th, gs: textbook_adagrad(th, gs, 0.29, 1e-7, 0.1)),
    ("rmsprop", dict(lr=0.021, rho=0.83, eps=1e-6),
     lambda th, gs: textbook_rmsprop(th, gs, 0.021, 0.83, 1e-6)),
    ("rmsprop", dict(lr=1e-4), lambda th, gs: textbook_rmsprop(th, gs, 1e-4, 0.9, 1e-8)),
    ("adam", dict(lr=0.013, beta1=0.87, beta2=0.995, eps=1e-6),
     lambda th, gs: textbook_adam(th, gs, 0.013, 0.87, 0.995, 1e-6)),
    ("adam", dict(), lambda th, gs: textbook_adam(th, gs, 1e-3, 0.9, 0.999, 1e-8)),
]
CASE_IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("name,hyper,textbook", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("size", SIZES)
def test_matches_textbook_float64(name, hyper, textbook, size):
    grads = _grads(size, size, STEPS)                         # (steps, P)
    theta = np.random.default_rng(100 + size).standard_normal(size)
    want = textbook(theta, grads)
    opt = make_optimizer(name, size, np.float64, **hyper)
    for t in range(STEPS):
        opt.step(theta, grads[t])
        _assert_close(theta, want[t], rel=1e-15)


@pytest.mark.parametrize("name,hyper,textbook", CASES, ids=CASE_IDS)
def test_float32_tracks_float64_textbook(name, hyper, textbook):
    """float32 keeps its dtype and follows the float64 textbook to float32 accuracy."""
    size = 13
    grads = _grads(7, size, STEPS, np.float32)                # (steps, P)
    theta = np.random.default_rng(8).standard_normal(size).astype(np.float32)
    want = textbook(theta.astype(np.float64), grads.astype(np.float64))
    opt = make_optimizer(name, size, np.float32, **hyper)
    for t in range(STEPS):
        opt.step(theta, grads[t])
        assert theta.dtype == np.float32
        for arr in opt.state_dict().values():
            if isinstance(arr, np.ndarray):
                assert arr.dtype == np.float32
        # a few float32 roundings per step, accumulated over the steps
        _assert_close(theta, want[t], rel=50 * np.finfo(np.float32).eps)


def test_nesterov_equals_original_lookahead_form():
    """Bengio et al.'s form (stored point = theta + mu*v) against Nesterov's original update
    with the gradient taken at the look-ahead point, on a quadratic f = 0.5 x'Ax - b'x.
    Two different orders of float64 arithmetic, so equal to rounding only."""
    rng = np.random.default_rng(3)
    size, lr, mu = 11, 0.05, 0.9
    a = rng.uniform(0.5, 4.0, size)                           # (P,) diagonal of A
    b = rng.standard_normal(size)                             # (P,)
    grad = lambda x: a * x - b                                # noqa: E731
    theta = rng.standard_normal(size)                         # (P,) original iterate
    vel = np.zeros(size)
    phi = theta.copy()                                        # (P,) look-ahead, stored form
    opt = Momentum(size, np.float64, lr=lr, momentum=mu, nesterov=True)
    for _ in range(25):
        vel = mu * vel - lr * grad(theta + mu * vel)
        theta = theta + vel
        opt.step(phi, grad(phi))
        _assert_close(phi, theta + mu * vel, rel=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adam_first_step_is_lr_times_sign(dtype):
    rng = np.random.default_rng(11)
    size, lr, eps = 17, 0.003, 1e-8
    g = (rng.standard_normal(size) * 10.0 ** rng.uniform(-2, 3, size)).astype(dtype)
    g[3] = 0.0                                                # zero gradient: no move at all
    theta0 = rng.standard_normal(size).astype(dtype)
    theta = theta0.copy()
    Adam(size, dtype, lr=lr, eps=eps).step(theta, g)
    delta = (theta.astype(np.float64) - theta0.astype(np.float64)) / lr
    assert delta[3] == 0.0
    nz = g != 0
    # |step| = lr * |g| / (|g| + eps) <= lr, short of lr by at most eps/|g|;
    # plus float rounding of theta at its own scale.
    slack = np.abs(theta0[nz]).astype(np.float64) * np.finfo(dtype).eps / lr * 2
    dev = np.abs(delta[nz] + np.sign(g[nz]))                  # step is -lr * sign(g)
    assert np.all(dev <= eps / np.abs(g[nz].astype(np.float64)) + slack + 1e-12)


def test_rmsprop_two_steps_by_hand():
    """Two steps on one coordinate, worked out on paper: lr = 0.1, rho = 0.5, eps = 0.25,
    theta0 = 1, g = 2 then -4:
        v1 = 0.5 * 4 = 2,            theta1 = 1 - 0.1 * 2 / (sqrt(2) + 0.25)
        v2 = 0.5 * 2 + 0.5 * 16 = 9, theta2 = theta1 + 0.1 * 4 / (3 + 0.25)."""
    opt = RMSProp(1, np.float64, lr=0.1, rho=0.5, eps=0.25)
    theta = np.array([1.0])
    opt.step(theta, np.array([2.0]))
    theta1 = 1.0 - 0.2 / (math.sqrt(2.0) + 0.25)
    assert opt.mean_sq[0] == 2.0
    _assert_close(theta, [theta1], rel=2e-16)
    opt.step(theta, np.array([-4.0]))
    assert opt.mean_sq[0] == 9.0
    _assert_close(theta, [theta1 + 0.4 / 3.25], rel=2e-16)
    state = opt.state_dict()
    assert set(state) == {"lr", "rho", "eps", "mean_sq"} and state["rho"] == 0.5
    with pytest.raises(ValueError, match="RMSProp: rho must be < 1.0, got 1.0"):
        RMSProp(1, np.float64, lr=0.1, rho=1.0)
    with pytest.raises(TypeError, match="RMSProp.__init__.. missing 1 required keyword"):
        make_optimizer("rmsprop", 1, np.float64)


def test_adam_first_step_independent_of_gradient_scale():
    size = 9
    g = _grads(5, size, 2)[0]                                 # (P,) no zero entries
    scales, eps = (1e-2, 1.0, 1e3), 1e-12
    outs = []
    for scale in scales:
        theta = np.zeros(size)
        Adam(size, np.float64, lr=0.01, eps=eps).step(theta, g * scale)
        outs.append(theta)
    # the only scale dependence is |g| / (|g| + eps): relative effect <= eps / min|g * scale|
    bound = eps / (np.abs(g).min() * min(scales)) + 4e-16
    for out in outs[1:]:
        _assert_close(out, outs[0], rel=bound)


@pytest.mark.parametrize("name,hyper,textbook", CASES, ids=CASE_IDS)
def test_state_dict_resume_is_bit_identical(name, hyper, textbook):
    size = 13
    grads = _grads(21, size, 10)                              # (steps, P)
    theta = np.random.default_rng(22).standard_normal(size)
    full = make_optimizer(name, size, np.float64, **hyper)
    for t in range(4):
        full.step(theta, grads[t])
    state = full.state_dict()
    theta_resume = theta.copy()
    # a fresh optimizer with other hyperparameters: load_state_dict must restore them all
    other = dict(lr=0.5) if name != "adam" else dict(lr=0.5, beta1=0.5, beta2=0.5, eps=1e-3)
    resumed = make_optimizer(name, size, np.float64, **other)
    resumed.load_state_dict(state)
    for t in range(4, 10):
        full.step(theta, grads[t])
        resumed.step(theta_resume, grads[t])
    assert np.array_equal(theta.view(np.uint64), theta_resume.view(np.uint64))
    for key, value in full.state_dict().items():
        got = resumed.state_dict()[key]
        if isinstance(value, np.ndarray):
            assert np.array_equal(value.view(np.uint64), got.view(np.uint64)), key
        else:
            assert type(value) is type(got) and value == got, key


def test_state_dict_is_a_snapshot_and_load_copies():
    opt = Adam(5, np.float64)
    theta = np.zeros(5)
    opt.step(theta, np.ones(5))
    state = opt.state_dict()
    m_before = state["m"].copy()
    opt.step(theta, np.ones(5))
    assert np.array_equal(state["m"], m_before) and state["t"] == 1
    fresh = Adam(5, np.float64)
    fresh.load_state_dict(state)
    state["m"][:] = 123.0                                     # caller's array changes later
    assert np.array_equal(fresh.m, m_before)


def test_state_dict_scalars_are_plain_python():
    for opt in (SGD(3, np.float32, lr=np.float32(0.1)), Momentum(3, np.float64, lr=1),
                AdaGrad(3, np.float64, lr=0.1), RMSProp(3, np.float32, lr=0.1),
                Adam(3, np.float32)):
        for key, value in opt.state_dict().items():
            assert isinstance(value, (np.ndarray, float, int, bool)), key
            if not isinstance(value, np.ndarray):
                assert type(value) in (float, int, bool), (key, type(value))


@pytest.mark.parametrize("name,hyper", [
    ("sgd", dict(lr=0.2)),
    ("momentum", dict(lr=0.05, momentum=0.9)),
    ("nesterov", dict(lr=0.05, momentum=0.9)),
    ("adagrad", dict(lr=1.0)),
    ("adam", dict(lr=0.05)),
])
def test_minimises_quadratic(name, hyper):
    """f(x) = 0.5 sum a_i (x_i - c_i)^2 with curvatures spread over [0.5, 4]."""
    rng = np.random.default_rng(4)
    size = 23
    a = rng.uniform(0.5, 4.0, size)                           # (P,)
    c = rng.standard_normal(size)                             # (P,)
    x = c + rng.standard_normal(size) * 3.0
    f = lambda x: 0.5 * np.sum(a * (x - c) ** 2)             # noqa: E731
    f0 = f(x)
    opt = make_optimizer(name, size, np.float64, **hyper)
    for _ in range(1000):
        opt.step(x, a * (x - c))
    assert f(x) < 1e-10 * f0, f"{name}: f went from {f0:.3e} to {f(x):.3e}"


# --- bad input -----------------------------------------------------------------------------

def test_step_rejects_bad_input():
    opt = Adam(4, np.float64)
    p = np.zeros(4)
    with pytest.raises(ValueError, match=r"Adam.step: grad must have shape \(4\), got \(5,\)"):
        opt.step(p, np.zeros(5))
    with pytest.raises(ValueError, match=r"Adam.step: params must have shape \(4\)"):
        opt.step(np.zeros((4, 1)), np.zeros(4))
    with pytest.raises(TypeError, match="Adam.step: grad has dtype float32, expected float64"):
        opt.step(p, np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="Adam.step: params has dtype float32"):
        opt.step(np.zeros(4, np.float32), np.zeros(4, np.float32))
    with pytest.raises(TypeError, match="Adam.step: grad must be a numpy.ndarray, got list"):
        opt.step(p, [0.0] * 4)
    with pytest.raises(TypeError, match="Adam.step: params must be float32 or float64"):
        opt.step(np.zeros(4, np.int64), np.zeros(4))
    g = np.zeros(4)
    g[2] = np.nan
    with pytest.raises(ValueError, match=r"Adam.step: grad contains 1 non-finite"):
        opt.step(p, g)
    ro = np.zeros(4)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="Adam.step: params must be writeable"):
        opt.step(ro, np.zeros(4))
    with pytest.raises(ValueError, match="Adam.step: params and grad must not share memory"):
        opt.step(p, p)
    # nothing above may have touched the state
    assert opt.t == 0 and not opt.m.any() and not p.any()


@pytest.mark.parametrize("name", ["sgd", "momentum", "adagrad", "rmsprop"])
def test_step_error_names_each_optimizer(name):
    opt = make_optimizer(name, 3, np.float64, lr=0.1)
    with pytest.raises(ValueError, match=rf"{type(opt).__name__}.step: grad contains 1 non-f"):
        opt.step(np.zeros(3), np.array([0.0, np.inf, 1.0]))


def test_constructor_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="SGD: lr must be > 0.0, got 0.0"):
        SGD(3, np.float64, lr=0.0)
    with pytest.raises(ValueError, match="SGD: lr must be finite"):
        SGD(3, np.float64, lr=float("nan"))
    with pytest.raises(TypeError, match="SGD: lr must be a real number, got str"):
        SGD(3, np.float64, lr="0.1")
    with pytest.raises(ValueError, match="Momentum: momentum must be < 1.0, got 1.0"):
        Momentum(3, np.float64, lr=0.1, momentum=1.0)
    with pytest.raises(TypeError, match="Momentum: nesterov must be a bool"):
        Momentum(3, np.float64, lr=0.1, nesterov=1)
    with pytest.raises(ValueError, match="AdaGrad: eps must be > 0.0"):
        AdaGrad(3, np.float64, lr=0.1, eps=0.0)
    with pytest.raises(ValueError, match="AdaGrad: initial_accumulator must be >= 0.0"):
        AdaGrad(3, np.float64, lr=0.1, initial_accumulator=-1.0)
    with pytest.raises(ValueError, match="Adam: beta2 must be >= 0.0, got -0.1"):
        Adam(3, np.float64, beta2=-0.1)
    with pytest.raises(ValueError, match="Adam: size must be a non-negative int, got -1"):
        Adam(-1, np.float64)
    with pytest.raises(ValueError, match="Adam: size must be a non-negative int, got 2.0"):
        Adam(2.0, np.float64)
    with pytest.raises(TypeError, match="Adam: dtype must be float32 or float64, got int32"):
        Adam(3, np.int32)


def test_make_optimizer_rejects_bad_names_and_keywords():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adamw'; expected one of"):
        make_optimizer("adamw", 3, np.float64, lr=0.1)
    with pytest.raises(TypeError, match="SGD.__init__.. missing 1 required keyword-only"):
        make_optimizer("sgd", 3, np.float64)
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentum'"):
        make_optimizer("adam", 3, np.float64, momentum=0.9)
    with pytest.raises(ValueError, match="'nesterov' names the optimizer"):
        make_optimizer("nesterov", 3, np.float64, lr=0.1, nesterov=False)
    assert make_optimizer("NESTEROV", 3, np.float64, lr=0.1).nesterov is True
    assert make_optimizer("momentum", 3, np.float64, lr=0.1).nesterov is False


def test_load_state_dict_rejects_bad_state_and_leaves_optimizer_unchanged():
    opt = Adam(4, np.float64)
    theta = np.zeros(4)
    opt.step(theta, np.arange(4.0))
    before = opt.state_dict()
    good = opt.state_dict()

    def check_unchanged():
        for key, value in opt.state_dict().items():
            assert np.array_equal(value, before[key]), key

    with pytest.raises(ValueError, match=r"missing \['v'\], unexpected \['velocity'\]"):
        opt.load_state_dict({**{k: w for k, w in good.items() if k != "v"},
                             "velocity": np.zeros(4)})
    with pytest.raises(ValueError, match=r"Adam.load_state_dict: v must have shape \(4\)"):
        opt.load_state_dict({**good, "v": np.zeros(5), "t": 7})
    with pytest.raises(TypeError, match="Adam.load_state_dict: m has dtype float32"):
        opt.load_state_dict({**good, "m": np.zeros(4, np.float32)})
    with pytest.raises(ValueError, match="Adam.load_state_dict: t must be a non-negative int"):
        opt.load_state_dict({**good, "t": -1})
    with pytest.raises(ValueError, match="Adam.load_state_dict: t must be a non-negative int"):
        opt.load_state_dict({**good, "t": 1.0})
    with pytest.raises(ValueError, match="Adam.load_state_dict: beta1 must be < 1.0"):
        opt.load_state_dict({**good, "beta1": 1.0})
    with pytest.raises(TypeError, match="Adam.load_state_dict: expected a dict"):
        opt.load_state_dict([("t", 1)])
    check_unchanged()
    sgd_state = SGD(4, np.float64, lr=0.1).state_dict()
    with pytest.raises(ValueError, match="keys do not match 'adam' state"):
        opt.load_state_dict(sgd_state)
    check_unchanged()
