"""Packaging: nothing but `metacore` lands at the top level of site-packages, and the NumPy
path works when numba cannot be imported."""
import os
import subprocess
import sys

import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _setup_kwargs(monkeypatch):
    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: captured.update(kw))
    monkeypatch.chdir(ROOT)
    code = open(os.path.join(ROOT, "setup.py")).read()
    exec(compile(code, "setup.py", "exec"), {"__file__": os.path.join(ROOT, "setup.py"),
                                             "__name__": "__main__"})
    return captured


def test_only_metacore_is_installed_at_top_level(monkeypatch):
    kw = _setup_kwargs(monkeypatch)
    assert {p.split(".")[0] for p in kw["packages"]} == {"metacore"}
    assert kw["package_dir"]["metacore.kernels"] == "kernels"
    assert kw["package_dir"]["metacore.reference"] == "reference"
    # every folder with an __init__.py is shipped
    for folder, root in (("metacore", "metacore"), ("kernels", "metacore.kernels"),
                         ("reference", "metacore.reference")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
                name = root if rel == "." else root + "." + rel.replace(os.sep, ".")
                assert name in kw["packages"], name


def test_runtime_requirements_are_numpy_numba_and_scipy_only(monkeypatch):
    # scipy: the BLAS that Numba's np.dot calls (the distance kernels' GEMM route)
    kw = _setup_kwargs(monkeypatch)
    names = sorted(r.split(">")[0].split("=")[0] for r in kw["install_requires"])
    assert names == ["numba", "numpy", "scipy"]
    assert set(kw["extras_require"]) >= {"test", "cuda", "plot"}


def test_numpy_path_works_without_numba():
    code = (
        "import sys; sys.modules['numba'] = None\n"     # makes `import numba` raise ImportError
        "import numpy as np, metacore, metacore.kernels, metacore.reference\n"
        "from metacore import models, check\n"
        "from metacore.params import tile_tasks\n"
        "m = models.sinusoid_mlp(); rng = np.random.default_rng(0)\n"
        "th = tile_tasks(m.init_params(rng), 2); x = rng.standard_normal((2, 5, 1))\n"
        "loss, g, hv = m.hvp(th, x, x, th)\n"
        "assert np.isfinite(hv).all()\n"
        "assert check.run(['linear'], ('float64',), out=lambda s: None) == 0\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_check_cli_exit_status_and_selection():
    r = subprocess.run([sys.executable, "-m", "metacore", "check", "relu", "--dtype", "float64"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("relu")]
    assert [row.split()[2] for row in rows] == ["gradient", "hvp", "symmetry"]
    assert all(row.endswith("PASS") for row in rows)
    r = subprocess.run([sys.executable, "-m", "metacore", "check", "nosuchlayer"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "unknown derivation(s) ['nosuchlayer']" in r.stderr


def test_check_reports_fail_rows(monkeypatch):
    """A wrong derivation must FAIL: break ReLU's backward and see the row and the count."""
    from metacore import check
    from metacore.layers import relu
    monkeypatch.setattr(relu, "relu_backward", lambda dy, mask: dy * mask * 1.001)
    lines = []
    failures = check.run(["relu"], ("float64",), out=lines.append)
    result = {l.split()[2]: l.split()[-1] for l in lines if l.startswith("relu")}
    # the gradient is wrong, and so is the HVP row, which differentiates that gradient
    assert result == {"gradient": "FAIL", "hvp": "FAIL", "symmetry": "PASS"}
    assert failures == 2
