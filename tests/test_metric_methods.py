"""The metric-based methods through the trainer (metacore.methods.metric): paper defaults,
a few training steps of each, BN running statistics kept as buffers, SIGKILL mid-run then
--resume bit-identical to an uninterrupted run, and `metacore eval` through the CLI. Tiny
sizes throughout (8-channel embeddings, 3-way episodes with 2 queries per class)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from metacore.checkpoint import load_checkpoint
from metacore.training import Trainer, load_run, make_config

from _run_helpers import checkpoint_step as _ckpt_step  # noqa: E402  (tests/ on sys.path)
from _run_helpers import child_env, metrics_without_time as _strip_time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(channels=8, n_way=3, queries=2, val_way=3, val_episodes=3, pairs=4)
TINY_SETS = [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]


def _env():
    return child_env(one_thread=True)


def test_paper_defaults_resolved_per_algorithm(tmp_path):
    p = make_config("protonet", "omniglot", tmp_path)
    assert (p["n_way"], p["shots"], p["queries"]) == (60, 1, 5)
    assert p["outer_opt"] == "adam" and p["outer_lr"] == 1e-3
    assert p["lr_halve_every"] == p["halve_every"] == 2000
    r1 = make_config("relation", "omniglot", tmp_path)
    r5 = make_config("relation", "omniglot", tmp_path, shots=5)
    assert (r1["n_way"], r1["queries"], r5["queries"]) == (5, 19, 15)
    assert r1["lr_halve_every"] == 100000
    m = make_config("matching", "omniglot", tmp_path)
    assert (m["n_way"], m["shots"], m["fce"], m["lr_halve_every"]) == (5, 1, False, 0)
    assert make_config("siamese", "omniglot", tmp_path)["pairs"] == 128
    # the halving period: --lr-halve-every or --set halve_every, 0 = constant
    assert make_config("protonet", "omniglot", tmp_path, lr_halve_every=7)["halve_every"] == 7
    assert make_config("protonet", "omniglot", tmp_path, halve_every=0)["lr_halve_every"] == 0
    with pytest.raises(ValueError, match="disagree"):
        make_config("protonet", "omniglot", tmp_path, lr_halve_every=7, halve_every=5)
    with pytest.raises(ValueError, match="fce must be true or false"):
        make_config("matching", "omniglot", tmp_path, fce="yes")
    with pytest.raises(ValueError, match="n_way must be an int >= 2"):
        make_config("protonet", "omniglot", tmp_path, n_way=1)
    with pytest.raises(ValueError, match="task must be one of"):
        make_config("relation", "sinusoid", tmp_path)


@pytest.mark.parametrize("algo", ["protonet", "matching", "relation", "siamese"])
def test_each_method_trains_through_the_trainer(tmp_path, algo):
    cfg = make_config(algo, "omniglot", tmp_path, iterations=4, log_every=2, eval_every=4,
                      ckpt_every=4, outer_lr=1e-2, **TINY)
    t = Trainer(cfg, progress=False)
    p0, b0 = t.params.copy(), {k: v.copy() for k, v in t.method.buffers().items()}
    assert b0, "the BN running statistics must be buffers"
    t.train()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train] == [2, 4]
    assert all(np.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in train)
    assert 0 <= [r for r in recs if r["kind"] == "eval"][-1]["val_accuracy"] <= 1
    assert not np.array_equal(p0, t.params) and np.isfinite(t.params).all()
    b1 = t.method.buffers()
    assert all(not np.array_equal(b0[k], b1[k]) for k in b0), "running stats not updated"
    # the checkpoint restores the buffers exactly into a fresh method
    _, method, params, meta = load_run(str(tmp_path))
    assert meta["step"] == 4 and params.tobytes() == t.params.tobytes()
    for k, v in method.buffers().items():
        assert v.tobytes() == b1[k].tobytes(), k
    with pytest.raises(ValueError, match="checkpoint buffers"):
        method.load_buffers({})


def _train_cmd(out, *extra):
    return ([sys.executable, "-m", "metacore", "train", "protonet", "--task", "omniglot",
             "--out", str(out), "--iterations", "40", "--ckpt-every", "4", "--log-every", "2",
             "--eval-every", "20", "--seed", "3", "--no-progress", "--lr-halve-every", "10"]
            + TINY_SETS + list(extra))


def test_protonet_sigkill_and_resume_is_bit_identical(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_train_cmd(full), check=True, env=_env(), cwd=ROOT, capture_output=True)
    proc = subprocess.Popen(_train_cmd(killed), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.npz"
    deadline = time.time() + 120
    while _ckpt_step(ckpt) < 12 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 12 <= _ckpt_step(ckpt) < 40
    # settings not given again come from the run's config.json
    subprocess.run([sys.executable, "-m", "metacore", "train", "protonet", "--task",
                    "omniglot", "--out", str(killed), "--resume", "--no-progress"],
                   check=True, env=_env(), cwd=ROOT, capture_output=True)
    a, ma = load_checkpoint(full / "checkpoint.npz")
    b, mb = load_checkpoint(killed / "checkpoint.npz")
    assert ma["step"] == mb["step"] == 40
    assert sorted(a) == sorted(b) and any(k.startswith("buf.") for k in a)
    for name in a:                        # params, Adam moments, BN running statistics
        assert a[name].dtype == b[name].dtype
        assert a[name].tobytes() == b[name].tobytes(), name
    assert ma["opt"] == mb["opt"] and ma["method_state"] == mb["method_state"]
    assert _strip_time(full / "metrics.jsonl") == _strip_time(killed / "metrics.jsonl")

    # metacore eval on the finished tiny run: restricted to 5-way 1-shot, then JSON out
    out = subprocess.run([sys.executable, "-m", "metacore", "eval", str(full), "--tasks", "6",
                          "--way", "5", "--shots", "1", "--json", str(tmp_path / "e.json")],
                         check=True, env=_env(), cwd=ROOT, capture_output=True, text=True)
    assert "BN: non-transductive" in out.stdout
    assert "5-way 1-shot (15 queries/class, 6 episodes)" in out.stdout
    assert "Lake" not in out.stdout and "20-way" not in out.stdout
    r = json.load(open(tmp_path / "e.json"))       # the zoo's fields, percent
    assert (r["way"], r["shots"], r["tasks"], r["bn"]) == (5, 1, 6, "running")
    printed = out.stdout.split("6 episodes): ")[1].split(" %")[0]          # "acc +- ci"
    assert [f"{r['accuracy']:.2f}", f"{r['ci95']:.2f}"] == printed.split(" +- ")
    assert 0 <= r["accuracy"] <= 100


def test_evaluate_protocol_and_bn_modes(tmp_path):
    cfg = make_config("relation", "omniglot", tmp_path, iterations=1, log_every=1,
                      eval_every=1, ckpt_every=1, **TINY)
    t = Trainer(cfg, progress=False)
    t.train()
    m = t.method
    r = m.evaluate(t.params, dict(tasks=3, way=20, shots=1, seed=None, bn=None))
    s = r["settings"]["20way_1shot"]
    assert (s["way"], s["shots"], s["queries"], s["episodes"]) == (20, 1, 5, 3)
    js = m.json_result(r)                     # `--json`: one object per setting, percent
    assert [(j["protocol"], j["way"], j["shots"], j["tasks"]) for j in js] == \
        [("episodes", 20, 1, 3), ("lake_20_runs_within_alphabet", 20, 1, 20)]
    assert js[0]["accuracy"] == 100 * s["accuracy"] and js[0]["ci95"] == 100 * s["ci95"]
    assert r["lake"]["runs"] == 20 and r["bn"] == "running"
    assert "Lake's 20 runs" in m.format_result(r)
    # same seed, same episodes; transductive BN gives other numbers on the same episodes
    again = m.evaluate(t.params, dict(tasks=3, way=20, shots=1, bn="non-transductive"))
    assert again["settings"] == r["settings"]
    tr = m.evaluate(t.params, dict(tasks=3, way=5, shots=1, bn="transductive"))
    assert tr["bn"] == "batch" and "transductive" in m.format_result(tr)
    # a Relation Net is evaluated at its training shot unless --shots says otherwise
    # (its class map sums the K support maps); another shot is evaluated, with a note
    assert m._default_shots() == (cfg["shots"],) == (1,)
    d = m.evaluate(t.params, dict(tasks=2, way=5, bn=None))
    assert list(d["settings"]) == ["5way_1shot"] and "note" not in d
    five = m.evaluate(t.params, dict(tasks=2, way=5, shots=5, bn=None))
    assert list(five["settings"]) == ["5way_5shot"]
    assert "trained at 1-shot" in five["note"] and "note: this Relation Net" in \
        m.format_result(five)
    with pytest.raises(ValueError, match="bn must be one of"):
        m.evaluate(t.params, dict(bn="both"))
    with pytest.raises(ValueError, match="tasks must be >= 2"):
        m.evaluate(t.params, dict(tasks=1, way=5, shots=1))


def _scores(method, params, sx, sy, qx):
    """The raw per-query scores behind method.predict (logits, log-probabilities, relation
    scores or pair logits), BN running statistics."""
    alg, algo = method.alg, method.cfg["algorithm"]
    if algo == "protonet":
        return alg.logits(params, sx, sy, qx)[0]
    if algo == "matching":
        return alg.predict(params, sx, sy, qx, int(sy.max()) + 1)[0]
    if algo == "relation":
        return alg.scores(params, sx, sy, qx)
    return alg.pair_logits(params, sx, sy, qx)


@pytest.mark.parametrize("algo", ["protonet", "matching", "relation", "siamese"])
def test_default_evaluation_has_no_bn_leak(tmp_path, algo):
    """One query's scores are the same alone as in its batch (the running statistics)."""
    from metacore.data.omniglot import EpisodeSampler, split_characters
    cfg = make_config(algo, "omniglot", tmp_path, iterations=2, log_every=1, eval_every=2,
                      ckpt_every=2, **TINY)
    t = Trainer(cfg, progress=False)
    t.train()
    data = t.method.data
    ep = EpisodeSampler(data.images, split_characters(data, "vinyals", "val"), 3, 1, 3,
                        seed=1, dtype=t.params.dtype).sample(1)
    whole = _scores(t.method, t.params, ep.support_x, ep.support_y, ep.query_x)
    assert np.ptp(whole) > 0
    for j in range(ep.query_x.shape[1]):
        alone = _scores(t.method, t.params, ep.support_x, ep.support_y, ep.query_x[:, j:j + 1])
        np.testing.assert_allclose(alone[0, 0], whole[0, j], rtol=1e-5, atol=1e-6)
    pred = t.method.predict(t.params, ep.support_x, ep.support_y, ep.query_x)
    assert np.array_equal(pred, t.method.predict(t.params, ep.support_x, ep.support_y,
                                                 ep.query_x, bn="running"))


# --show-config: the metric methods' paper settings are sourced (issue 16, item 3)
PAPER_SOURCED = {
    "protonet": {"n_way": 60, "queries": 5, "shots": 1, "outer_opt": "adam", "outer_lr": 1e-3,
                 "halve_every": 2000, "lr_halve_every": 2000, "channels": 64},
    "matching": {"n_way": 5, "shots": 1, "channels": 64, "fce": False,
                 "similarity": "support_cosine"},
    "relation": {"n_way": 5, "queries": 19, "shots": 1, "outer_opt": "adam", "outer_lr": 1e-3,
                 "halve_every": 100000, "lr_halve_every": 100000, "channels": 64},
    "siamese": {"pairs": 128, "distort": True},
}
CITED = {"protonet": "Snell et al. 2017, sec. 3.1", "matching": "Vinyals et al. 2016",
         "relation": "Sung et al. 2018", "siamese": "Koch et al. 2015"}


@pytest.mark.parametrize("algo", sorted(PAPER_SOURCED))
def test_show_config_sources_the_paper_settings(algo, tmp_path, capsys):
    from metacore import cli
    from metacore.methods import metric
    cfg = make_config(algo, "omniglot", tmp_path)
    want = PAPER_SOURCED[algo]
    assert set(metric.SOURCES[algo]) == set(want)
    for key, value in want.items():
        assert cfg[key] == value, (key, cfg[key])
        assert CITED[algo] in metric.SOURCES[algo][key], key
    # the one default taken from reimplementations is labelled so, not as the paper's
    REIMPL = {"matching": {"similarity"}}.get(algo, set())
    out = tmp_path / "run"
    assert cli.main(["train", algo, "--task", "omniglot", "--out", str(out),
                     "--show-config"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    for key in want:
        if key in REIMPL:
            assert "reimplementation, not the paper's text" in lines[key], lines[key]
            assert "paper:" not in lines[key], lines[key]
        else:
            assert "paper: " + CITED[algo] in lines[key], lines[key]
    # our own choices keep the "not a paper setting" label
    for key in ("iterations", "bn_momentum", "val_episodes"):
        assert "not a paper setting" in lines[key], lines[key]
    # a flag is labelled as the user's, not the paper's
    assert cli.main(["train", algo, "--task", "omniglot", "--out", str(out), "--show-config",
                     "--set", "channels=8"]) == 0
    lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["channels"].rstrip().endswith("your flag")


def test_matching_similarity_settings(tmp_path):
    from metacore.errors import UserError
    from metacore.methods.metric import build_algorithm
    m = make_config("matching", "omniglot", tmp_path)
    assert (m["similarity"], m["cosine_scale"], m["learn_scale"]) == \
        ("support_cosine", 10.0, False)
    s = make_config("matching", "omniglot", tmp_path, similarity="scaled_cosine",
                    cosine_scale=4, learn_scale=True, channels=8)
    alg, _ = build_algorithm(s)
    assert (alg.similarity, alg.cosine_scale, alg.learn_scale) == ("scaled_cosine", 4.0, True)
    assert alg.layout.names[-1] == "scale"
    # a run saved before these settings existed was trained with the symmetric cosine
    old = {k: v for k, v in s.items() if k not in ("similarity", "cosine_scale", "learn_scale")}
    assert build_algorithm(old)[0].similarity == "cosine"
    for bad, msg in ((dict(similarity="dot"), "similarity must be one of"),
                     (dict(cosine_scale=-1.0), "cosine_scale must be a number > 0"),
                     (dict(learn_scale="yes"), "learn_scale must be true or false"),
                     (dict(learn_scale=True), "learn_scale applies to similarity=scaled_cosine")):
        with pytest.raises(UserError, match=msg):
            make_config("matching", "omniglot", tmp_path, **bad)


def test_siamese_distortion_setting_and_evaluation_protocol(tmp_path):
    """distort is on by default for siamese (Koch et al.) and --set distort=false turns it
    off; the evaluation covers 5-way and 20-way episodes and Lake's 20 runs."""
    from metacore.errors import UserError
    cfg = make_config("siamese", "omniglot", tmp_path, iterations=1, log_every=1,
                      eval_every=1, ckpt_every=1, **TINY)
    assert cfg["distort"] is True
    off = make_config("siamese", "omniglot", tmp_path, distort=False)
    assert off["distort"] is False
    with pytest.raises(UserError, match="distort must be true or false"):
        make_config("siamese", "omniglot", tmp_path, distort="yes")
    t = Trainer(cfg, progress=False)
    assert t.method.sampler.distort is True
    t.train()
    r = t.method.evaluate(t.params, dict(tasks=2, shots=1))
    assert list(r["settings"]) == ["5way_1shot", "20way_1shot"]
    assert r["lake"]["runs"] == 20 and (r["lake"]["way"], r["lake"]["shots"]) == (20, 1)
    assert "Lake's 20 runs, 20-way 1-shot within alphabet" in t.method.format_result(r)
