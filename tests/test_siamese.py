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


# ------------------------------------------------------------------ Koch et al.'s distortions
from metacore.algorithms import siamese as S  # noqa: E402


def test_distortion_ranges_and_presence():
    n = 20000
    d = S.sample_distortions(np.random.default_rng(0), n)
    assert set(d) == {"theta", "rho_x", "rho_y", "s_x", "s_y", "t_x", "t_y"}
    for name, (lo, hi, ident) in S.DISTORT_RANGES.items():
        v = d[name]
        assert v.shape == (n,) and (v >= lo).all() and (v <= hi).all(), name
        absent = (v == ident).mean()
        # present with probability 0.5: 3.5 binomial standard deviations is 0.0124
        assert abs(absent - 0.5) <= 0.0124, (name, absent)
        on = v[v != ident]
        assert on.min() < lo + 0.01 * (hi - lo) and on.max() > hi - 0.01 * (hi - lo), name
    assert (S.DISTORT_RANGES["theta"][:2], S.DISTORT_RANGES["t_x"][:2]) == \
        ((-10.0, 10.0), (-2.0, 2.0))                          # degrees, pixels
    # the components are drawn independently of each other
    pres = np.stack([d[k] != S.DISTORT_RANGES[k][2] for k in S.DISTORT_RANGES])
    assert np.abs(np.corrcoef(pres)[np.triu_indices(7, 1)]).max() < 0.05


def test_identity_warp_is_exact_and_known_warps_are_right():
    rng = np.random.default_rng(1)
    x = rng.random((3, 9, 7))
    I, t0 = np.tile(np.eye(2), (3, 1, 1)), np.zeros((3, 2))
    np.testing.assert_array_equal(S.affine_warp(x, I, t0), x)
    ident = {k: np.full(3, v[2]) for k, v in S.DISTORT_RANGES.items()}
    A, t = S.distortion_matrices(ident)
    np.testing.assert_array_equal(S.affine_warp(x, A, t), x)
    # an integer shift moves the image and fills with the background 0
    A, t = S.distortion_matrices(dict(ident, t_x=np.full(3, 2.0), t_y=np.full(3, -1.0)))
    y = S.affine_warp(x, A, t)
    np.testing.assert_array_equal(y[:, :-1, 2:], x[:, 1:, :-2])
    assert (y[:, :, :2] == 0).all() and (y[:, -1] == 0).all()
    # a half-pixel shift is the mean of the two neighbours (bilinear)
    A, t = S.distortion_matrices(dict(ident, t_x=np.full(3, 0.5)))
    np.testing.assert_allclose(S.affine_warp(x, A, t)[:, :, 1:],
                               (x[:, :, 1:] + x[:, :, :-1]) / 2, rtol=0, atol=1e-15)
    # 90 degrees about the centre of a square image is np.rot90 (up to the sign convention)
    sq = rng.random((1, 6, 6))
    A, t = S.distortion_matrices(dict({k: v[:1] for k, v in ident.items()},
                                      theta=np.array([90.0])))
    r = S.affine_warp(sq, A, t)[0]
    assert any(np.allclose(r, np.rot90(sq[0], k), atol=1e-12) for k in (1, 3))
    # the matrix is R(theta) Sh(rho) diag(s)
    d = dict(theta=np.array([30.0]), rho_x=np.array([0.2]), rho_y=np.array([-0.1]),
             s_x=np.array([1.1]), s_y=np.array([0.9]), t_x=np.array([1.0]),
             t_y=np.array([-2.0]))
    A, t = S.distortion_matrices(d)
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    want = np.array([[c, -s], [s, c]]) @ np.array([[1, 0.2], [-0.1, 1]]) @ np.diag([1.1, 0.9])
    np.testing.assert_allclose(A[0], want, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(t[0], [1.0, -2.0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distorted_pairs_keep_shape_dtype_range_and_are_seeded(dtype):
    from metacore.data.omniglot import load_omniglot
    data = load_omniglot(dtype="float32")
    chars = np.arange(30)

    def batch(seed, distort=True):
        return PairSampler(data.images, chars, seed=seed, dtype=dtype,
                           distort=distort).sample(2, 8)
    plain, a, b, c = batch(5, False), batch(5), batch(5), batch(6)
    for x in (a.x1, a.x2):
        assert x.shape == plain.x1.shape == (2, 8, 28, 28, 1) and x.dtype == dtype
        assert x.min() >= 0.0 and x.max() <= 1.0
    np.testing.assert_array_equal(a.x1, b.x1)                    # same seed, same images
    np.testing.assert_array_equal(a.x2, b.x2)
    assert not np.array_equal(a.x1, c.x1)                        # another seed, others
    # the distortion is drawn after the pairs: the same pairs as without it, warped
    np.testing.assert_array_equal(a.class1, plain.class1)
    np.testing.assert_array_equal(a.drawing2, plain.drawing2)
    changed = [not np.array_equal(a.x1[t, i], plain.x1[t, i])
               for t in range(2) for i in range(8)]
    assert 8 <= sum(changed) <= 16        # P(all 7 absent) = 1/128 per image
    with pytest.raises(TypeError, match="PairSampler: distort must be a bool"):
        PairSampler(data.images, chars, seed=0, distort=1)
