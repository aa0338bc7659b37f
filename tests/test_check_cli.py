"""`metacore check`: every derivation named in issue 18 is listed and grouped, GROUP runs one
group, --json writes the rows, and a broken derivation makes it FAIL (exit status 1)."""
import json

import numpy as np
import pytest

from metacore import check, cli

NAMED = {   # issue 18's list -> the check's derivation names (before '[')
    "layers": {"linear", "relu", "conv2d", "batchnorm", "maxpool2d", "flatten", "meanpool",
               "lstm_cell", "lstm_sequence", "bilstm"},
    "losses": {"mse", "softmax_ce", "bce_logits"},
    "models": {"sinusoid_mlp", "bn_mlp", "conv4_maml", "conv4_protonet"},
    "meta-gradients": {"maml", "fomaml", "metasgd", "reptile"},
    "kernels": {"distance", "protonet_loss", "lrua_episode", "mlp_maml_fused"},
    "algorithms": {"protonet_episode", "matching_episode", "relation_episode",
                   "siamese_pairs", "mann_lrua_episode", "metanet_episode", "meta_lstm",
                   "lstm_optimizer"},
}


def test_list_shows_every_derivation_in_its_group(capsys):
    assert cli.main(["check", "--list"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    listed = {}
    for name, group in lines:
        listed.setdefault(group, set()).add(name.split("[")[0])
    assert set(listed) == set(check.GROUPS)
    for group, names in NAMED.items():
        assert names <= listed[group], (group, names - listed[group])
    full = {name for name, _ in lines}
    assert {"maml[bn_mlp,k=2]", "matching_episode[fce]", "meta_lstm[second_order]",
            "metanet_episode[second_order]", "metanet_episode[first_order]"} <= full


def test_group_and_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert cli.main(["check", "losses", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {r["group"] for r in rows} == {"losses"}
    assert {r["name"] for r in rows} == {"mse", "softmax_ce", "bce_logits"}
    assert set(rows[0]) == {"name", "group", "dtype", "quantity", "error", "tolerance", "pass"}
    assert all(r["pass"] and r["error"] <= r["tolerance"] for r in rows)
    assert {(r["quantity"], r["dtype"]) for r in rows} == {
        ("gradient", "float64"), ("gradient", "float32"), ("hvp", "float64"),
        ("hvp", "float32"), ("symmetry", "float64")}
    assert "all 15 rows pass" in capsys.readouterr().out


def test_unknown_group_or_derivation_is_refused(capsys):
    assert cli.main(["check", "kernelz"]) == 2                     # a user error: one line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown derivation(s) ['kernelz']" in err[0]
    assert "choose a group" in err[0]


def test_a_wrong_derivation_fails_the_check(tmp_path, monkeypatch):
    """A sign error in the LSTM cell's weight gradient: the row FAILs and the exit status is
    1 (the check can fail)."""
    from metacore.layers import lstm as L
    real = L.lstm_cell_backward

    def broken(dh, dc, cache):
        dx, dh0, dc0, dW, db = real(dh, dc, cache)
        return dx, dh0, dc0, -dW, db
    monkeypatch.setattr(L, "lstm_cell_backward", broken)
    out = tmp_path / "rows.json"
    assert cli.main(["check", "lstm_cell", "--json", str(out), "--dtype", "float64"]) == 1
    rows = json.loads(out.read_text())
    assert [r["pass"] for r in rows] == [False] and rows[0]["error"] > 0.1


def test_a_wrong_meta_gradient_fails_the_check(monkeypatch):
    """A MAML meta-gradient missing its second-order terms (FOMAML's) is caught."""
    import metacore.algorithms as algos
    import metacore.check_more as more
    real = algos.maml_gradient
    monkeypatch.setattr(algos, "maml_gradient",
                        lambda *a, **k: real(*a, **dict(k, first_order=True)))
    case = [c for c in more._meta_cases() if c.name == "maml[sinusoid,k=3]"][0]
    rows = check.measure(case)
    err = [e for q, d, e in rows if (q, d) == ("gradient", "float64")][0]
    assert err > 1e-3


def test_cuda_simulator_rows(tmp_path):
    """--cuda-sim reruns the check with NUMBA_ENABLE_CUDASIM=1: the Numba CUDA kernels join
    the backend rows (numba-cuda is part of the 'cuda' extra)."""
    import importlib.util
    import os
    import subprocess
    import sys
    if importlib.util.find_spec("numba") is None or importlib.util.find_spec("numba.cuda") is None:
        pytest.skip("numba / numba-cuda not installed")
    out = tmp_path / "rows.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-m", "metacore", "check", "distance", "lrua_episode",
                        "--cuda-sim", "--json", str(out)], cwd=root, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads(out.read_text())
    sim = [x for x in rows if x["quantity"] == "backend:numba-cuda vs reference"]
    # lrua_episode[per_head,add] has no device row: the device backends have no add vector
    assert {x["name"] for x in sim} == {"distance[sqeuclidean]", "distance[cosine]",
                                        "distance[l1]", "lrua_episode",
                                        "lrua_episode[per_head]"}
    assert {x["dtype"] for x in sim} == {"float64", "float32"} and all(x["pass"] for x in sim)
