"""The model zoo: entries made from a run, listed, evaluated as zoo:NAME exactly as the run
directory, and refused when their file fails its checksum; the shipped entries verify."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from metacore import zoo
from metacore.cli import main
from metacore.training import Trainer, load_run, make_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tmp_zoo(tmp_path, monkeypatch):
    d = tmp_path / "zoo"
    d.mkdir()
    (d / "index.json").write_text('{"entries": []}')
    monkeypatch.setattr(zoo, "ZOO_DIR", str(d))
    monkeypatch.setattr(zoo, "INDEX", str(d / "index.json"))
    return d


def _add(run, name, eval_json, extra=()):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        import zoo_add
    finally:
        sys.path.pop(0)
    return zoo_add.main([str(run), "--name", name, "--paper-value", "0.435",
                         "--paper-figure", "Fig. 3", "--paper-source", "Finn et al. 2017",
                         "--paper-iterations", "70000", "--command", "metacore train ...",
                         "--eval-json", str(eval_json), "--eval-command", "metacore eval ...",
                         *extra])


def test_an_entry_evaluates_exactly_as_its_run(tmp_path, tmp_zoo, capsys):
    run = tmp_path / "run"
    cfg = make_config("maml", "sinusoid", run, iterations=20, eval_every=20, eval_tasks=8,
                      log_every=10, ckpt_every=20, seed=3)
    Trainer(cfg, progress=False).train()
    flags = ["--tasks", "10", "--steps", "2", "--seed", "5"]
    assert main(["eval", str(run), *flags, "--json", str(tmp_path / "run.json")]) == 0
    assert _add(run, "tiny_maml", tmp_path / "run.json") == 0
    (e,) = zoo.entries()
    assert (e["name"], e["method"], e["task"], e["budget"]["iterations"]) == \
        ("tiny_maml", "maml", "sinusoid", 20)
    assert not any(k.startswith("opt.") for k in np.load(tmp_zoo / e["file"]).files)
    assert main(["eval", "zoo:tiny_maml", *flags, "--json", str(tmp_path / "zoo.json")]) == 0
    a = json.load(open(tmp_path / "run.json"))
    b = json.load(open(tmp_path / "zoo.json"))
    assert a["loss_mean"] == b["loss_mean"] and b["run"] == "zoo:tiny_maml"
    _, _, p_run, _ = load_run(str(run))
    _, _, p_zoo, _ = load_run("zoo:tiny_maml")
    assert np.array_equal(p_run, p_zoo)
    capsys.readouterr()
    assert main(["zoo", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    for key in ("name", "method", "task", "way", "shot", "paper", "budget", "command"):
        assert key in listed, key
    assert main(["zoo"]) == 0
    assert "tiny_maml" in capsys.readouterr().out


def test_a_tampered_or_missing_entry_is_refused_by_name(tmp_path, tmp_zoo):
    run = tmp_path / "run"
    cfg = make_config("fomaml", "sinusoid", run, iterations=2, eval_every=2, eval_tasks=4,
                      log_every=1, ckpt_every=2)
    Trainer(cfg, progress=False).train()
    (tmp_path / "r.json").write_text('{"accuracy": 1.0, "ci95": 0.1}')
    _add(run, "t", tmp_path / "r.json")
    path = tmp_zoo / "t.npz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match=r"t\.npz fails its checksum"):
        load_run("zoo:t")
    with pytest.raises(ValueError, match="no entry 'nope' \\(entries: t\\)"):
        load_run("zoo:nope")
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"t\.npz is missing"):
        load_run("zoo:t")


def test_the_shipped_entries_verify_and_load():
    """Every entry in the package: file present, size and SHA-256 right, config complete."""
    for e in zoo.entries():
        path = zoo.verified_path(e["name"])
        assert os.path.getsize(path) < 2_000_000, (e["name"], "keep zoo files small")
        cfg, method, params, meta = load_run(zoo.PREFIX + e["name"])
        fresh = method.init_params(np.random.default_rng(0))       # any method's layout
        assert params.dtype == np.float32 and params.shape == fresh.shape
        assert cfg["algorithm"] == e["method"] and meta["step"] == e["budget"]["iterations"]
        for r in e["measured"]["results"]:
            assert 0 <= r["accuracy"] <= 100 and r["ci95"] > 0
            # 600 test tasks, or all of Lake's 20 runs
            lake = r.get("protocol", "").startswith("lake")
            assert r["tasks"] == 20 if lake else r["tasks"] >= 600, r


def test_zoo_lists_outside_the_checkout(tmp_path):
    """`metacore zoo` reads the package's own files, not the working directory's."""
    out = subprocess.run([sys.executable, "-m", "metacore", "zoo", "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [e["name"] for e in json.loads(out.stdout)] == [e["name"] for e in zoo.entries()]


def test_cli_reports_a_missing_entry_in_one_line(capsys):
    assert main(["eval", "zoo:no_such_entry"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("metacore eval: error: zoo: no entry")


def test_a_closed_pipe_is_not_reported_as_a_bug(tmp_path, monkeypatch, capsys):
    """`metacore zoo --json | head -1`: the reader leaves early and the next write raises
    BrokenPipeError; that is no bug of ours: no traceback, no message, status 141."""
    from metacore.cli import run_command
    out = open(tmp_path / "stdout", "w")
    monkeypatch.setattr(sys, "stdout", out)

    def writes_to_a_closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command("zoo", writes_to_a_closed_pipe, None) == 141
    assert capsys.readouterr().err == ""
    out.close()
