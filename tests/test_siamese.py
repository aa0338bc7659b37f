"""Siamese networks: the pair-loss gradient against float64 central finite differences (every
parameter), the verification probability and one-shot prediction against independent closed
forms, twin symmetry, the pair sampler, no batch-norm leak, Lake's runs, bad input."""
import numpy as np
import pytest

from metacore.algorithms.siamese import PairSampler, SiameseNet, lake_accuracy
from metacore.gradcheck import rel_error
from metacore.models import conv4_protonet
from test_protonet import fd_check


def tiny(seed=0, T=2, B=5, hw=8):
    rng = np.random.default_rng(seed)
    sn = SiameseNet(conv4_protonet(image_shape=(hw, hw, 1), channels=3, depth=2))
    params = sn.init_params(rng, np.float64)
    params += 0.1 * rng.standard_normal(params.shape)
    x1 = rng.random((T, B, hw, hw, 1))
    x2 = rng.random((T, B, hw, hw, 1))
    same = (rng.random((T, B)) < 0.5).astype(np.float64)
    return sn, params, x1, x2, same, rng


@pytest.mark.parametrize("seed,T,B", [(0, 2, 5), (1, 1, 2), (2, 3, 3)])
def test_pair_gradient_matches_finite_differences(seed, T, B):
    sn, params, x1, x2, same, rng = tiny(seed, T, B)
    loss, grad, _ = sn.episode_loss_and_grad(params, x1, x2, same)
    assert grad.shape == params.shape and grad.dtype == np.float64

    def f():
        return sn.episode_loss_and_grad(params, x1, x2, same)[0]
    err = fd_check(f, params, grad, sn.layout, rng, per_block=1000)      # every entry
    assert err <= 1e-6, err


def test_loss_is_bce_of_weighted_l1_and_twins_are_symmetric():
    sn, params, x1, x2, same, _ = tiny(3, T=2, B=4)
    loss, grad, acc = sn.episode_loss_and_grad(params, x1, x2, same)
    th = params[sn.params.ranges["embed"]][None]
    alpha, bias = params[-sn.D - 1:-1], params[-1]
    sn.embed.set_bn_mode("batch")
    per_task, correct = [], []
    for t in range(2):
        h = sn.embed.forward(th, np.concatenate([x1[t:t + 1], x2[t:t + 1]], 1))[0][0]
        z = np.array([np.sum(alpha * np.abs(h[b] - h[4 + b])) + bias for b in range(4)])
        p = 1 / (1 + np.exp(-z))
        per_task.append(-np.mean(same[t] * np.log(p) + (1 - same[t]) * np.log(1 - p)))
        correct.append((p > 0.5) == (same[t] == 1))
    assert abs(loss - np.mean(per_task)) <= 1e-12 * loss
    assert acc == np.mean(correct)
    # swapping the twins changes nothing (the BN batch holds the same images)
    loss2, grad2, _ = sn.episode_loss_and_grad(params, x2, x1, same)
    assert abs(loss2 - loss) <= 1e-14 * loss and rel_error(grad2, grad) <= 1e-12


def test_prediction_is_label_of_most_similar_support():
    sn, params, _, _, _, rng = tiny(4)
    T, N, K, M = 2, 3, 2, 4
    sy = np.stack([rng.permutation(np.repeat(np.arange(N), K)) for _ in range(T)])
    sx = rng.random((T, N * K, 8, 8, 1))
    qx = rng.random((T, M, 8, 8, 1))
    pred = sn.predict(params, sx, sy, qx)
    th = params[sn.params.ranges["embed"]][None]
    alpha, bias = params[-sn.D - 1:-1], params[-1]
    sn.embed.set_bn_mode("running")
    for t in range(T):
        hs = [sn.embed.forward(th, sx[t:t + 1, i:i + 1])[0][0, 0] for i in range(N * K)]
        for m in range(M):
            hq = sn.embed.forward(th, qx[t:t + 1, m:m + 1])[0][0, 0]
            z = [np.sum(alpha * np.abs(hq - h)) + bias for h in hs]
            assert pred[t, m] == sy[t, int(np.argmax(z))]


def test_running_mode_has_no_query_leak_and_batch_mode_does():
    sn, params, x1, x2, same, rng = tiny(5, T=2, B=6)
    for _ in range(3):
        sn.episode_loss_and_grad(params, x1, x2, same, update_running_stats=True)
    sy = np.tile(np.arange(3), (2, 1))
    sx = rng.random((2, 3, 8, 8, 1))
    qx = rng.random((2, 4, 8, 8, 1))
    qx2 = rng.random(qx.shape)
    qx2[:, 0] = qx[:, 0]
    a = sn.pair_logits(params, sx, sy, qx)[:, 0]
    np.testing.assert_array_equal(a, sn.pair_logits(params, sx, sy, qx2)[:, 0])
    np.testing.assert_allclose(a, sn.pair_logits(params, sx, sy, qx[:, :1])[:, 0],
                               rtol=1e-12, atol=1e-13)
    b1 = sn.pair_logits(params, sx, sy, qx, bn="batch")[:, 0]
    b2 = sn.pair_logits(params, sx, sy, qx2, bn="batch")[:, 0]
    assert np.abs(b1 - b2).max() > 1e-6


def test_pair_sampler():
    rng = np.random.default_rng(6)
    images = rng.random((7, 5, 6, 6))                   # 7 characters, 5 drawings
    chars = np.array([0, 2, 3, 6])
    s = PairSampler(images, chars, rotate=True, seed=11, dtype=np.float64)
    b = s.sample(3, 7)
    assert b.x1.shape == (3, 7, 6, 6, 1) and b.same.dtype == np.float64
    np.testing.assert_array_equal(b.same[:, :4], 1)
    np.testing.assert_array_equal(b.same[:, 4:], 0)
    assert np.all((b.class1 == b.class2) == (b.same == 1))
    assert np.all(b.drawing1[:, :4] != b.drawing2[:, :4])
    assert np.isin(b.char1, chars).all() and np.isin(b.char2, chars).all()
    for t in range(3):
        for i in range(7):
            want = np.rot90(images[b.char1[t, i], b.drawing1[t, i]], b.rot1[t, i])
            np.testing.assert_array_equal(b.x1[t, i, :, :, 0], want)
            want = np.rot90(images[b.char2[t, i], b.drawing2[t, i]], b.rot2[t, i])
            np.testing.assert_array_equal(b.x2[t, i, :, :, 0], want)
    again = PairSampler(images, chars, rotate=True, seed=11, dtype=np.float64).sample(3, 7)
    np.testing.assert_array_equal(again.x2, b.x2)
    assert not PairSampler(images, chars, rotate=False, seed=1).sample(2, 4).rot1.any()
    with pytest.raises(ValueError, match="n_pairs >= 2"):
        s.sample(1, 1)
    with pytest.raises(ValueError, match=">= 2 classes"):
        PairSampler(images, np.array([1]), rotate=False, seed=0)


def test_lake_runs_oracle_and_model():
    from metacore.data.omniglot import load_omniglot
    data = load_omniglot()
    sn = SiameseNet(conv4_protonet(channels=2, depth=4))
    params = sn.init_params(np.random.default_rng(0), np.float32)
    r = lake_accuracy(sn.predict, params, data)
    assert r["per_run"].shape == (20,) and 0.0 <= r["accuracy"] <= 1.0
    assert abs(r["accuracy"] - r["per_run"].mean()) < 1e-12
    # an oracle that looks up the test labels scores 1; a constant guess scores 1/20
    from metacore.data.omniglot import lake_episodes
    ep = lake_episodes(data)
    assert lake_accuracy(lambda p, sx, sy, qx, bn: ep.query_y, params, data)["accuracy"] == 1.0
    const = lake_accuracy(lambda p, sx, sy, qx, bn: np.zeros_like(ep.query_y), params, data)
    assert const["accuracy"] == pytest.approx(1 / 20)


def test_float32_preserved():
    sn, params, x1, x2, same, _ = tiny(7)
    l64, g64, _ = sn.episode_loss_and_grad(params, x1, x2, same)
    l32, g32, _ = sn.episode_loss_and_grad(params.astype(np.float32), x1.astype(np.float32),
                                           x2.astype(np.float32), same.astype(np.float32))
    assert g32.dtype == np.float32
    assert abs(l32 - l64) <= 1e-5 * l64 and rel_error(g32, g64) <= 1e-4


def test_bad_input_refused():
    sn, params, x1, x2, same, _ = tiny(8)
    f = sn.episode_loss_and_grad
    with pytest.raises(ValueError, match="x2 must have shape"):
        f(params, x1, x2[:, :-1], same)
    with pytest.raises(ValueError, match="same must hold only 0 and 1"):
        f(params, x1, x2, same + 0.5)
    with pytest.raises(TypeError, match="same has dtype float32"):
        f(params, x1, x2, same.astype(np.float32))
    with pytest.raises(ValueError, match="params must have shape"):
        f(params[:5], x1, x2, same)
    with pytest.raises(ValueError, match="bn must be one of"):
        sn.pair_logits(params, x1, np.zeros((2, 5), np.int64), x2, bn="x")
