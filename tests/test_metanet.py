"""Meta Networks (metacore.algorithms.metanet, metacore.methods.metanet): the whole-episode
outer gradient against float64 central finite differences, exact second order and the
authors' first-order variant; the forward pass against independent computations; query
independence; the gradient preprocessing; bad input; the trainer (exact resume) and eval.

Tiny sizes: 6x6 images, one conv block of 2 channels (flatten 3*3*2 = 18), key 3, hidden 4,
3-way 1-shot, 2 queries per class, LSTM 3 units, MLP 4 units.
"""
import math

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
from metacore.algorithms.metanet import MetaNet, preprocess, preprocess_backward
from metacore.gradcheck import numerical_directional, numerical_gradient_at, rel_error
from metacore.layers import conv2d as cv
from metacore.layers import linear as ln
from metacore.layers import maxpool as mp

WAY, Q_PER, IMG = 3, 2, (6, 6, 1)
READOUTS = ("d.wo", "m.w3")


def _net(steps=None):
    return MetaNet(WAY, image_shape=IMG, channels=2, depth=1, key_dim=3, hidden=4,
                   lstm_hidden=3, mlp_hidden=4, steps=steps, backend="reference")


def _setup(seed, net=None):
    """Parameters off their initial values, and read-outs of order 1 so that the fast weights
    (and the second-order terms) are not negligible."""
    net = net or _net()
    rng = np.random.default_rng(seed)
    p = net.init_params(rng)
    p += 0.1 * rng.standard_normal(p.shape)
    for name in READOUTS:
        sl = net.layout.slice(name)
        p[sl] = rng.standard_normal(sl.stop - sl.start)
    sx = rng.random((WAY,) + IMG)                                   # (N, 6, 6, 1)
    qx = rng.random((WAY * Q_PER,) + IMG)                           # (L, 6, 6, 1)
    sy = rng.permutation(WAY)
    qy = np.repeat(np.arange(WAY), Q_PER)
    return net, p, sx, sy, qx, qy


@pytest.mark.parametrize("seed", [2, 3])
def test_second_order_gradient_matches_finite_differences(seed):
    net, p, sx, sy, qx, qy = _setup(seed)
    _, g, _, _ = net.loss_and_grad(p, sx, sy, qx, qy, second_order=True)
    f = lambda: net.loss(p, sx, sy, qx, qy)                          # noqa: E731
    rng = np.random.default_rng(seed)
    idx = []
    for name in net.layout.names:                                   # 6 coordinates per block
        sl = net.layout.slice(name)
        n = sl.stop - sl.start
        idx += list(sl.start + rng.choice(n, min(6, n), replace=False))
    num = numerical_gradient_at(f, p, idx)
    assert rel_error(g[idx], num) < 1e-7
    for name in net.layout.names:                                   # every block, all of it
        sl = net.layout.slice(name)
        v = np.zeros_like(p)
        v[sl] = rng.standard_normal(sl.stop - sl.start)
        assert rel_error(g @ v, numerical_directional(f, p, v)) < 1e-6, name


@pytest.mark.parametrize("seed", [2, 3])
def test_first_order_variant_is_the_gradient_with_support_gradients_frozen(seed):
    """First order (the default, the authors' code): at p, the gradient of the surrogate
    theta -> L(theta; g^u(p), g^b(p)), the meta-information held at its value at p."""
    net, p, sx, sy, qx, qy = _setup(seed)
    _, g2, _, _ = net.loss_and_grad(p, sx, sy, qx, qy, second_order=True)
    _, g1, _, frozen = net.loss_and_grad(p, sx, sy, qx, qy)
    assert np.array_equal(g1, net.loss_and_grad(p, sx, sy, qx, qy, second_order=False)[1])
    f1 = lambda: net.loss(p, sx, sy, qx, qy, frozen=frozen)         # noqa: E731
    f2 = lambda: net.loss(p, sx, sy, qx, qy)                        # noqa: E731
    assert f1() == f2()                  # at p the surrogate is the loss itself
    rng = np.random.default_rng(seed)
    idx = []
    for name in net.layout.names:                                   # 6 coordinates per block
        sl = net.layout.slice(name)
        n = sl.stop - sl.start
        idx += list(sl.start + rng.choice(n, min(6, n), replace=False))
    assert rel_error(g1[idx], numerical_gradient_at(f1, p, idx)) < 1e-7
    for name in net.layout.names:
        sl = net.layout.slice(name)
        v = np.zeros_like(p)
        v[sl] = rng.standard_normal(sl.stop - sl.start)
        assert rel_error(g1 @ v, numerical_directional(f1, p, v)) < 1e-6, name
        if name in ("u", "b"):   # the HVP terms: the first-order gradient misses them
            assert rel_error(g1 @ v, numerical_directional(f2, p, v)) > 1e-3, name
            assert rel_error(g1[sl], g2[sl]) > 1e-3, name
        else:                    # the generators' own parameters: identical
            assert np.array_equal(g1[sl], g2[sl]), name


def test_steps_group_supports_and_the_gradient_still_matches():
    net = _net(steps=1)
    _, p, sx, sy, qx, qy = _setup(2, net)
    _, g, _, (gQ, _) = net.loss_and_grad(p, sx, sy, qx, qy, second_order=True)
    assert gQ.shape == (1, len(net.u_idx))                          # one chunk of 3 supports
    rng = np.random.default_rng(1)
    v = rng.standard_normal(p.shape)
    num = numerical_directional(lambda: net.loss(p, sx, sy, qx, qy), p, v)
    assert rel_error(g @ v, num) < 1e-6


def _zero_generators(net, p, const_u=0.0, const_b=0.0):
    """Read-outs of d and m set to zero, biases to the constants: every fast weight of u is
    const_u and every fast weight of b is const_b."""
    p = p.copy()
    for name in ("d.wo", "m.w3"):
        p[net.layout.slice(name)] = 0.0
    p[net.layout.slice("d.bo")] = const_u
    p[net.layout.slice("m.b3")] = const_b
    return p


def test_zero_fast_weights_give_the_slow_base_learner():
    net, p, sx, sy, qx, qy = _setup(4)
    p = _zero_generators(net, p)
    z = net.predict(p, sx, sy, qx)
    theta = p[net.layout.slice("b")]
    slow, _ = net.b.forward(np.tile(theta, (len(qx), 1)), qx[:, None])  # (L, 1, K)
    assert np.allclose(z, slow[:, 0], rtol=1e-12, atol=1e-12)


def test_constant_fast_weights_against_a_direct_computation():
    """Every fast weight of b equal to c: the layer-augmented base learner written out here
    with the layer functions (relu(slow) + relu(fast) in hidden layers, slow + fast at the
    logits), independently of aug_forward's bookkeeping."""
    net, p, sx, sy, qx, qy = _setup(5)
    c = 0.3
    p = _zero_generators(net, p, const_u=-0.2, const_b=c)
    z = net.predict(p, sx, sy, qx)
    v = net.b.layout.views(p[net.layout.slice("b")][None])
    names = net.b.layer_names                 # conv, relu, pool, flatten, fc1, relu, fc2
    relu = lambda a: np.maximum(a, 0.0)                              # noqa: E731
    for j in range(len(qx)):
        x = qx[j][None, None]                                       # (1, 1, 6, 6, 1)
        w, b = v[f"{names[0]}.w"], v[f"{names[0]}.b"]
        h = relu(cv.conv2d_forward(x, w, b)[0]) + relu(
            cv.conv2d_forward(x, np.full_like(w, c), np.zeros_like(b))[0])
        h = mp.maxpool_forward(h)[0].reshape(1, 1, -1)              # (1, 1, 18)
        w, b = v[f"{names[4]}.w"], v[f"{names[4]}.b"]
        h = relu(ln.linear_forward(h, w, b)[0]) + relu(
            ln.linear_forward(h, np.full_like(w, c), np.zeros_like(b))[0])
        w, b = v[f"{names[6]}.w"], v[f"{names[6]}.b"]
        out = ln.linear_forward(h, w, b)[0] + ln.linear_forward(h, np.full_like(w, c),
                                                               np.zeros_like(b))[0]
        assert np.allclose(z[j], out[0, 0], rtol=1e-12, atol=1e-12)


def test_attention_reads_memory_by_cosine_softmax():
    """With fast weights of u zero, a query equal to support i has cosine 1 with key i; the
    read weights are softmax(cos), so a query that duplicates a support reads mostly its
    slot. Checked through the logits: the result equals b with W* = sum_i a_i M_i computed
    here from the keys."""
    net, p, sx, sy, qx, qy = _setup(6)
    p = _zero_generators(net, p)
    sl = net.layout.slice("m.w3")
    p[sl] = np.random.default_rng(0).standard_normal(sl.stop - sl.start)
    qx = np.concatenate([sx[:1], qx[:2]])                            # query 0 = support 0
    _, cache = net._forward(p, sx, sy, qx)
    R, rq = cache["R"][0], cache["rq"][0]                           # (N, E), (L, E)
    cos = (rq @ R.T) / np.outer(np.linalg.norm(rq, axis=1), np.linalg.norm(R, axis=1))
    assert cos[0, 0] == pytest.approx(1.0, abs=1e-12)
    a = np.exp(cos) / np.exp(cos).sum(axis=1, keepdims=True)
    assert np.allclose(cache["att"], a, rtol=1e-12, atol=1e-14)
    assert a[0].argmax() == 0


def test_each_query_is_classified_alone():
    net, p, sx, sy, qx, qy = _setup(7)
    z = net.predict(p, sx, sy, qx)
    for j in range(len(qx)):
        zj = net.predict(p, sx, sy, qx[j:j + 1])
        assert np.allclose(zj[0], z[j], rtol=1e-12, atol=1e-13)


def test_preprocess_values_and_derivative():
    k = 7.0
    g = np.array([0.5, -2e-3, 1e-4, -1e-5, 0.0, 3.0])
    x, big = preprocess(g, k)
    assert big.tolist() == [True, True, False, False, False, True]
    assert np.allclose(x[big, 0], np.log(np.abs(g[big])) / k)
    assert np.array_equal(x[big, 1], np.sign(g[big]))
    assert np.array_equal(x[~big, 0], -np.ones(3))
    assert np.allclose(x[~big, 1], math.exp(k) * g[~big])
    dx = np.random.default_rng(0).standard_normal(x.shape)
    dg = preprocess_backward(dx, g, big, k)
    num = numerical_gradient_at(lambda: float((preprocess(g, k)[0] * dx).sum()), g,
                                range(g.size), h=1e-9)
    assert rel_error(dg, num) < 1e-6


def test_bad_input():
    net, p, sx, sy, qx, qy = _setup(0)
    with pytest.raises(ValueError, match="support_x"):
        net.loss_and_grad(p, sx[:, :5], sy, qx, qy)
    with pytest.raises(ValueError, match="support_y"):
        net.loss_and_grad(p, sx, sy + 1, qx, qy)
    with pytest.raises(ValueError, match="query_y"):
        net.loss_and_grad(p, sx, sy, qx, qy[:-1])
    with pytest.raises(TypeError, match="query_x"):
        net.loss_and_grad(p, sx, sy, qx.astype(np.float32), qy)
    with pytest.raises(ValueError, match="params"):
        net.loss_and_grad(p[:-1], sx, sy, qx, qy)
    with pytest.raises(ValueError, match="steps = 2 must divide"):
        _net(steps=2).loss(p, sx, sy, qx, qy)
    with pytest.raises(ValueError, match="channels must be a positive int"):
        MetaNet(WAY, channels=0)


# ------------------------------------------------------------------ through the trainer
def _cfg(out, **over):
    from metacore.training import make_config
    base = dict(iterations=4, eval_every=2, log_every=1, ckpt_every=2, eval_tasks=3,
                channels=2, key_dim=4, hidden=4, lstm_hidden=3, mlp_hidden=3, queries=1,
                backend="reference", seed=5)
    base.update(over)
    return make_config("metanet", "omniglot", out, **base)


def test_trainer_resume_is_bit_identical(tmp_path):
    from metacore.training import Trainer
    full = Trainer(_cfg(tmp_path / "full"), progress=False)
    full.train()
    half = Trainer(_cfg(tmp_path / "half", iterations=2), progress=False)
    half.train()
    rest = Trainer(_cfg(tmp_path / "half"), resume=True, progress=False)
    assert rest.step == 2
    rest.train()
    assert full.params.tobytes() == rest.params.tobytes()
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in __import__("json").loads(s).items()  # noqa: E731
                            if k != "elapsed_s"} for s in lines]
    assert strip(a) == strip(b)


def test_evaluate_and_config_errors(tmp_path):
    from metacore.training import build_method
    cfg = _cfg(tmp_path)
    m = build_method(cfg)
    params = m.init_params(m.rng)
    r = m.evaluate(params, dict(tasks=4, steps=10, shots=None, way=None, seed=1, bn=None,
                                inner_lr=None))
    assert r["episodes"] == 4 and len(r["per_episode"]) == 4
    assert r["accuracy"] == pytest.approx(np.mean(r["per_episode"]))
    assert r["ci95"] == pytest.approx(1.96 * np.std(r["per_episode"]) / 2.0)
    assert "4 test episodes" in m.format_result(r)
    with pytest.raises(ValueError, match="--bn does not apply"):
        m.evaluate(params, dict(tasks=4, bn="running"))
    with pytest.raises(ValueError, match="way 3 needs a model trained for it"):
        m.evaluate(params, dict(tasks=4, way=3))
    with pytest.raises(ValueError, match="steps must be None or a positive divisor"):
        _cfg(tmp_path / "x", steps=2)
    with pytest.raises(ValueError, match="second_order must be true or false"):
        _cfg(tmp_path / "x", second_order="yes")


def test_method_gradient_averages_episodes_and_clips_the_norm(tmp_path):
    from metacore.training import build_method
    m = build_method(_cfg(tmp_path, meta_batch=2, dtype="float64"))
    params = m.init_params(m.rng)
    batch = m.sample()
    g, info = m.gradient(params, batch)
    L = batch[3].shape[1]                 # query_loss "sum": L times the mean's gradient
    parts = [L * m.net.loss_and_grad(params, *(a[t] for a in batch))[1] for t in range(2)]
    want = (parts[0] + parts[1]) / 2
    assert info["grad_norm"] == pytest.approx(np.linalg.norm(want), rel=1e-12)
    if info["grad_norm"] > 10.0:
        want *= 10.0 / info["grad_norm"]
    assert np.allclose(g, want, rtol=1e-12, atol=0)
    small = build_method(_cfg(tmp_path / "c", meta_batch=2, dtype="float64", clip_norm=1e-3))
    g2, info2 = small.gradient(params, batch)
    assert info2["grad_norm"] == pytest.approx(info["grad_norm"], rel=1e-12)
    assert np.linalg.norm(g2) == pytest.approx(1e-3, rel=1e-9)


def test_query_loss_mean_is_the_sum_over_the_number_of_queries(tmp_path):
    from metacore.training import build_method
    m_sum = build_method(_cfg(tmp_path / "s", dtype="float64", clip_norm=0.0, queries=2))
    m_mean = build_method(_cfg(tmp_path / "m", dtype="float64", clip_norm=0.0, queries=2,
                               query_loss="mean"))
    params = m_sum.init_params(m_sum.rng)
    batch = m_sum.sample()
    gs, info_s = m_sum.gradient(params, batch)
    gm, info_m = m_mean.gradient(params, batch)
    assert np.allclose(gs, 5 * 2 * gm, rtol=1e-12, atol=0)          # 5 classes x 2 queries
    assert info_s["loss"] == info_m["loss"]                         # logged: the mean
    with pytest.raises(ValueError, match="query_loss must be 'sum' or 'mean'"):
        _cfg(tmp_path / "x", query_loss="avg")


def test_supports_come_in_a_random_order_with_their_labels(tmp_path):
    """The sampler groups supports by label; sample() shuffles each episode's supports (as the
    authors' generator does) and keeps every image with its label."""
    from metacore.training import build_method
    m = build_method(_cfg(tmp_path, meta_batch=6, dtype="float64"))
    state = m.sampler.rng.bit_generator.state
    ep = m.sampler.sample(6)
    m.sampler.rng.bit_generator.state = state
    sx, sy, qx, qy = m.sample()
    assert np.array_equal(qx, ep.query_x) and np.array_equal(qy, ep.query_y)
    assert any(not np.array_equal(sy[t], np.sort(sy[t])) for t in range(6))
    for t in range(6):
        for i in range(sy.shape[1]):
            j = int(np.flatnonzero(ep.support_y[t] == sy[t, i])[0])   # 1-shot: one per label
            assert np.array_equal(sx[t, i], ep.support_x[t, j])


# ------------------------------------------------------------------ defaults and their sources
AUTHORS_SETTINGS = {   # setting: (value, words its source must contain)
    "n_way": (5, "n_outputs_train = n_outputs_test = 5"),
    "shots": (1, "nb_samples_per_class = 1"),
    "queries": (10, "nb_samples_per_class_train = nb_samples_per_class_test = 10"),
    "meta_batch": (1, "batch_size = 1"),
    "channels": (64, "Block(64, 3)"),
    "key_dim": (64, "key_fc1 = Linear(64, 64)"),
    "hidden": (64, "fc1 = Linear(64, 64)"),
    "lstm_hidden": (20, "LSTM(2, 20)"),
    "mlp_hidden": (20, "m_ll1 = Linear(20, 20)"),
    "steps": (5, "IT = 5"),
    "preproc_k": (7.0, "k=7"),
    "second_order": (False, "first order"),
    "query_loss": ("sum", "x_loss +="),
    "clip_norm": (10.0, "GradientClipping(10)"),
    "outer_opt": ("adam", "optimizers.Adam(alpha=0.001, beta1=0.9, beta2=0.999"),
    "outer_lr": (1e-3, "alpha=0.001"),
    "dtype": ("float32", "float32"),
}
METACORE_CHOICES = {   # not the paper's or the authors' value: the source says why
    "depth": (4, "not the paper's and MetaNetFull.py's 5"),
    "iterations": (40000, "not stated in the paper"),
    "eval_every": (500, "not stated in the paper"),
    "eval_tasks": (100, "not stated in the paper"),
    "seed": (0, "not stated in the paper"),
    "lr_halve_every": (0, "no schedule"),
    "outer_lr_final": (None, "no schedule"),
    "log_every": (50, "metacore:"),
    "ckpt_every": (100, "metacore:"),
    "backend": ("auto", "metacore:"),
}


def test_every_default_is_pinned_to_its_source(tmp_path):
    from metacore.methods import default_sources, paper_defaults
    from metacore.methods.metanet import SOURCES
    cfg = paper_defaults("metanet", "omniglot")
    src = default_sources("metanet", "omniglot")
    assert src == SOURCES["omniglot"]
    for key, (value, words) in AUTHORS_SETTINGS.items():
        assert cfg[key] == value, (key, cfg[key])
        assert words in src[key] and not src[key].startswith("metacore:"), (key, src[key])
        assert "tsendeemts/metanet" in src[key], key
    for key, (value, words) in METACORE_CHOICES.items():
        assert cfg[key] == value, (key, cfg[key])
        assert src[key].startswith("metacore:") and words in src[key], (key, src[key])
    assert set(cfg) == set(AUTHORS_SETTINGS) | set(METACORE_CHOICES)   # none left unsourced
    assert "98.95" in src["n_way"]


def test_show_config_prints_the_sources(tmp_path, capsys):
    from metacore.cli import main
    out = tmp_path / "run"
    assert main(["train", "metanet", "--task", "omniglot", "--out", str(out),
                 "--show-config"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert not out.exists()
    assert "paper: " in lines["second_order"] and " false " in lines["second_order"]
    assert "GradientClipping(10)" in lines["clip_norm"]
    assert "paper: " not in lines["depth"] and "metacore: 4 conv blocks" in lines["depth"]
