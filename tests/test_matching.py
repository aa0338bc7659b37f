"""Matching Networks: the whole episode's loss gradient against float64 central finite
differences (with and without Full Context Embeddings), the forward pass against the paper's
formulas computed independently here, query independence with BN running statistics, bad input.

Shape letters: T tasks, M supports, Q queries, N classes, E embedding features, P parameters.
Tiny sizes: 8x8 images, 2 conv blocks of 3 channels (E = 3 * 2 * 2 = 12), 3-way 2-shot,
2 queries per class.
"""
import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
from metacore.algorithms.matching import (LSTM_BLOCKS, MatchingNet, episode_loss_and_grad,
                                          predict)
from metacore.gradcheck import numerical_gradient_at, rel_error
from metacore.models import conv4_protonet
from metacore.reference import lstm as RL

N_WAY, K_SHOT, Q_PER = 3, 2, 2
FD_TOL = 1e-6
H_FD = 1e-6


# the similarity forms (similarity, cosine_scale, learn_scale); the first is the default
FORMS = [("support_cosine", 10.0, False), ("cosine", 10.0, False),
         ("scaled_cosine", 7.0, False), ("scaled_cosine", 3.0, True)]
FORM_IDS = ["support_cosine", "cosine", "scaled_cosine", "scaled_cosine_learned"]


def _net(fce, K=3, dtype=np.float64, seed=0, form=FORMS[0]):
    sim, scale, learn = form
    net = MatchingNet(conv4_protonet(image_shape=(8, 8, 1), channels=3, depth=2), fce=fce,
                      read_steps=K, backend="reference", similarity=sim, cosine_scale=scale,
                      learn_scale=learn)
    rng = np.random.default_rng(seed)
    params = net.init_params(rng, np.float64)
    params += 0.1 * rng.standard_normal(params.shape)    # BN gamma/beta and biases off 1/0
    return net, params.astype(dtype)


def _episode(T, seed, dtype=np.float64, q_per=Q_PER):
    rng = np.random.default_rng(100 + seed)
    sx = rng.standard_normal((T, N_WAY * K_SHOT, 8, 8, 1)).astype(dtype)   # (T, M, 8, 8, 1)
    qx = rng.standard_normal((T, N_WAY * q_per, 8, 8, 1)).astype(dtype)    # (T, Q, 8, 8, 1)
    # supports in a shuffled class order, so nothing relies on grouped labels
    sy = np.stack([rng.permutation(np.repeat(np.arange(N_WAY), K_SHOT)) for _ in range(T)])
    qy = np.tile(np.repeat(np.arange(N_WAY), q_per), (T, 1))                 # (T, Q)
    return sx, sy, qx, qy


def _fd_indices(net, rng, per_block=25):
    """Every embedding parameter, and a random stratified subset of each LSTM block."""
    idx = list(range(net.num_emb))
    if net.learn_scale:
        idx.append(net.layout.slice("scale").start)
    for name in net.layout.names:
        if name.split(".")[0] in LSTM_BLOCKS:
            sl = net.layout.slice(name)
            n = sl.stop - sl.start
            idx += list(sl.start + rng.choice(n, min(per_block, n), replace=False))
    return np.array(idx)


# ------------------------------------------------------------------ gradient vs FD
@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("fce,T", [(False, 1), (False, 2), (True, 1), (True, 2)])
def test_episode_gradient_matches_finite_differences(fce, T, form):
    net, p = _net(fce, form=form)
    sx, sy, qx, qy = _episode(T, seed=1)
    loss, grad, acc = net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY)
    assert grad.shape == p.shape and grad.dtype == p.dtype
    assert loss == net.episode_loss(p, sx, sy, qx, qy, N_WAY)

    def f():
        return net.episode_loss(p, sx, sy, qx, qy, N_WAY)

    rng = np.random.default_rng(2)
    idx = _fd_indices(net, rng)
    num = numerical_gradient_at(f, p, idx, H_FD)
    # per named block, so a wrong block is named; each block's largest deviation relative
    # to the scale of the whole gradient (a conv bias feeding batch norm has gradient 0
    # exactly, where a block-wise ratio would divide rounding noise by nothing)
    scale = max(1e-8, np.abs(grad[idx]).max() + np.abs(num).max())
    for name in net.layout.names:
        sl = net.layout.slice(name)
        sel = (idx >= sl.start) & (idx < sl.stop)
        err = np.abs(grad[idx[sel]] - num[sel]).max() / scale
        assert err <= FD_TOL, f"{name}: max deviation / scale {err:.2e}"
        if name.startswith("emb.") and name.endswith("conv2d.b"):   # BN removes the bias
            assert np.abs(grad[sl]).max() <= 1e-12 * scale, name
    assert rel_error(grad[idx], num) <= FD_TOL
    # and along random directions through all P parameters at once
    for _ in range(2):
        v = rng.standard_normal(p.size)
        p0 = p.copy()
        p[...] = p0 + H_FD * v
        fp = f()
        p[...] = p0 - H_FD * v
        fm = f()
        p[...] = p0
        assert rel_error(np.array([grad @ v]), np.array([(fp - fm) / (2 * H_FD)])) <= FD_TOL


def test_functional_entry_points_equal_methods():
    net, p = _net(True)
    sx, sy, qx, qy = _episode(1, seed=3)
    a = episode_loss_and_grad(net, p, sx, sy, qx, qy, N_WAY)
    b = net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY)
    assert a[0] == b[0] and a[2] == b[2]
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(predict(net, p, sx, sy, qx, N_WAY)[0],
                                  net.predict(p, sx, sy, qx, N_WAY)[0])


# ------------------------------------------------------------------ forward vs the formulas
def _embed(net, p, x):
    """The shared Conv-4 on (T, n, 8, 8, 1) -> (T, n, E), through the Model directly."""
    theta = np.repeat(p[None, :net.num_emb], x.shape[0], axis=0)
    return net.model.forward(theta, x)[0]


def _similarity(f, g, form):
    """The three forms written plainly: f (T, Q, E), g (T, M, E) -> (T, Q, M)."""
    sim, scale, _ = form
    gn = g / np.linalg.norm(g, axis=-1, keepdims=True)
    if sim == "support_cosine":                              # f . g / |g|
        return np.einsum("tqe,tme->tqm", f, gn)
    fn = f / np.linalg.norm(f, axis=-1, keepdims=True)
    cos = np.einsum("tqe,tme->tqm", fn, gn)                  # (T, Q, M)
    return cos if sim == "cosine" else scale * cos


def _cosine_attention_log_yhat(f, g, sy, form=FORMS[1]):
    """Vinyals et al. eq. 1-2 written plainly: a = softmax_i c(f, g_i), y_hat = sum a_i y_i."""
    c = _similarity(f, g, form)
    a = np.exp(c) / np.exp(c).sum(axis=-1, keepdims=True)
    y_onehot = np.eye(N_WAY)[sy]                             # (T, M, N)
    return np.log(np.einsum("tqm,tmn->tqn", a, y_onehot))    # (T, Q, N)


@pytest.mark.parametrize("form", FORMS, ids=FORM_IDS)
def test_prediction_without_fce_is_the_attention_formula(form):
    net, p = _net(False, form=form)
    sx, sy, qx, qy = _episode(2, seed=4)
    # the same batch (supports then queries) as the model sees, for the same BN statistics
    emb = _embed(net, p, np.concatenate([sx, qx], axis=1))
    M = sx.shape[1]
    if net.learn_scale:                                      # the parameter's current value
        form = (form[0], float(p[net.layout.slice("scale")][0]), True)
    want = _cosine_attention_log_yhat(emb[:, M:], emb[:, :M], sy, form)
    logp, pred = net.predict(p, sx, sy, qx, N_WAY, bn="batch")
    assert rel_error(logp, want) <= 1e-13
    np.testing.assert_array_equal(pred, want.argmax(axis=-1))
    np.testing.assert_allclose(np.exp(logp).sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    loss, _, acc = net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY)
    assert abs(loss + np.take_along_axis(want, qy[..., None], -1).mean()) <= 1e-14
    assert acc == (want.argmax(-1) == qy).mean()


def test_symmetric_cosine_caps_the_attention_and_support_cosine_does_not():
    """With the symmetric cosine, 5 supports and one query, no support gets more than
    e / (e + 4/e) ~ 0.65 of the attention (the loss floor of issue 16); dividing by the
    support norms only lets a long query sharpen the softmax past that."""
    rng = np.random.default_rng(3)
    g = rng.standard_normal((1, 5, 4))
    f = 50.0 * g[:, :1]                                      # the query along support 0
    cap = np.e / (np.e + 4 / np.e)
    for form, below in ((FORMS[1], True), (FORMS[0], False)):
        c = _similarity(f, g, form)
        a = np.exp(c - c.max()) / np.exp(c - c.max()).sum()
        assert (a.max() <= cap + 1e-12) == below
    # and no underflow: a class whose similarities are all far below the best one still
    # gets a finite log-probability
    net, p = _net(False)
    sx, sy, qx, qy = _episode(1, seed=4)
    logp, _ = net.predict(1e3 * p, sx, sy, qx, N_WAY, bn="batch")
    assert np.isfinite(logp).all()


def test_fce_forward_is_the_appendix_formula():
    """g = h_fwd + h_bwd + g', f = h_K of the attention LSTM, rebuilt from the reference LSTM
    one sequence and one step at a time."""
    K = 4
    net, p = _net(True, K=K, form=FORMS[1])
    sx, sy, qx, qy = _episode(2, seed=5)
    v = net.views(p)
    emb = _embed(net, p, np.concatenate([sx, qx], axis=1))
    M, E = sx.shape[1], net.dim
    gp, fp = emb[:, :M], emb[:, M:]
    T, Q = fp.shape[:2]
    want = np.empty((T, Q, N_WAY))
    z = np.zeros(E)
    for t in range(T):
        hf, _, _ = RL.lstm_forward_one(gp[t], z, z, v["g_fwd.W"], v["g_fwd.b"])
        hb, _, _ = RL.lstm_forward_one(gp[t][::-1], z, z, v["g_bwd.W"], v["g_bwd.b"])
        g = gp[t] + hf + hb[::-1]                           # (M, E)
        f = np.empty((Q, E))
        for q in range(Q):
            h, c = np.zeros(E), np.zeros(E)
            for _ in range(K):
                s = g @ h
                a = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                r = a @ g                                    # readout r_{k-1}
                # the LSTM's input [f', r] and state h_{k-1}: one step of the reference
                hs, _, c = RL.lstm_forward_one(np.concatenate([fp[t, q], r])[None], h, c,
                                               v["f_att.W"], v["f_att.b"])
                h = hs[0] + fp[t, q]
            f[q] = h
        want[t] = _cosine_attention_log_yhat(f[None], g[None], sy[t:t + 1])[0]
    logp, _ = net.predict(p, sx, sy, qx, N_WAY, bn="batch")
    assert rel_error(logp, want) <= 1e-12


# ------------------------------------------------------------------ BN: no leak across queries
def _warm_running_stats(net, p, seed):
    for s in range(3):
        sx, sy, qx, qy = _episode(1, seed=seed + s)
        net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY, update_bn_stats=True)


@pytest.mark.parametrize("fce", [False, True])
def test_queries_are_independent_with_running_statistics(fce):
    net, p = _net(fce)
    _warm_running_stats(net, p, seed=20)
    for _, layer in net.model.batchnorm_layers():       # the stats really moved off (0, 1)
        assert np.abs(layer.running_mean).max() > 1e-3
    sx, sy, qx, qy = _episode(1, seed=6, q_per=3)
    logp, _ = net.predict(p, sx, sy, qx, N_WAY)          # default: bn='running'
    rng = np.random.default_rng(7)
    for j in range(qx.shape[1]):
        alone, _ = net.predict(p, sx, sy, qx[:, j:j + 1], N_WAY)
        others = rng.standard_normal((1, 4,) + qx.shape[2:]) * 3.0 + 1.0
        mixed, _ = net.predict(p, sx, sy, np.concatenate([others[:, :2], qx[:, j:j + 1],
                                                          others[:, 2:]], axis=1), N_WAY)
        np.testing.assert_allclose(alone[0, 0], logp[0, j], rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(mixed[0, 2], logp[0, j], rtol=1e-12, atol=1e-13)
    # batch statistics do leak (the test above can fail): the same query, other company
    b1, _ = net.predict(p, sx, sy, qx, N_WAY, bn="batch")
    b2, _ = net.predict(p, sx, sy, np.concatenate([qx[:, :1], others], axis=1), N_WAY,
                        bn="batch")
    assert np.abs(b1[0, 0] - b2[0, 0]).max() > 1e-6
    # predict restored the training mode
    assert all(layer.mode == "batch" for _, layer in net.model.batchnorm_layers())


def test_update_bn_stats_moves_running_statistics_only_when_asked():
    net, p = _net(False)
    sx, sy, qx, qy = _episode(1, seed=8)
    before = net.model.buffers()
    net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY)
    for k, val in net.model.buffers().items():
        np.testing.assert_array_equal(val, before[k])
    net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY, update_bn_stats=True)
    assert any(np.abs(val - before[k]).max() > 0 for k, val in net.model.buffers().items())


# ------------------------------------------------------------------ dtype, layout, errors
@pytest.mark.parametrize("fce", [False, True])
def test_float32_preserved_and_close_to_float64(fce):
    net, p = _net(fce)
    sx, sy, qx, qy = _episode(1, seed=9)
    l64, g64, _ = net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY)
    f32 = [a.astype(np.float32) for a in (p, sx, qx)]
    l32, g32, _ = net.episode_loss_and_grad(f32[0], f32[1], sy, f32[2], qy, N_WAY)
    assert g32.dtype == np.float32
    logp, _ = net.predict(f32[0], f32[1], sy, f32[2], N_WAY, bn="batch")
    assert logp.dtype == np.float32
    # a few hundred float32 operations in sequence, normwise: 1e-4 ~ 800 eps32
    assert abs(l32 - l64) <= 1e-5 * abs(l64)
    assert rel_error(g32, g64) <= 1e-4


def test_layout_names_and_sizes():
    net, p = _net(True)
    E = net.dim
    assert E == 12 and net.num_emb == net.model.num_params
    assert net.layout.names[:net.layout.names.index("g_fwd.W")] == \
        ["emb." + n for n in net.model.layout.names]
    v = net.views(p)
    assert v["g_fwd.W"].shape == (2 * E, 4 * E) and v["f_att.W"].shape == (3 * E, 4 * E)
    assert v["f_att.b"].shape == (4 * E,)
    v["f_att.b"][0] = 123.0                                 # views write through
    assert p[net.layout.slice("f_att.b")][0] == 123.0
    assert _net(False)[0].num_params == net.num_emb


def test_bad_input_is_named():
    net, p = _net(False)
    sx, sy, qx, qy = _episode(1, seed=10)
    f = net.episode_loss_and_grad
    op = "MatchingNet.episode_loss_and_grad"
    no_class = sy.copy()
    no_class[no_class == 2] = 0
    with pytest.raises(ValueError, match=f"{op}: task 0 has no support example of class 2"):
        f(p, sx, no_class, qx, qy, N_WAY)
    with pytest.raises(ValueError, match=f"{op}: support_y has value 3, must be < 3"):
        f(p, sx, sy + 1, qx, qy, N_WAY)
    with pytest.raises(ValueError, match=rf"{op}: params must have shape \({p.size}\)"):
        f(p[:-1], sx, sy, qx, qy, N_WAY)
    with pytest.raises(TypeError, match=f"{op}: support_x has dtype float32, expected float64"):
        f(p, sx.astype(np.float32), sy, qx, qy, N_WAY)
    with pytest.raises(ValueError, match=rf"{op}: query_y must have shape \(1, 6\)"):
        f(p, sx, sy, qx, qy[:, :5], N_WAY)
    with pytest.raises(ValueError, match=rf"{op}: query_x must have shape \(1, \*, 8, 8, 1\)"):
        f(p, sx, sy, qx[..., :7, :], qy, N_WAY)
    with pytest.raises(ValueError, match=f"{op}: n_way must be an int >= 1"):
        f(p, sx, sy, qx, qy, 0)
    with pytest.raises(ValueError, match="MatchingNet.predict: bn must be 'running' or 'batch'"):
        net.predict(p, sx, sy, qx, N_WAY, bn="train")
    with pytest.raises(ValueError, match="MatchingNet: read_steps must be an int >= 1"):
        MatchingNet(net.model, fce=True, read_steps=0)


def test_similarity_settings_are_checked_and_the_learned_scale_is_a_parameter():
    emb = conv4_protonet(image_shape=(8, 8, 1), channels=3, depth=2)
    with pytest.raises(ValueError, match="MatchingNet: similarity must be one of"):
        MatchingNet(emb, similarity="dot")
    with pytest.raises(ValueError, match="MatchingNet: cosine_scale must be a finite number"):
        MatchingNet(emb, similarity="scaled_cosine", cosine_scale=0.0)
    with pytest.raises(ValueError, match="learn_scale applies to similarity='scaled_cosine'"):
        MatchingNet(emb, learn_scale=True)
    with pytest.raises(TypeError, match="MatchingNet: learn_scale must be a bool"):
        MatchingNet(emb, similarity="scaled_cosine", learn_scale=1)
    assert MatchingNet(emb).similarity == "support_cosine"            # the default
    net, p = _net(True, form=FORMS[3])
    assert net.layout.names[-1] == "scale" and net.num_params == _net(True)[0].num_params + 1
    assert net.init_params(np.random.default_rng(0))[-1] == 3.0       # starts at cosine_scale
    # the learned scale at s equals the fixed scale s
    fixed, pf = _net(True, form=("scaled_cosine", float(p[-1]), False))
    sx, sy, qx, qy = _episode(1, seed=11)
    a = net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY)
    b = fixed.episode_loss_and_grad(p[:-1], sx, sy, qx, qy, N_WAY)
    assert abs(a[0] - b[0]) <= 1e-14 and rel_error(a[1][:-1], b[1]) <= 1e-13


@pytest.mark.parametrize("form", FORMS[1:], ids=FORM_IDS[1:])
def test_float32_other_forms(form):
    net, p = _net(False, form=form)
    sx, sy, qx, qy = _episode(1, seed=9)
    l64, g64, _ = net.episode_loss_and_grad(p, sx, sy, qx, qy, N_WAY)
    f32 = [a.astype(np.float32) for a in (p, sx, qx)]
    l32, g32, _ = net.episode_loss_and_grad(f32[0], f32[1], sy, f32[2], qy, N_WAY)
    assert g32.dtype == np.float32
    assert abs(l32 - l64) <= 1e-5 * abs(l64) and rel_error(g32, g64) <= 1e-4
