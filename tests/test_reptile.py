"""Reptile: batched equals serial, the update formula, and g_Reptile = g_0^(0) + g_1^(1)
(Nichol et al. 2018) on a real network loss, from independent Model.loss_and_grad calls.

Shape letters: T tasks, N points per task, P parameters.
"""
import numpy as np
import pytest

from metacore.algorithms import reptile_direction, reptile_direction_serial
from metacore.gradcheck import rel_error
from metacore.models import conv4_maml, sinusoid_mlp
from metacore.tasks import sample_sinusoid


def _setup(rng, T=5, n=6, n_batches=1, dtype=np.float64):
    model = sinusoid_mlp(hidden=(7, 5))
    theta = model.init_params(rng, dtype) + dtype(0.3) * rng.standard_normal(60).astype(dtype)
    b = [sample_sinusoid(rng, T, n, dtype) for _ in range(n_batches)]
    return model, theta, [t.x for t in b], [t.y for t in b]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_relation_sum_of_step_gradients(k):
    """d / alpha = g_0^(0) + g_1^(1) + ... + g_{k-1}^(k-1), averaged over tasks."""
    rng = np.random.default_rng(k)
    model, theta, xs, ys = _setup(rng, n_batches=k)
    alpha = 0.03
    th, total = np.tile(theta, (5, 1)), np.zeros((5, 60))
    for i in range(k):
        g = model.loss_and_grad(th, xs[i], ys[i])[1]
        total += g
        th = th - alpha * g
    loss0, d = reptile_direction(model, theta, xs, ys, alpha, steps=k)
    assert rel_error(d / alpha, total.mean(0)) <= 1e-12
    assert np.array_equal(loss0, model.loss(np.tile(theta, (5, 1)), xs[0], ys[0]))
    # the outer SGD step with lr eps is theta + eps * mean_t(theta_k^t - theta)
    eps = 0.7
    assert rel_error(theta - eps * d, theta + eps * (th.mean(0) - theta)) <= 1e-15


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batched_equals_serial(dtype):
    rng = np.random.default_rng(11)
    model, theta, xs, ys = _setup(rng, T=7, dtype=dtype)
    lb, db = reptile_direction(model, theta, xs[0], ys[0], 0.02, steps=3)
    ls, ds = reptile_direction_serial(model, theta, xs[0], ys[0], 0.02, steps=3)
    assert db.dtype == dtype and ls.dtype == dtype
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert rel_error(db, ds) <= tol and rel_error(lb, ls) <= tol


def test_batched_equals_serial_conv4_batchnorm():
    """Batch norm statistics stay per task: running tasks together changes nothing."""
    rng = np.random.default_rng(12)
    model = conv4_maml(n_way=3, image_shape=(8, 8, 1), channels=3)
    theta = model.init_params(rng, np.float64)
    x, y = rng.random((4, 6, 8, 8, 1)), rng.integers(0, 3, (4, 6))
    _, db = reptile_direction(model, theta, x, y, 0.4, steps=2)
    _, ds = reptile_direction_serial(model, theta, x, y, 0.4, steps=2)
    assert rel_error(db, ds) <= 1e-13


def test_bad_input():
    rng = np.random.default_rng(13)
    model, theta, xs, ys = _setup(rng)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        reptile_direction(model, theta, xs[0], ys[0], 0.1, steps=0)
    with pytest.raises(ValueError, match="1 support x and 1 support y batches for 2"):
        reptile_direction(model, theta, xs, ys, 0.1, steps=2)
    with pytest.raises(ValueError, match="targets must have shape"):
        reptile_direction(model, theta, xs[0], ys[0][:, :3], 0.1, steps=1)
