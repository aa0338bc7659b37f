"""Relation Networks: the episode gradient against float64 central finite differences (every
parameter of a tiny model of the paper's shape), the scores against an independent per-pair
computation, the paper's Omniglot sizes, no batch-norm leak at evaluation, bad input refused."""
import numpy as np
import pytest

from metacore.algorithms.relation import RelationNet, sigmoid
from metacore.gradcheck import rel_error
from metacore.models.metric_heads import relation_embedding, relation_module
from test_protonet import fd_check


def tiny(seed=0, T=2, N=3, K=2, Q=2):
    """10x10 images; embedding [valid conv + pool, same conv] (10 -> 8 -> 4 -> 4), 3 channels;
    relation module 2 x [same conv, BN, ReLU, pool] (4 -> 2 -> 1), FC 3 -> 4 -> 1."""
    rng = np.random.default_rng(seed)
    f = relation_embedding((10, 10, 1), channels=3, blocks=(("valid", True), ("same", False)))
    g = relation_module(f.out_shape, channels=3, depth=2, hidden=4)
    rn = RelationNet(f, g)
    params = rn.init_params(rng, np.float64)
    params += 0.1 * rng.standard_normal(params.shape)
    sy = np.stack([rng.permutation(np.repeat(np.arange(N), K)) for _ in range(T)])
    qy = rng.integers(0, N, (T, Q * N))
    sx = rng.random((T, N * K, 10, 10, 1))
    qx = rng.random((T, Q * N, 10, 10, 1))
    return rn, params, sx, sy, qx, qy, rng


def test_paper_omniglot_sizes():
    rn = RelationNet()
    assert rn.embed.out_shape == (5, 5, 64)
    assert rn.relation.in_shape == (5, 5, 128)
    conv = lambda c_in: 9 * c_in * 64 + 64 + 2 * 64          # conv + BN gamma, beta
    assert rn.embed.num_params == conv(1) + 3 * conv(64)
    assert rn.relation.num_params == conv(128) + conv(64) + (64 * 8 + 8) + (8 + 1)
    assert rn.num_params == rn.embed.num_params + rn.relation.num_params
    assert rn.layout.names[0].startswith("embed/") and rn.layout.names[-1].startswith("relation/")


@pytest.mark.parametrize("seed,T,N,K,Q", [(0, 2, 3, 2, 2), (1, 1, 4, 1, 2), (2, 2, 2, 3, 1)])
def test_episode_gradient_matches_finite_differences(seed, T, N, K, Q):
    rn, params, sx, sy, qx, qy, rng = tiny(seed, T, N, K, Q)
    loss, grad, _ = rn.episode_loss_and_grad(params, sx, sy, qx, qy)
    assert grad.shape == params.shape and grad.dtype == np.float64

    def f():
        return rn.episode_loss_and_grad(params, sx, sy, qx, qy)[0]
    assert f() == loss
    # the first case checks every entry, the others a stratified subset (8 per block)
    err = fd_check(f, params, grad, rn.layout, rng, per_block=1000 if seed == 0 else 8)
    assert err <= 1e-6, err


def test_scores_and_loss_against_per_pair_computation():
    """r_ij = sigmoid(g(concat(sum of class i's support maps, f(query j)))), computed here with
    explicit loops; the loss is the mean squared error against the match indicator."""
    rn, params, sx, sy, qx, qy, _ = tiny(3, T=2, N=3, K=2, Q=2)
    N = 3
    r = rn.scores(params, sx, sy, qx, bn="running")           # running mode: per pair
    th_f = params[rn.params.ranges["embed"]][None]
    th_g = params[rn.params.ranges["relation"]][None]
    sq = 0.0
    for t in range(2):
        for j in range(qx.shape[1]):
            fq = rn.embed.forward(th_f, qx[t:t + 1, j:j + 1])[0][0, 0]
            for i in range(N):
                Fi = sum(rn.embed.forward(th_f, sx[t:t + 1, s:s + 1])[0][0, 0]
                         for s in range(sx.shape[1]) if sy[t, s] == i)
                z = rn.relation.forward(th_g, np.concatenate([Fi, fq], -1)[None, None])[0]
                want = 1.0 / (1.0 + np.exp(-z[0, 0, 0]))
                assert abs(r[t, j, i] - want) <= 1e-12
                sq += (want - (qy[t, j] == i)) ** 2
    # in batch mode the loss is the MSE of the batch-mode scores
    rb = rn.scores(params, sx, sy, qx, bn="batch")
    loss, _, acc = rn.episode_loss_and_grad(params, sx, sy, qx, qy)
    target = qy[:, :, None] == np.arange(N)
    assert abs(loss - ((rb - target) ** 2).mean()) <= 1e-14
    assert acc == (rb.argmax(-1) == qy).mean()
    assert np.isfinite(sq)


def test_sigmoid_stable():
    z = np.array([-800.0, -30.0, 0.0, 30.0, 800.0])
    s = sigmoid(z)
    assert np.all(np.isfinite(s)) and s[2] == 0.5 and s[0] == 0.0 and s[-1] == 1.0
    np.testing.assert_allclose(sigmoid(z[1:-1]), 1 / (1 + np.exp(-z[1:-1])), rtol=1e-15)
    assert sigmoid(z.astype(np.float32)).dtype == np.float32


def test_float32_preserved_and_close_to_float64():
    rn, params, sx, sy, qx, qy, _ = tiny(4)
    l64, g64, _ = rn.episode_loss_and_grad(params, sx, sy, qx, qy)
    l32, g32, _ = rn.episode_loss_and_grad(params.astype(np.float32), sx.astype(np.float32),
                                           sy, qx.astype(np.float32), qy)
    assert g32.dtype == np.float32
    assert abs(l32 - l64) <= 1e-5 * abs(l64)
    assert rel_error(g32, g64) <= 1e-4


def test_running_mode_has_no_query_leak_and_batch_mode_does():
    rn, params, sx, sy, qx, qy, rng = tiny(5, T=2, N=3, K=1, Q=3)
    for _ in range(3):
        rn.episode_loss_and_grad(params, sx, sy, qx, qy, update_running_stats=True)
    qx2 = rng.random(qx.shape)
    qx2[:, 0] = qx[:, 0]
    a = rn.scores(params, sx, sy, qx)[:, 0]
    np.testing.assert_array_equal(a, rn.scores(params, sx, sy, qx2)[:, 0])
    np.testing.assert_allclose(a, rn.scores(params, sx, sy, qx[:, :1])[:, 0], rtol=1e-12,
                               atol=1e-14)
    b1 = rn.scores(params, sx, sy, qx, bn="batch")[:, 0]
    b2 = rn.scores(params, sx, sy, qx2, bn="batch")[:, 0]
    assert np.abs(b1 - b2).max() > 1e-6


def test_bad_input_refused():
    rn, params, sx, sy, qx, qy, _ = tiny(6)
    f = rn.episode_loss_and_grad
    with pytest.raises(ValueError, match="params must have shape"):
        f(params[1:], sx, sy, qx, qy)
    with pytest.raises(ValueError, match="support_x must have shape"):
        f(params, sx[:, :, :9, :9], sy, qx, qy)
    with pytest.raises(ValueError, match="no example of class 0"):
        f(params, sx, sy + 1, qx, qy)
    with pytest.raises(TypeError, match="query_y must have an integer dtype"):
        f(params, sx, sy, qx, qy.astype(np.float64))
    with pytest.raises(ValueError, match="relation module must map"):
        RelationNet(rn.embed, relation_module((4, 4, 4), channels=3, hidden=4))
    with pytest.raises(ValueError, match="bn must be one of"):
        rn.scores(params, sx, sy, qx, bn="query")
