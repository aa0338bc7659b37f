"""Training loop and CLI: SIGKILL mid-run then --resume ends bit-identical to an uninterrupted
run (parameters, optimizer state, metrics), refusals, and `metacore eval` output."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from metacore.checkpoint import load_checkpoint
from metacore.evaluation import adapt_and_score, evaluate, mean_ci
from metacore.training import Trainer, make_config

from _run_helpers import checkpoint_step as _ckpt_step  # noqa: E402  (tests/ on sys.path)
from _run_helpers import child_env as _env, metrics_without_time as _strip_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--task", "sinusoid", "--iterations", "300", "--ckpt-every", "20", "--log-every",
        "10", "--eval-every", "100", "--eval-tasks", "10", "--seed", "3", "--no-progress"]


def _cli(out, *extra):
    cmd = [sys.executable, "-m", "metacore", "train", "maml", "--out", str(out)] + ARGS
    return cmd + list(extra)


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(full), check=True, env=_env(), cwd=ROOT, capture_output=True)

    proc = subprocess.Popen(_cli(killed), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.npz"
    deadline = time.time() + 60
    while _ckpt_step(ckpt) < 40 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    stopped = _ckpt_step(ckpt)
    assert 40 <= stopped < 300
    subprocess.run(_cli(killed, "--resume"), check=True, env=_env(), cwd=ROOT,
                   capture_output=True)

    a, ma = load_checkpoint(full / "checkpoint.npz")
    b, mb = load_checkpoint(killed / "checkpoint.npz")
    assert ma["step"] == mb["step"] == 300
    assert sorted(a) == sorted(b)
    for name in a:                                   # params and every optimizer vector
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), name
    assert ma["opt"] == mb["opt"] and ma["method_state"] == mb["method_state"]
    assert _strip_time(full / "metrics.jsonl") == _strip_time(killed / "metrics.jsonl")


def test_refuses_to_clobber_and_checks_settings(tmp_path):
    cfg = make_config("fomaml", "sinusoid", tmp_path, iterations=3, eval_every=3,
                      eval_tasks=4, log_every=1, ckpt_every=2)
    Trainer(cfg, progress=False).train()
    with pytest.raises(FileExistsError, match="pass --resume"):
        Trainer(cfg, progress=False)
    changed = dict(cfg, inner_lr=0.02)
    with pytest.raises(ValueError, match=r"settings \['inner_lr'\] differ"):
        Trainer(changed, resume=True, progress=False)
    longer = dict(cfg, iterations=5)                 # extending a run is allowed
    t = Trainer(longer, resume=True, progress=False)
    assert t.step == 3
    t.train()
    assert t.step == 5


def test_config_errors():
    with pytest.raises(ValueError, match="algorithm must be one of"):
        make_config("mamll", "sinusoid", "x")
    with pytest.raises(ValueError, match="task must be one of"):
        make_config("maml", "mnist", "x")
    with pytest.raises(ValueError, match="shots must be a positive int"):
        make_config("maml", "sinusoid", "x", shots=0)
    with pytest.raises(ValueError, match="unknown settings"):
        make_config("maml", "sinusoid", "x", alpha=0.1)
    with pytest.raises(ValueError, match="workers must be a positive int"):
        make_config("maml", "sinusoid", "x", workers=0)


@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd"])
def test_task_threads_train_the_same_parameters(tmp_path, monkeypatch, algo):
    # workers=3 splits each 5-task meta-batch into blocks of 2, 2, 1 (metacore.taskpool)
    import metacore.algorithms.maml as maml
    splits, real = [], maml.map_task_blocks
    monkeypatch.setattr(maml, "map_task_blocks",
                        lambda fn, T, w: splits.append((T, w)) or real(fn, T, w))
    runs = {}
    for w in (1, 3):
        cfg = make_config(algo, "sinusoid", tmp_path / f"w{w}", seed=5, dtype="float64",
                          meta_batch=5, iterations=15, eval_every=100, log_every=5,
                          ckpt_every=15, workers=w)
        trainer = Trainer(cfg, progress=False)
        start = trainer.params.copy()
        trainer.train()
        runs[w] = trainer.params
        assert splits == ([(5, 3)] * 15 if w == 3 else []), (w, splits[:3])
    assert not np.array_equal(runs[1], start)                     # it did train
    assert np.max(np.abs(runs[3] - runs[1])) <= 1e-12 * np.max(np.abs(runs[1]))


@pytest.mark.parametrize("algo", ["maml", "fomaml", "metasgd", "reptile", "pretrain"])
def test_every_algorithm_trains_and_evaluates(tmp_path, algo):
    """Meta-learners: the post-update validation loss falls. The pretrained baseline fits the
    mean function, whose loss barely differs from the initial one's: only finiteness there."""
    over = dict(outer_lr=1e-2)
    if algo == "reptile":                            # d = alpha * sum of step gradients
        over = dict(outer_opt="sgd", outer_lr=1.0, inner_lr=0.02, inner_steps=10)
    cfg = make_config(algo, "sinusoid", tmp_path, iterations=150, eval_every=150,
                      eval_tasks=50, log_every=50, ckpt_every=150, seed=1, **over)
    trainer = Trainer(cfg, progress=False)
    before = trainer.evaluate_val()["val_loss"]
    start = trainer.params.copy()
    trainer.train()
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert [r["step"] for r in recs if r["kind"] == "train"] == [50, 100, 150]
    after = [r for r in recs if r["kind"] == "eval"][-1]["val_loss"]
    assert np.isfinite(after) and not np.array_equal(start, trainer.params)
    if algo != "pretrain":
        assert after < 0.9 * before, (before, after)
    r = evaluate(str(tmp_path), n_tasks=30, max_steps=2)
    assert len(r["loss_mean"]) == 3 and all(np.isfinite(r["loss_ci95"]))


def test_adapt_and_score_non_transductive_bn():
    """One query at a time equals running each query as its own task."""
    from metacore.models import conv4_maml
    rng = np.random.default_rng(0)
    model = conv4_maml(n_way=3, image_shape=(8, 8, 1), channels=3)
    theta = model.init_params(rng, np.float64)
    sx, qx = rng.random((2, 3, 8, 8, 1)), rng.random((2, 4, 8, 8, 1))
    sy, qy = rng.integers(0, 3, (2, 3)), rng.integers(0, 3, (2, 4))
    s = adapt_and_score(model, theta, 0.4, (sx, sy, qx, qy), 1, transductive=False)
    th1 = np.tile(theta, (2, 1)) - 0.4 * model.loss_and_grad(np.tile(theta, (2, 1)), sx, sy)[1]
    for t in range(2):
        for j in range(4):
            loss = model.loss(th1[t:t + 1], qx[t:t + 1, j:j + 1], qy[t:t + 1, j:j + 1])
            assert s["loss"][1][t] == pytest.approx(
                np.mean([model.loss(th1[t:t + 1], qx[t:t + 1, i:i + 1], qy[t:t + 1, i:i + 1])[0]
                         for i in range(4)]), rel=1e-12)
            assert np.isfinite(loss).all()
    trans = adapt_and_score(model, theta, 0.4, (sx, sy, qx, qy), 1, transductive=True)
    assert np.allclose(trans["loss"][1], model.loss(th1, qx, qy), rtol=1e-12)
    assert not np.allclose(trans["loss"][1], s["loss"][1])   # the statistics do matter


def test_mean_ci():
    m, c = mean_ci(np.array([1.0, 3.0]))
    assert m == 2.0 and c == pytest.approx(1.96 * 1.0 / np.sqrt(2))


def test_cli_eval_prints_and_writes_json(tmp_path):
    run = tmp_path / "run"
    env = _env()
    subprocess.run([sys.executable, "-m", "metacore", "train", "maml", "--task", "sinusoid",
                    "--out", str(run), "--iterations", "20", "--eval-every", "10",
                    "--no-progress"], check=True, env=env, cwd=ROOT, capture_output=True)
    out = subprocess.run([sys.executable, "-m", "metacore", "eval", str(run), "--tasks", "50",
                          "--steps", "2", "--json", str(tmp_path / "e.json")], check=True,
                         env=env, cwd=ROOT, capture_output=True, text=True).stdout
    assert "50 test tasks" in out and "steps  2: loss" in out
    with open(tmp_path / "e.json") as f:
        r = json.load(f)
    assert r["steps"] == [0, 1, 2] and r["step"] == 20


def test_sinusoid_plots_written(tmp_path):
    pytest.importorskip("matplotlib")
    from metacore.evaluation import sinusoid_plots
    run = tmp_path / "run"
    Trainer(make_config("maml", "sinusoid", run, iterations=5, eval_every=5, eval_tasks=4,
                        log_every=5, ckpt_every=5), progress=False).train()
    res = {"maml": evaluate(str(run), n_tasks=10, max_steps=3),
           "pre": evaluate(str(run), n_tasks=10, max_steps=3, inner_lr=0.02)}
    assert res["pre"]["inner_lr"] == 0.02 and res["maml"]["inner_lr"] == 0.01
    paths = sinusoid_plots({"maml": str(run), "pre": str(run)}, tmp_path / "plots", res,
                           inner_lrs={"pre": 0.02})
    assert len(paths) == 2
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluation_bad_input(tmp_path):
    from metacore.models import sinusoid_mlp
    model = sinusoid_mlp(hidden=(3,))
    theta = model.init_params(np.random.default_rng(0), np.float64)
    x = np.zeros((2, 4, 1))
    with pytest.raises(ValueError, match="max_steps must be an int >= 0"):
        adapt_and_score(model, theta, 0.1, (x, x, x, x), -1)
    with pytest.raises(TypeError, match="has dtype float32, expected float64"):
        adapt_and_score(model, theta, 0.1, (x, x, x.astype(np.float32), x), 1)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        adapt_and_score(model, theta, float("nan"), (x, x, x, x), 1)
    with pytest.raises(FileNotFoundError):
        evaluate(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="n_tasks must be an int >= 2"):
        evaluate(str(tmp_path), n_tasks=1)


def test_registry_lists_every_method_once():
    from metacore import methods
    reg = methods.registry()
    for name in ("maml", "fomaml", "metasgd", "reptile", "pretrain"):
        assert reg[name].__name__ == "metacore.methods.maml_family"
    for name, mod in reg.items():
        assert set(mod.DEFAULTS) == set(mod.TASKS), name
        assert issubclass(mod.Method, methods.MethodBase), name


def test_lr_halving_follows_the_step(tmp_path):
    cfg = make_config("fomaml", "sinusoid", tmp_path, iterations=5, eval_every=5,
                      eval_tasks=4, log_every=1, ckpt_every=5, lr_halve_every=2, outer_lr=0.1)
    t = Trainer(cfg, progress=False)
    lrs = []
    for total in range(1, 6):
        t.cfg["iterations"] = total
        t.train()
        lrs.append(t.opt.lr)
    assert lrs == [0.1, 0.1, 0.05, 0.05, 0.025]     # the rate used by steps 1..5


def test_cli_set_refuses_unknown_settings(tmp_path):
    r = subprocess.run([sys.executable, "-m", "metacore", "train", "maml", "--task", "sinusoid",
                        "--out", str(tmp_path / "r"), "--set", "warp=3"], env=_env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "unknown settings ['warp']" in r.stderr
    r = subprocess.run([sys.executable, "-m", "metacore", "train", "maml", "--task", "quadratic",
                        "--out", str(tmp_path / "r")], env=_env(), cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and "task must be one of ('sinusoid', 'omniglot')" in r.stderr


def test_omniglot_maml_family_logs_training_accuracy(tmp_path):
    """The curves need a training accuracy: each train record carries the mean post-update
    query accuracy over its interval (fractions of 1, a multiple of 1 / (5 queries x 2 tasks)
    per step)."""
    cfg = make_config("maml", "omniglot", tmp_path, iterations=2, meta_batch=2,
                      eval_every=100, eval_tasks=2, log_every=1, ckpt_every=100, seed=3)
    Trainer(cfg, progress=False).train()
    with open(tmp_path / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f if '"train"' in line]
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        assert 0.0 <= r["train_accuracy"] <= 1.0
        assert abs(r["train_accuracy"] * 10 - round(r["train_accuracy"] * 10)) < 1e-9


def test_metasgd_show_config_does_not_claim_li_et_al():
    """Meta-SGD on Omniglot runs Finn's MAML settings: --show-config says so, and its initial
    inner rate is marked as metacore's choice, not a paper setting."""
    from metacore.methods import maml_family
    src = maml_family.sources("metasgd", "omniglot")
    assert src["inner_lr"].startswith("metacore:")
    assert all("Li et al. 2017's own schedule was not verified" in v
               for k, v in src.items() if k != "inner_lr")
    assert maml_family.sources("maml", "omniglot")["inner_lr"].endswith("--update_lr=0.4")
