"""MAML / first-order MAML / Meta-SGD meta-gradients against float64 central finite
differences of the meta-objective, a closed-form linear model, and the relations of
Nichol et al. 2018 built from independent Model.loss_and_grad / Model.hvp calls.

Shape letters: T tasks, N points per task, P parameters.
"""
import numpy as np
import pytest

from metacore.algorithms import adapt, fomaml_gradient, maml_gradient, meta_objective
from metacore.gradcheck import numerical_gradient, rel_error
from metacore.models import bn_mlp, conv4_maml, sinusoid_mlp
from metacore.network import Linear, Model
from metacore.tasks import sample_sinusoid

TOL = 1e-6


def _sinusoid_case(rng, T=3, n_s=5, n_q=7):
    model = sinusoid_mlp(hidden=(7, 5))
    theta = model.init_params(rng, np.float64)
    theta += 0.3 * rng.standard_normal(theta.shape)   # away from the tiny init: H clearly != 0
    tasks = sample_sinusoid(rng, T, n_s + n_q, np.float64)
    sx, sy, qx, qy = tasks.split(n_s)
    return model, theta, (sx, sy, qx, qy), 0.05


def _bn_mlp_case(rng, T=3, n_way=3, n_s=4, n_q=5):
    model = bn_mlp(n_way=n_way, in_features=6, hidden=(5, 4))
    theta = model.init_params(rng, np.float64)
    sx, qx = rng.standard_normal((T, n_s, 6)), rng.standard_normal((T, n_q, 6))
    sy, qy = rng.integers(0, n_way, (T, n_s)), rng.integers(0, n_way, (T, n_q))
    return model, theta, (sx, sy, qx, qy), 0.4


def _conv4_case(rng, T=2, n_way=3, n_s=3, n_q=4):
    model = conv4_maml(n_way=n_way, image_shape=(8, 8, 1), channels=2, depth=4)
    theta = model.init_params(rng, np.float64)
    sx, qx = rng.random((T, n_s, 8, 8, 1)), rng.random((T, n_q, 8, 8, 1))
    sy, qy = rng.integers(0, n_way, (T, n_s)), rng.integers(0, n_way, (T, n_q))
    return model, theta, (sx, sy, qx, qy), 0.4


CASES = {"sinusoid_mlp": _sinusoid_case, "bn_mlp": _bn_mlp_case, "conv4": _conv4_case}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_meta_gradient_matches_finite_differences(case, k):
    rng = np.random.default_rng(10 * k + len(case))
    model, theta, data, alpha = CASES[case](rng)
    res = maml_gradient(model, theta, *data, alpha, steps=k)
    num = numerical_gradient(lambda: meta_objective(model, theta, *data, alpha, k), theta)
    err = rel_error(res.grad, num)
    assert err <= TOL, f"{case} k={k}: rel_error {err:.2e}"
    assert np.isclose(res.query_loss.mean(), meta_objective(model, theta, *data, alpha, k),
                      rtol=1e-14, atol=0)
    # d F / d alpha for the scalar rate
    a = np.array([alpha])
    num_a = numerical_gradient(lambda: meta_objective(model, theta, *data, a[0], k), a)
    err = rel_error(np.array([res.alpha_grad]), num_a)
    assert err <= TOL, f"{case} k={k}: alpha rel_error {err:.2e}"


@pytest.mark.parametrize("case, k", [("sinusoid_mlp", 1), ("sinusoid_mlp", 3), ("bn_mlp", 2),
                                     ("conv4", 1)])
def test_meta_sgd_alpha_gradient_matches_finite_differences(case, k):
    rng = np.random.default_rng(7 + k)
    model, theta, data, alpha = CASES[case](rng)
    alpha_vec = alpha * rng.uniform(0.5, 1.5, model.num_params)      # (P,) Meta-SGD rates
    res = maml_gradient(model, theta, *data, alpha_vec, steps=k)
    assert res.alpha_grad.shape == (model.num_params,)
    f = lambda: meta_objective(model, theta, *data, alpha_vec, k)    # noqa: E731
    err_a = rel_error(res.alpha_grad, numerical_gradient(f, alpha_vec))
    err_t = rel_error(res.grad, numerical_gradient(f, theta))
    assert err_a <= TOL and err_t <= TOL, (err_a, err_t)


def _linear_phi(x):
    """Features (x, 1) of the 1-in 1-out linear model y = w x + b: (T, N, 1) -> (T, N, 2)."""
    return np.concatenate([x, np.ones_like(x)], axis=-1)


@pytest.mark.parametrize("k", [1, 2])
def test_closed_form_linear_model(k):
    """y = w x + b with MSE: L(th) = |Phi th - y|^2 / N, g = 2 Phi^T (Phi th - y) / N,
    H = 2 Phi^T Phi / N (constant). Written out: th_{i+1} = th_i - alpha g_s(th_i) and
    dF/dth = mean_t (I - alpha H_s)^k g_q(th_k). Theta layout: [w, b]."""
    rng = np.random.default_rng(3)
    model = Model("linear", [Linear(1, 1)], in_shape=(1,), loss="mse")
    T, alpha = 4, 0.1
    theta = np.array([0.7, -0.3])
    sx, qx = rng.uniform(-2, 2, (T, 3, 1)), rng.uniform(-2, 2, (T, 5, 1))
    sy, qy = rng.standard_normal((T, 3, 1)), rng.standard_normal((T, 5, 1))
    want = np.zeros(2)
    for t in range(T):
        ps, pq = _linear_phi(sx)[t], _linear_phi(qx)[t]              # (N, 2)
        hs = 2 * ps.T @ ps / 3
        th = theta.copy()
        for _ in range(k):
            th = th - alpha * 2 * ps.T @ (ps @ th - sy[t, :, 0]) / 3
        gq = 2 * pq.T @ (pq @ th - qy[t, :, 0]) / 5
        jac = np.linalg.matrix_power(np.eye(2) - alpha * hs, k)
        want += jac.T @ gq / T
    got = maml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=k).grad
    assert rel_error(got, want) <= 1e-14


def _relation_data(rng, n_batches):
    model, theta, _, alpha = _sinusoid_case(rng)
    batches = [sample_sinusoid(rng, 3, 6, np.float64) for _ in range(n_batches)]
    return model, theta, [b.x for b in batches], [b.y for b in batches], alpha


@pytest.mark.parametrize("k", [1, 2])
def test_nichol_relations_on_network(k):
    """Inner steps on batches 0..k-1, query batch k. With g_j^(i) = grad L_j(theta_i) and
    H_j^(i) its Hessian (Weng 2018): g_FOMAML = g_k^(k),
    g_MAML = (I - a H_0^(0)) ... (I - a H_{k-1}^(k-1)) g_k^(k); k = 1 is Nichol's
    g_MAML = g_1^(1) - a H_0^(0) g_1^(1). Built here from Model calls only."""
    rng = np.random.default_rng(20 + k)
    model, theta, xs, ys, a = _relation_data(rng, k + 1)
    th = np.tile(theta, (3, 1))                                       # (T, P)
    iterates = []
    for i in range(k):
        iterates.append(th)
        th = th - a * model.loss_and_grad(th, xs[i], ys[i])[1]
    g_q = model.loss_and_grad(th, xs[k], ys[k])[1]                    # g_k^(k) (T, P)
    v = g_q
    for i in range(k - 1, -1, -1):
        v = v - a * model.hvp(iterates[i], xs[i], ys[i], v)[2]
    fo = fomaml_gradient(model, theta, xs[:k], ys[:k], xs[k], ys[k], a, steps=k).grad
    so = maml_gradient(model, theta, xs[:k], ys[:k], xs[k], ys[k], a, steps=k).grad
    assert rel_error(fo, g_q.mean(0)) <= 1e-14
    assert rel_error(so, v.mean(0)) <= 1e-13
    # where the Hessian is not 0 the two differ, by exactly the Hessian terms
    assert rel_error(so, fo) > 1e-3
    if k == 1:
        hv = model.hvp(iterates[0], xs[0], ys[0], g_q)[2]
        assert rel_error(so, (g_q - a * hv).mean(0)) <= 1e-13


def test_alpha_zero_first_and_second_order_agree():
    rng = np.random.default_rng(5)
    model, theta, data, _ = _sinusoid_case(rng)
    so = maml_gradient(model, theta, *data, 0.0, steps=2).grad
    fo = fomaml_gradient(model, theta, *data, 0.0, steps=2).grad
    assert rel_error(so, fo) == 0.0


def test_float32_preserved_and_close_to_float64():
    rng = np.random.default_rng(6)
    model, theta, data, alpha = _sinusoid_case(rng)
    r64 = maml_gradient(model, theta, *data, alpha, steps=2)
    d32 = [d.astype(np.float32) for d in data]
    r32 = maml_gradient(model, theta.astype(np.float32), *d32, alpha, steps=2)
    assert r32.grad.dtype == np.float32 and r32.query_loss.dtype == np.float32
    assert rel_error(r32.grad, r64.grad) <= 1e-5


def test_adapt_iterates():
    rng = np.random.default_rng(8)
    model, theta, (sx, sy, _, _), alpha = _sinusoid_case(rng)
    its = adapt(model, theta, sx, sy, alpha, 2)
    assert len(its) == 3 and its[0].shape == (3, model.num_params)
    g0 = model.loss_and_grad(its[0], sx, sy)[1]
    assert np.array_equal(its[1], its[0] - alpha * g0)


def test_bad_input_is_refused():
    rng = np.random.default_rng(9)
    model, theta, (sx, sy, qx, qy), alpha = _sinusoid_case(rng)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        maml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=0)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        maml_gradient(model, theta, sx, sy, qx, qy, -0.1)
    with pytest.raises(ValueError, match=r"alpha must have shape \(60\)"):
        maml_gradient(model, theta, sx, sy, qx, qy, np.ones(5))
    with pytest.raises(ValueError, match=r"theta must have shape \(60\)"):
        maml_gradient(model, theta[:-1], sx, sy, qx, qy, alpha)
    with pytest.raises(TypeError, match="has dtype float32, expected float64"):
        maml_gradient(model, theta, sx.astype(np.float32), sy, qx, qy, alpha)
    with pytest.raises(ValueError, match="x must have shape"):
        maml_gradient(model, theta, sx[:2], sy[:2], qx, qy, alpha)
    with pytest.raises(ValueError, match="2 support x and 2 support y batches for 3"):
        maml_gradient(model, theta, [sx, sx], [sy, sy], qx, qy, alpha, steps=3)
    with pytest.raises(TypeError, match="must be a metacore.network.Model"):
        maml_gradient("mlp", theta, sx, sy, qx, qy, alpha)
    bad = qy.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        maml_gradient(model, theta, sx, sy, qx, bad, alpha)


def test_query_accuracy_is_the_post_update_accuracy():
    """The logged training accuracy: argmax of the adapted model's query logits against the
    labels, per task; None for a regression loss; the same with the tasks split in blocks."""
    rng = np.random.default_rng(11)
    model, theta, (sx, sy, qx, qy), alpha = _bn_mlp_case(rng, T=4, n_q=6)
    r = maml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=2)
    theta_k = adapt(model, theta, sx, sy, alpha, steps=2)[-1]        # (T, P)
    out, _ = model.forward(theta_k, qx)
    want = (out.argmax(axis=-1) == qy).mean(axis=1)
    assert r.query_accuracy.shape == (4,)
    assert np.array_equal(r.query_accuracy, want)
    blocks = maml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=2, workers=2)
    assert np.array_equal(blocks.query_accuracy, want)
    fo = fomaml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=2)
    assert np.array_equal(fo.query_accuracy, want)
    smodel, stheta, sdata, salpha = _sinusoid_case(rng)
    assert maml_gradient(smodel, stheta, *sdata, salpha).query_accuracy is None
