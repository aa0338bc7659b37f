"""MANN (metacore.algorithms.mann, metacore.methods.mann): the whole-episode gradient through
controller, keys, gates and memory against float64 central finite differences at tiny sizes,
the backends against each other, the label-one-step-late wiring, accuracy by instance,
the 20 x 20 resampling, the episode source, bad input, and exact resume through the trainer.

Shape letters: T steps, B episodes, D features, N classes, P parameters.

Finite differences only hold away from a switch of the least-used selection (see
tests/test_lrua.py); `margin` measures every usage vector of the forward pass and the
gradient test asserts it before trusting the differences.
"""
import json

import numpy as np
import pytest

import metacore  # noqa: F401
from metacore import gradcheck
from metacore.algorithms.mann import MANN, accuracy_by_instance, instance_index
from metacore.kernels import lrua

BACKENDS = ["reference"] + (["numba"] if "numba" in lrua.available_backends() else [])
TINY = dict(d_in=6, n_way=3, hidden=4, heads=2, slots=5, width=3, gamma=0.9)


def tiny_problem(seed, T=7, B=2, dtype=np.float64, **sizes):
    model = MANN(**{**TINY, **sizes})
    rng = np.random.default_rng(seed)
    theta = model.init_params(rng, dtype)
    theta += (0.3 * rng.standard_normal(theta.shape)).astype(dtype)  # away from the init
    x = rng.standard_normal((T, B, model.d_in)).astype(dtype)        # (T, B, D)
    y = rng.integers(0, model.n_way, (T, B))                         # (T, B)
    return model, theta, x, y


def margin(model, cache):
    """Smallest gap between consecutive sorted usages at the positions 0..n that select
    something (the argmin, each head's own slot under "per_head", the n-th smallest under
    "shared"), over every usage vector w_u_{t-1} of the forward pass."""
    us = np.stack([s[4][2] for s in cache[3]]).astype(np.float64)    # (T, B, S)
    s = np.sort(us, axis=-1)
    top = min(model.heads, model.slots - 1)
    return float(np.diff(s[..., :top + 1], axis=-1).min())


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed, sizes", [(0, {}), (1, dict(heads=1, slots=3, n_way=2)),
                                         (2, dict(heads=3, slots=4, width=2))])
def test_episode_gradient_matches_finite_differences(backend, seed, sizes):
    model, theta, x, y = tiny_problem(seed, **sizes)
    logits, cache = model.forward(theta, x, y, backend)
    assert margin(model, cache) > 1e-4
    loss, _, grad = model.loss_grad(theta, x, y, backend)

    def f():
        return model.loss(model.forward(theta, x, y, backend)[0], y)[0]

    _check_blocks(model, theta, grad, f, np.random.default_rng(seed), nonzero_blocks=True)


def _check_blocks(model, theta, grad, f, rng, nonzero_blocks=False):
    """Central differences of f against grad: every entry of the small blocks, 10 random
    entries of each larger one (the whole vector is ~400 entries; all of them take several
    times as long and were checked once); rel_error <= 1e-7 per block."""
    for name in model.layout.names:
        sl = model.layout.slice(name)
        idx = np.arange(sl.start, sl.stop)
        if idx.size > 10:
            idx = np.sort(rng.choice(idx, 10, replace=False))
        num = gradcheck.numerical_gradient_at(f, theta, idx)
        if nonzero_blocks:
            assert np.abs(grad[sl]).max() > 1e-4, f"d{name} is ~0: a check that cannot fail"
        assert np.abs(num).max() > 1e-6, f"{name}: the sampled entries have ~0 gradient"
        err = gradcheck.rel_error(grad[idx], num)
        assert err <= 1e-7, f"d{name}: rel_error {err:.3g}"


@pytest.mark.parametrize("write_rule, add_vector", [("shared", False), ("per_head", True),
                                                    ("shared", True)])
def test_memory_settings_gradient_matches_finite_differences(write_rule, add_vector):
    """The other write rule and the separate add vector (the default per_head without it is
    above): every parameter block, 10 sampled entries each, float64, rel_error <= 1e-7."""
    model, theta, x, y = tiny_problem(8, heads=3, slots=6, write_rule=write_rule,
                                      add_vector=add_vector)
    assert ("add_W" in model.layout.names) == add_vector
    logits, cache = model.forward(theta, x, y, "reference")
    assert margin(model, cache) > 1e-4
    grad = model.loss_grad(theta, x, y, "reference")[2]

    def f():
        return model.loss(model.forward(theta, x, y, "reference")[0], y)[0]

    _check_blocks(model, theta, grad, f, np.random.default_rng(8))


def test_write_rules_differ_and_default_is_per_head():
    """With 3 heads the two rules write different memories (shared: every head into all 3
    least-used slots), so the logits differ; the default is per_head, no add vector."""
    assert MANN(d_in=4).write_rule == "per_head" and MANN(d_in=4).add_vector is False
    model, theta, x, y = tiny_problem(9, heads=3, slots=6)
    other = MANN(**{**TINY, "heads": 3, "slots": 6, "write_rule": "shared"})
    a = model.forward(theta, x, y, "reference")[0]
    b = other.forward(theta, x, y, "reference")[0]
    assert np.abs(a - b).max() > 1e-3
    with pytest.raises(ValueError, match="MANN: write_rule must be one of"):
        MANN(d_in=4, write_rule="per-head")


@pytest.mark.skipif(len(BACKENDS) < 2, reason="numba not installed")
def test_backends_agree_with_add_vector_and_both_rules():
    for rule in ("shared", "per_head"):
        model, theta, x, y = tiny_problem(10, T=6, B=3, heads=3, slots=7, width=4,
                                          write_rule=rule, add_vector=True)
        ref = model.loss_grad(theta, x, y, "reference")
        got = model.loss_grad(theta, x, y, "numba")
        assert abs(ref[0] - got[0]) <= 1e-13 * abs(ref[0])
        assert gradcheck.rel_error(got[2], ref[2]) <= 1e-12


@pytest.mark.skipif(len(BACKENDS) < 2, reason="numba not installed")
def test_backends_agree():
    model, theta, x, y = tiny_problem(3, T=9, B=3, slots=7, width=5)
    ref = model.loss_grad(theta, x, y, "reference")
    got = model.loss_grad(theta, x, y, "numba")
    assert abs(ref[0] - got[0]) <= 1e-13 * abs(ref[0])
    np.testing.assert_array_equal(ref[1], got[1])
    assert gradcheck.rel_error(got[2], ref[2]) <= 1e-12


def test_float32_gradient_close_to_float64():
    model, theta, x, y = tiny_problem(4)
    g64 = model.loss_grad(theta, x, y)[2]
    g32 = model.loss_grad(theta.astype(np.float32), x.astype(np.float32), y)[2]
    assert g32.dtype == np.float32
    assert gradcheck.rel_error(g32, g64) <= 1e-4


# ---------------------------------------------------------------- wiring
def test_label_arrives_one_step_late():
    """y_t is the target at step t and an input at t + 1 only: changing it leaves the
    logits of steps 0..t unchanged and changes step t + 1's."""
    model, theta, x, y = tiny_problem(5)
    t = 3
    base = model.forward(theta, x, y)[0]
    y2 = y.copy()
    y2[t] = (y2[t] + 1) % model.n_way
    other = model.forward(theta, x, y2)[0]
    np.testing.assert_array_equal(base[:t + 1], other[:t + 1])
    assert np.abs(base[t + 1] - other[t + 1]).min() > 0


def test_instance_index_and_accuracy_by_instance():
    y = np.array([[0, 1], [1, 1], [0, 0], [0, 1]])                   # (T, B)
    np.testing.assert_array_equal(instance_index(y),
                                  [[1, 1], [1, 2], [2, 1], [3, 3]])
    correct = np.array([[True, False], [False, True], [True, True], [False, True]])
    acc = accuracy_by_instance(correct, y, 4)                        # (B, 4)
    np.testing.assert_array_equal(acc[0, :3], [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(acc[1, :3], [0.5, 1.0, 1.0])
    assert np.isnan(acc[:, 3]).all()


# ---------------------------------------------------------------- data
def test_area_matrix():
    from metacore.methods.mann import area_matrix
    np.testing.assert_array_equal(area_matrix(4, 2), [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    A = area_matrix(28, 20)
    np.testing.assert_allclose(A.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(A.sum(axis=0), 20 / 28, rtol=1e-14)  # every input pixel counted once
    np.testing.assert_allclose(A[0, :2], [1 / 1.4, 0.4 / 1.4], rtol=1e-15)


def _cfg(**over):
    from metacore.training import make_config
    sizes = dict(hidden=4, heads=2, slots=6, width=3, batch=2, eval_tasks=2, log_every=1,
                 eval_every=2, ckpt_every=1, iterations=2, dtype="float64")
    out = over.pop("out", "unused")
    sizes.update(over)
    return make_config("mann", "omniglot", out, **sizes)


def test_episode_source_shapes_labels_and_order():
    from metacore.methods.mann import EpisodeSource
    src = EpisodeSource(_cfg(), "train", seed=3)
    x, y = src.sample(4)
    assert x.shape == (50, 4, 400) and y.shape == (50, 4) and x.dtype == np.float64
    for b in range(4):
        np.testing.assert_array_equal(np.bincount(y[:, b], minlength=5), [10] * 5)
    assert not all((np.diff(y[:, b]) >= 0).all() for b in range(4))  # shuffled
    assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.5
    x2, y2 = EpisodeSource(_cfg(), "train", seed=3).sample(4)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)


# ---------------------------------------------------------------- bad input
def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="MANN: slots = 1 must be >= heads = 2"):
        MANN(d_in=4, heads=2, slots=1)
    with pytest.raises(ValueError, match="MANN: hidden must be a positive int"):
        MANN(d_in=4, hidden=0)
    model, theta, x, y = tiny_problem(7)
    with pytest.raises(ValueError, match="MANN.forward: x"):
        model.forward(theta, x[..., :3], y)
    with pytest.raises(ValueError, match="MANN.forward: y"):
        model.forward(theta, x, y + 5)
    with pytest.raises(TypeError, match="MANN.forward: x has dtype float32"):
        model.forward(theta, x.astype(np.float32), y)
    with pytest.raises(ValueError, match="make_config: instances must be <= 20"):
        _cfg(instances=21)
    with pytest.raises(ValueError, match=r"make_config: backend must be 'auto' or one of "
                                         r"\['cupy', 'numba', 'numba-cuda', 'reference'\]"):
        _cfg(backend="gpu")
    with pytest.raises(ValueError, match="make_config: write_rule must be one of"):
        _cfg(write_rule="lru")
    with pytest.raises(ValueError, match="make_config: add_vector must be true or false"):
        _cfg(add_vector=1)
    with pytest.raises(ValueError, match="backend 'cupy' does not support add_vector=true"):
        _cfg(backend="cupy", add_vector=True)


@pytest.mark.parametrize("name", ["numba-cuda", "cupy"])
def test_device_backend_is_a_setting_and_fails_clearly_without_a_gpu(name):
    """--set backend=numba-cuda / cupy selects the LRUA step pair on the GPU; where it
    cannot run, make_config says so before training starts (with a GPU the setting is
    accepted; tests/test_cuda_gpu.py trains with it)."""
    try:
        lrua.require_backend("test", name)
    except ImportError:
        with pytest.raises(ValueError, match=rf"^make_config: backend {name!r} (cannot run on "
                                             rf"this machine: |needs the package )"):
            _cfg(backend=name)
    else:
        assert _cfg(backend=name)["backend"] == name


# ---------------------------------------------------------------- trainer
def test_paper_protocol_defaults_and_sources():
    from metacore import methods
    cfg = _cfg()
    assert cfg["outer_opt"] == "rmsprop" and cfg["outer_lr"] == 1e-4
    assert cfg["write_rule"] == "per_head" and cfg["add_vector"] is False
    src = methods.default_sources("mann", "omniglot")
    assert "RMSProp" in src["outer_opt"] and "ntm-one-shot" in src["write_rule"]


def test_a_run_from_before_the_memory_settings_reads_back_as_shared(tmp_path):
    """A checkpoint whose config lacks write_rule / add_vector (written before they existed)
    is loaded with the rule it ran, "shared", and resumes without a settings mismatch."""
    from metacore.checkpoint import load_checkpoint, save_checkpoint
    from metacore.training import Trainer, load_run
    out = tmp_path / "old"
    cfg = _cfg(out=str(out), iterations=1, write_rule="shared")
    Trainer(cfg, progress=False).train()
    path = out / "checkpoint.npz"
    arrays, meta = load_checkpoint(str(path))
    for k in ("write_rule", "add_vector"):
        del meta["config"][k]
    save_checkpoint(str(path), arrays, meta)
    cfg_l, method, _, _ = load_run(str(out))
    assert cfg_l["write_rule"] == "shared" and method.model.write_rule == "shared"
    cfg2 = _cfg(out=str(out), iterations=2, write_rule="shared")
    Trainer(cfg2, resume=True, progress=False).train()
    with pytest.raises(ValueError, match=r"differ from the checkpoint's"):
        Trainer(_cfg(out=str(out), iterations=3), resume=True, progress=False)
    # the command line's --resume reads the run's config.json: without the keys as well
    from metacore import cli
    conf = json.loads((out / "config.json").read_text())
    for k in ("write_rule", "add_vector"):
        conf.pop(k, None)
    (out / "config.json").write_text(json.dumps(conf))
    assert cli.main(["train", "mann", "--task", "omniglot", "--out", str(out), "--resume",
                     "--iterations", "3", "--no-progress"]) == 0
    assert load_run(str(out))[1].model.write_rule == "shared"


def test_trains_and_resumes_exactly(tmp_path):
    from metacore.training import Trainer
    a = Trainer(_cfg(out=str(tmp_path / "a"), iterations=3), progress=False)
    pa = a.train().copy()
    cfg_b = _cfg(out=str(tmp_path / "b"), iterations=1)
    Trainer(cfg_b, progress=False).train()
    cfg_b["iterations"] = 3
    pb = Trainer(cfg_b, resume=True, progress=False).train()
    np.testing.assert_array_equal(pa, pb)
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert {"loss", "acc_1", "acc_2", "acc_5", "acc_10"} <= set(recs[0])
    assert any("val_acc_2" in r for r in recs)


def test_evaluate_reports_instances_and_refuses_other_options(tmp_path):
    from metacore.training import Trainer
    t = Trainer(_cfg(out=str(tmp_path / "a"), iterations=1), progress=False)
    params = t.train()
    opts = dict(tasks=3, steps=None, shots=None, way=None, seed=1, bn=None, inner_lr=None)
    res = t.method.evaluate(params, opts)
    assert res["episodes"] == 3 and set(res["accuracy_by_instance"]) == {str(i) for i in
                                                                         range(1, 11)}
    assert "instance  2" in t.method.format_result(res)
    js = t.method.json_result(res)          # `--json`: lists in percent, instance 1 first
    assert len(js["accuracy_by_instance"]) == len(js["ci95_by_instance"]) == 10
    assert js["accuracy_by_instance"][1] == 100 * res["accuracy_by_instance"]["2"]["mean"]
    assert js["ci95_by_instance"][9] == 100 * res["accuracy_by_instance"]["10"]["ci95"]
    assert js["tasks"] == 3
    with pytest.raises(ValueError, match="--shots does not apply to MANN"):
        t.method.evaluate(params, {**opts, "shots": 1})
