"""Prototypical Networks: the episode gradient against float64 central finite differences,
prototypes and logits against independent closed forms, no batch-norm leak at evaluation,
bad input refused."""
import numpy as np
import pytest

from metacore.algorithms.protonet import ProtoNet, class_mean_matrix
from metacore.gradcheck import numerical_gradient_at, rel_error
from metacore.models import conv4_protonet


def tiny(seed=0, T=2, N=3, K=2, Q=2, hw=8, channels=3, depth=2):
    """A tiny Conv-embedding ProtoNet and a random episode batch (labels shuffled, so the
    prototypes cannot rely on grouped rows)."""
    rng = np.random.default_rng(seed)
    pn = ProtoNet(conv4_protonet(image_shape=(hw, hw, 1), channels=channels, depth=depth),
                  backend="reference")
    params = pn.init_params(rng, np.float64)
    params += 0.1 * rng.standard_normal(params.shape)
    sy = np.stack([rng.permutation(np.repeat(np.arange(N), K)) for _ in range(T)])
    qy = rng.integers(0, N, (T, N * Q))
    sx = rng.random((T, N * K, hw, hw, 1))
    qx = rng.random((T, N * Q, hw, hw, 1))
    return pn, params, sx, sy, qx, qy, rng


def fd_check(loss_fn, params, grad, layout, rng, per_block=12, h=1e-6):
    """Central differences on a stratified random subset: up to per_block entries of every
    named block. Returns the rel_error of analytic vs numerical entries."""
    idx = []
    for name in layout.names:
        sl = layout.slice(name)
        n = sl.stop - sl.start
        idx += list(sl.start + rng.choice(n, min(n, per_block), replace=False))
    num = numerical_gradient_at(loss_fn, params, idx, h)
    return rel_error(grad[idx], num)


@pytest.mark.parametrize("seed,T,N,K,Q", [(0, 2, 3, 2, 2), (1, 1, 5, 1, 3), (2, 3, 2, 3, 1)])
def test_episode_gradient_matches_finite_differences(seed, T, N, K, Q):
    pn, params, sx, sy, qx, qy, rng = tiny(seed, T, N, K, Q)
    loss, grad, acc = pn.episode_loss_and_grad(params, sx, sy, qx, qy)
    assert grad.shape == params.shape and grad.dtype == np.float64

    def f():
        return pn.episode_loss_and_grad(params, sx, sy, qx, qy)[0]
    assert f() == loss
    err = fd_check(f, params, grad, pn.layout, rng, per_block=1000)   # every entry
    assert err <= 1e-6, err


def test_loss_is_mean_of_tasks_and_cross_entropy_of_negative_sqdist():
    """Closed forms, computed here independently: prototypes = class means of the embeddings,
    logits = -squared distances, loss = mean cross-entropy, first over queries then tasks."""
    pn, params, sx, sy, qx, qy, _ = tiny(3, T=2, N=4, K=3, Q=2)
    T, S = sy.shape
    N = 4
    model = pn.model
    model.set_bn_mode("batch")
    losses, correct = [], []
    for t in range(T):
        x = np.concatenate([sx[t:t + 1], qx[t:t + 1]], axis=1)
        emb = model.forward(params[None, :], x)[0][0]              # (S+M, D)
        protos = np.stack([emb[:S][sy[t] == k].mean(axis=0) for k in range(N)])
        q = emb[S:]
        logits = -np.array([[np.sum((qi - c) ** 2) for c in protos] for qi in q])
        lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        losses.append(np.mean(lse - logits[np.arange(len(q)), qy[t]]))
        correct.append(logits.argmax(1) == qy[t])
    loss, _, acc = pn.episode_loss_and_grad(params, sx, sy, qx, qy)
    assert abs(loss - np.mean(losses)) <= 1e-12 * abs(loss)
    assert acc == np.mean(np.concatenate(correct))
    # and the evaluation path in batch mode gives the same logits / prototypes
    logits, protos = pn.logits(params, sx, sy, qx, bn="batch")
    for t in range(T):
        x = np.concatenate([sx[t:t + 1], qx[t:t + 1]], axis=1)
        emb = model.forward(params[None, :], x)[0][0]
        want = np.stack([emb[:S][sy[t] == k].mean(axis=0) for k in range(N)])
        np.testing.assert_allclose(protos[t], want, rtol=1e-13, atol=1e-15)
        want_logits = -((emb[S:, None, :] - want[None]) ** 2).sum(-1)
        np.testing.assert_allclose(logits[t], want_logits, rtol=1e-12, atol=1e-14)


def test_class_mean_matrix():
    sy = np.array([[2, 0, 0, 1, 2, 2]])
    A = class_mean_matrix(sy, 3, np.float64)
    np.testing.assert_array_equal(A[0], [[0, .5, .5, 0, 0, 0], [0, 0, 0, 1, 0, 0],
                                         [1 / 3, 0, 0, 0, 1 / 3, 1 / 3]])


def test_float32_preserved_and_close_to_float64():
    pn, params, sx, sy, qx, qy, _ = tiny(4)
    l64, g64, _ = pn.episode_loss_and_grad(params, sx, sy, qx, qy)
    l32, g32, _ = pn.episode_loss_and_grad(params.astype(np.float32), sx.astype(np.float32),
                                           sy, qx.astype(np.float32), qy)
    assert g32.dtype == np.float32
    assert abs(l32 - l64) <= 1e-4 * abs(l64)
    assert rel_error(g32, g64) <= 1e-4


def test_running_mode_has_no_query_leak_and_batch_mode_does():
    """Default evaluation: one query's logits do not change when the other queries of its
    batch are replaced; in the transductive 'batch' mode they do (so the test can fail)."""
    pn, params, sx, sy, qx, qy, rng = tiny(5, T=2, N=3, K=2, Q=3)
    # running statistics from a few training passes (so they are not the defaults)
    for _ in range(3):
        pn.episode_loss_and_grad(params, sx, sy, qx, qy, update_running_stats=True)
    qx2 = rng.random(qx.shape)
    qx2[:, 0] = qx[:, 0]                                  # query 0 kept, the others new
    a = pn.logits(params, sx, sy, qx)[0][:, 0]
    b = pn.logits(params, sx, sy, qx2)[0][:, 0]
    np.testing.assert_array_equal(a, b)
    # one query alone gives the same logits as within its batch
    c = pn.logits(params, sx, sy, qx[:, :1])[0][:, 0]
    np.testing.assert_allclose(a, c, rtol=1e-12, atol=1e-12)
    a = pn.logits(params, sx, sy, qx, bn="batch")[0][:, 0]
    b = pn.logits(params, sx, sy, qx2, bn="batch")[0][:, 0]
    assert np.abs(a - b).max() > 1e-6


def test_running_stats_move_only_on_request():
    pn, params, sx, sy, qx, qy, _ = tiny(6)
    before = pn.model.buffers()
    pn.episode_loss_and_grad(params, sx, sy, qx, qy)
    for k, v in pn.model.buffers().items():
        np.testing.assert_array_equal(v, before[k])
    pn.episode_loss_and_grad(params, sx, sy, qx, qy, update_running_stats=True)
    assert any(np.abs(v - before[k]).max() > 0 for k, v in pn.model.buffers().items())


def test_bad_input_refused():
    pn, params, sx, sy, qx, qy, _ = tiny(7)
    f = pn.episode_loss_and_grad
    with pytest.raises(ValueError, match="params must have shape"):
        f(params[:-1], sx, sy, qx, qy)
    with pytest.raises(TypeError, match="support_x has dtype float32"):
        f(params, sx.astype(np.float32), sy, qx, qy)
    bad = sy.copy()
    bad[bad == 1] = 0                                     # class 1 missing
    with pytest.raises(ValueError, match="no example of class 1"):
        f(params, sx, bad, qx, qy)
    with pytest.raises(ValueError, match="query_y has value 3, must be < 3"):
        f(params, sx, sy, qx, np.full_like(qy, 3))
    with pytest.raises(ValueError, match="query_x must have shape"):
        f(params, sx, sy, qx[:, :, :4], qy)
    with pytest.raises(ValueError, match="bn must be one of"):
        pn.logits(params, sx, sy, qx, bn="transductive")
