"""Issue 21's silent non-finite results from the kernels and the optimizers: float32 overflow
in a distance, the ProtoNet loss, the LRUA forward and an optimizer step now raises
FloatingPointError naming the op (or warns under the policy 'warn'); finite cases pass."""
import numpy as np
import pytest

from metacore import nonfinite
from metacore.kernels import distance, lrua
from metacore.optim import make_optimizer


def _pair(scale):
    rng = np.random.default_rng(0)
    q = (scale * rng.standard_normal((1, 3, 4))).astype(np.float32)
    s = (scale * rng.standard_normal((1, 2, 4))).astype(np.float32)
    return q, s


@pytest.mark.parametrize("backend", ["auto", "numba", "reference"])
def test_distance_overflow_raises_naming_the_op(backend):
    q, s = _pair(1e20)
    with pytest.raises(FloatingPointError, match=r"pairwise_sqeuclidean: non-finite d .*"
                                                 r"float32.*likely cause: float32 overflow"):
        distance.pairwise_sqeuclidean(q, s, backend=backend)
    q, s = _pair(1.0)
    assert np.isfinite(distance.pairwise_sqeuclidean(q, s, backend=backend)).all()


def test_protonet_loss_overflow_raises_and_warns_under_the_warn_policy():
    q, s = _pair(1e20)
    y = np.zeros((1, 3), np.int64)
    with pytest.raises(FloatingPointError, match="protonet_loss: non-finite"):
        distance.protonet_loss(q, s, y)
    with nonfinite.policy("warn"), pytest.warns(nonfinite.NonFiniteWarning):
        loss, dq, ds, pred = distance.protonet_loss(q, s, y)
    assert not np.isfinite(loss).all()


def test_lrua_forward_with_huge_keys_raises():
    rng = np.random.default_rng(1)
    T, B, H, S, W = 3, 2, 1, 5, 4
    keys = (1e30 * rng.standard_normal((T, B, H, W))).astype(np.float32)
    alpha = np.zeros((T, B, H), np.float32)
    mem = (1e-6 * np.ones((B, S, W))).astype(np.float32)
    read0 = np.zeros((B, H, S), np.float32)
    usage0 = np.zeros((B, S), np.float32)
    with pytest.raises(FloatingPointError, match="lrua_forward: non-finite"):
        lrua.lrua_forward(keys, alpha, mem, read0, usage0, 0.95)
    keys /= np.float32(1e30)
    out = lrua.lrua_forward(keys, alpha, mem, read0, usage0, 0.95)
    assert all(np.isfinite(a).all() for a in out)


@pytest.mark.parametrize("name", ["adam", "sgd", "momentum", "adagrad"])
def test_an_optimizer_step_that_overflows_raises(name):
    kw = {} if name == "adam" else {"lr": 1.0}
    opt = make_optimizer(name, 3, np.float32, **kw)
    p = np.full(3, -3e38, np.float32)
    g = np.full(3, 3e38, np.float32)           # finite; g * g and p - g overflow float32
    with pytest.raises(FloatingPointError, match=r"\.step: non-finite"):
        opt.step(p, g)
    opt = make_optimizer(name, 3, np.float32, **kw)
    p = np.ones(3, np.float32)
    opt.step(p, np.full(3, 0.1, np.float32))
    assert np.isfinite(p).all()
