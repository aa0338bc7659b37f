"""Reptile on Omniglot with Nichol et al.'s protocol (metacore/methods/reptile_omniglot.py):
the defaults against their source, the inner Adam (beta1 = 0, state carried across tasks),
the mini-batch order, the outer step annealing, exact resume and the two evaluations."""
import json
import math
import shlex

import numpy as np
import pytest

from metacore.methods import paper_defaults, reptile_omniglot as ro
from metacore.training import Trainer, make_config

# The authors' command for 1-shot 5-way Omniglot (openai/supervised-reptile README), and the
# flag -> setting map; every flag not listed is a checkpoint path or a default.
NICHOL_1SHOT_5WAY = ("--shots 1 --inner-batch 10 --inner-iters 5 --meta-step 1 --meta-batch 5 "
                     "--meta-iters 100000 --eval-batch 5 --eval-iters 50 --learning-rate 0.001 "
                     "--meta-step-final 0 --train-shots 10")
FLAG_TO_SETTING = {"--shots": "shots", "--inner-batch": "inner_batch",
                   "--inner-iters": "inner_steps", "--meta-step": "outer_lr",
                   "--meta-batch": "meta_batch", "--meta-iters": "iterations",
                   "--eval-batch": "eval_batch", "--eval-iters": "test_steps",
                   "--learning-rate": "inner_lr", "--meta-step-final": "outer_lr_final",
                   "--train-shots": "train_shots"}


def test_defaults_are_the_authors_command(tmp_path):
    words = shlex.split(NICHOL_1SHOT_5WAY)
    flags = dict(zip(words[::2], words[1::2]))
    cfg = make_config("reptile", "omniglot", tmp_path)
    for flag, value in flags.items():
        key = FLAG_TO_SETTING[flag]
        assert cfg[key] == pytest.approx(float(value)), (flag, key, cfg[key])
        assert flag in ro.SOURCES[key], (key, ro.SOURCES[key])        # sourced to the flag
    # the rest: their code's defaults (models.py, TensorFlow's Adam and batch norm)
    assert cfg["n_way"] == 5 and cfg["queries"] == 1
    assert (cfg["inner_beta1"], cfg["inner_beta2"], cfg["inner_eps"]) == (0.0, 0.999, 1e-8)
    assert cfg["outer_opt"] == "sgd" and cfg["bn_eps"] == 1e-3 and cfg["head"] == "flatten"
    for key in ("n_way", "shots", "train_shots", "inner_steps", "inner_batch", "inner_lr",
                "inner_beta1", "meta_batch", "outer_opt", "outer_lr", "outer_lr_final",
                "iterations", "test_steps", "eval_batch", "queries", "head"):
        assert key in ro.SOURCES, key
    # MAML's own Omniglot defaults are untouched by Reptile's
    maml = paper_defaults("maml", "omniglot")
    assert (maml["inner_lr"], maml["meta_batch"], maml["outer_opt"]) == (0.4, 32, "adam")


def test_a_user_setting_wins_and_bad_ones_are_named(tmp_path):
    cfg = make_config("reptile", "omniglot", tmp_path, inner_steps=3, outer_lr=0.5)
    assert cfg["inner_steps"] == 3 and cfg["outer_lr"] == 0.5 and cfg["inner_batch"] == 10
    with pytest.raises(ValueError, match="inner_beta1 must be 0"):
        make_config("reptile", "omniglot", tmp_path, inner_beta1=0.9)
    with pytest.raises(ValueError, match="inner_batch 60 exceeds a training task's 5 x 10"):
        make_config("reptile", "omniglot", tmp_path, inner_batch=60)
    with pytest.raises(ValueError, match="workers must be 1"):
        make_config("reptile", "omniglot", tmp_path, workers=2)
    with pytest.raises(ValueError, match="outer_lr_final must be None or a finite number"):
        make_config("reptile", "omniglot", tmp_path, outer_lr_final=-1.0)


def test_inner_adam_is_tensorflows_with_beta1_zero():
    """Three steps against the formula written out in float64: t counts on, v carries."""
    rng = np.random.default_rng(0)
    theta, v = rng.normal(size=7), np.abs(rng.normal(size=7))
    th, vv = theta.copy(), v.copy()
    lr, b2, eps, t0 = 1e-3, 0.999, 1e-8, 12
    for i in range(3):
        g = rng.normal(size=7)
        ro.adam_b1zero_step(th, g, vv, t0 + i + 1, lr, b2, eps)
        v = b2 * v + (1 - b2) * g * g
        theta = theta - lr * math.sqrt(1 - b2 ** (t0 + i + 1)) * g / (np.sqrt(v) + eps)
        np.testing.assert_allclose(vv, v, rtol=1e-15)
        np.testing.assert_allclose(th, theta, rtol=1e-15, atol=0)


def test_minibatch_order_without_replacement():
    rng = np.random.default_rng(1)
    o = ro.minibatch_order(rng, 50, 10, 5)                   # training: one pass of 50
    assert o.shape == (5, 10) and sorted(o.ravel()) == list(range(50))
    o = ro.minibatch_order(rng, 5, 5, 50)                    # test: the whole support each time
    assert o.shape == (50, 5) and all(sorted(r) == list(range(5)) for r in o)
    o = ro.minibatch_order(rng, 7, 3, 5).ravel()            # a batch spans the reshuffle
    assert sorted(o[:7]) == list(range(7)) and sorted(o[7:14]) == list(range(7))


def test_outer_rate_anneals_linearly_to_the_final_value(tmp_path):
    cfg = make_config("fomaml", "sinusoid", tmp_path, iterations=4, eval_every=4,
                      eval_tasks=4, log_every=1, ckpt_every=4, outer_opt="sgd", outer_lr=1.0,
                      outer_lr_final=0.0)
    t = Trainer(cfg, progress=False)
    lrs, step = [], t.opt.step

    def record(params, grad, **kw):
        lrs.append(t.opt.lr)
        return step(params, grad, **kw)

    t.opt.step = record
    t.train()
    assert lrs == [1.0, 0.75, 0.5, 0.25]                     # frac = i / iterations, i from 0
    with pytest.raises(ValueError, match="not both"):
        make_config("fomaml", "sinusoid", tmp_path, lr_halve_every=2, outer_lr_final=0.0)


@pytest.fixture(scope="module")
def method():
    cfg = make_config("reptile", "omniglot", "unused", eval_tasks=3, meta_batch=2,
                      dtype="float64")
    return ro.Method(cfg)


def test_gradient_runs_tasks_in_order_with_the_adam_state_carried(method):
    """The same computation written out: task after task from theta, the inner Adam's v and t
    running on, d = theta - mean_t theta_t."""
    from metacore.algorithms.maml import _loss_grad
    cfg, model = method.cfg, method.model
    theta = model.init_params(np.random.default_rng(3), np.float64)
    batch = method.sample()
    method.inner_v[:] = 0.0
    method.inner_t = 0
    rng_state = method.rng.bit_generator.state
    d, metrics = method.gradient(theta, batch)
    assert method.inner_t == 2 * 5 and np.all(method.inner_v > 0)
    rng = np.random.default_rng()
    rng.bit_generator.state = rng_state
    v, t, finals = np.zeros_like(theta), 0, []
    sx, sy = batch
    for k in range(2):
        th = theta[None].copy()
        for idx in ro.minibatch_order(rng, 50, 10, 5):
            _, g = _loss_grad(model, th, sx[k:k + 1, idx], sy[k:k + 1, idx])
            t += 1
            v = 0.999 * v + 0.001 * g[0] * g[0]
            th = th - 1e-3 * math.sqrt(1 - 0.999 ** t) * g / (np.sqrt(v) + 1e-8)
        finals.append(th[0])
    # The conv biases sit before batch norm: their gradient is rounding noise (~1e-14), which
    # any change of summation order changes; hence an absolute floor far below real entries.
    np.testing.assert_allclose(d, theta - np.mean(finals, axis=0), rtol=1e-9,
                               atol=1e-7 * np.abs(d).max())
    np.testing.assert_allclose(method.inner_v, v, rtol=1e-9, atol=1e-7 * v.max())
    assert metrics["inner_loss_last"] < metrics["inner_loss_first"]


def test_non_transductive_score_classifies_each_query_with_the_support_only(method):
    model = method.model
    rng = np.random.default_rng(4)
    theta = model.init_params(rng, np.float64)
    sx, sy, qx, qy = method.val_batch
    th = np.repeat(theta[None], sx.shape[0], axis=0)
    acc = ro.score(model, th, sx, qx, qy, transductive=False)
    for t in range(sx.shape[0]):
        right = 0
        for j in range(qx.shape[1]):
            x = np.concatenate([sx[t], qx[t, j:j + 1]])[None]   # (1, S + 1, ...)
            out, _ = model.forward(th[t:t + 1], x)
            right += out[0, -1].argmax() == qy[t, j]
        assert acc[t] == right / qx.shape[1]
    acc_tr = ro.score(model, th, sx, qx, qy, transductive=True)
    out, _ = model.forward(th, qx)
    np.testing.assert_array_equal(acc_tr, (out.argmax(-1) == qy).mean(axis=1))


def test_evaluate_reports_both_protocols_and_leaves_the_adam_state_alone(method):
    theta = method.model.init_params(np.random.default_rng(5), np.float64)
    v, t = method.inner_v.copy(), method.inner_t
    r = method.evaluate(theta, {"tasks": 4, "steps": 2, "bn": "both", "seed": 9})
    assert [x["bn"] for x in r] == ["transductive", "non-transductive"]
    for x in r:
        assert {"way", "shots", "accuracy", "ci95", "tasks", "bn"} <= set(x)
        assert x["way"] == 5 and x["shots"] == 1 and x["tasks"] == 4 and 0 <= x["accuracy"] <= 100
    assert method.inner_t == t and np.array_equal(method.inner_v, v)
    json.dumps(r)
    with pytest.raises(ValueError, match="--way 20 needs a model trained for 20 ways"):
        method.evaluate(theta, {"tasks": 4, "way": 20})
    with pytest.raises(ValueError, match="--bn must be transductive"):
        method.evaluate(theta, {"tasks": 4, "bn": "running"})


def test_resume_after_an_interruption_is_exact(tmp_path):
    kw = dict(iterations=4, eval_every=4, eval_tasks=2, log_every=1, ckpt_every=2,
              meta_batch=2, inner_steps=2)
    a = Trainer(make_config("reptile", "omniglot", tmp_path / "a", **kw), progress=False)
    a.train()
    b = Trainer(make_config("reptile", "omniglot", tmp_path / "b", **kw), progress=False)
    orig = b.method.gradient

    def stop_at_3(params, batch):
        if b.step == 3:
            raise KeyboardInterrupt
        return orig(params, batch)

    b.method.gradient = stop_at_3
    with pytest.raises(KeyboardInterrupt):
        b.train()
    b = Trainer(make_config("reptile", "omniglot", tmp_path / "b", **kw), resume=True,
                progress=False)
    assert b.step == 2
    b.train()
    assert np.array_equal(a.params, b.params)
    assert a.method.inner_t == b.method.inner_t == 4 * 2 * 2
    assert np.array_equal(a.method.inner_v, b.method.inner_v)

    def lines(p):
        return [{k: v for k, v in json.loads(x).items() if k != "elapsed_s"} for x in open(p)]
    assert lines(tmp_path / "a" / "metrics.jsonl") == lines(tmp_path / "b" / "metrics.jsonl")


def test_show_config_names_each_settings_source(tmp_path, capsys):
    from metacore.cli import main
    out = tmp_path / "run"
    assert main(["train", "reptile", "--task", "omniglot", "--out", str(out),
                 "--inner-steps", "3", "--show-config"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert not out.exists()                                  # nothing written, nothing run
    assert "your flag" in lines["inner_steps"] and " 3 " in lines["inner_steps"]
    assert "paper: " in lines["inner_batch"] and "--inner-batch 10" in lines["inner_batch"]
    assert "paper: " in lines["outer_lr_final"]
    assert "not a paper setting" in lines["eval_every"]
    assert main(["train", "maml", "--task", "omniglot", "--out", str(out),
                 "--show-config"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert "Finn et al. 2017" in lines["inner_lr"] and "0.4" in lines["inner_lr"]
    # a resumed run's settings come from the run
    cfg = make_config("fomaml", "sinusoid", out, iterations=2, eval_every=2, eval_tasks=4,
                      log_every=1, ckpt_every=2, meta_batch=3)
    Trainer(cfg, progress=False).train()
    assert main(["train", "fomaml", "--task", "sinusoid", "--out", str(out), "--resume",
                 "--show-config"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert "the resumed run" in lines["meta_batch"] and " 3 " in lines["meta_batch"]


def test_both_protocols_score_the_same_adapted_tasks(method):
    """--bn both equals the two single-mode evaluations (the adaptation is seeded the same)."""
    theta = method.model.init_params(np.random.default_rng(6), np.float64)
    both = method.evaluate(theta, {"tasks": 3, "steps": 1, "bn": "both", "seed": 4})
    for r in both:
        one = method.evaluate(theta, {"tasks": 3, "steps": 1, "bn": r["bn"], "seed": 4})
        assert one["accuracy"] == r["accuracy"] and one["ci95"] == r["ci95"]
