"""`metacore train --distributed` under mpirun on localhost: R = 1, 2, 3 ranks end with the
parameters of the single-process run (float64, 1e-12 relative), the task split rule, resume
with another rank count, and a killed rank ending the job with an error instead of a hang."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from metacore.checkpoint import load_checkpoint
from metacore.distributed import task_blocks
from metacore.gradcheck import rel_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mpi_missing():
    if shutil.which("mpirun") is None:
        return "mpirun not found (apt-get install openmpi-bin libopenmpi-dev)"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py not installed (pip install 'metacore[mpi]')"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_rmaps_base_oversubscribe="1", OPENBLAS_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    return env


def _train_cmd(algo, out, ranks, iterations=20, extra=()):
    cmd = [sys.executable, "-m", "metacore", "train", algo, "--task", "sinusoid", "--out",
           str(out), "--iterations", str(iterations), "--meta-batch", "5", "--dtype", "float64",
           "--seed", "4", "--eval-every", "10", "--eval-tasks", "4", "--log-every", "5",
           "--ckpt-every", "5", "--no-progress"] + list(extra)
    if algo == "reptile":
        cmd += ["--inner-steps", "3", "--outer-opt", "sgd", "--outer-lr", "0.5"]
    if ranks:
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe"] + cmd + ["--distributed"]
    return cmd


def _run(cmd, timeout=240):
    r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def _params(out):
    arrays, meta = load_checkpoint(os.path.join(out, "checkpoint.npz"))
    return arrays["params"], meta


def test_task_blocks_rule():
    assert task_blocks(5, 1).tolist() == [0, 5]
    assert task_blocks(5, 2).tolist() == [0, 3, 5]
    assert task_blocks(5, 3).tolist() == [0, 2, 4, 5]
    assert task_blocks(32, 3).tolist() == [0, 11, 22, 32]
    with pytest.raises(ValueError, match="4 ranks for a meta-batch of 3 tasks"):
        task_blocks(3, 4)


@needs_mpi
@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile"])
def test_ranks_match_single_process(tmp_path, algo):
    _run(_train_cmd(algo, tmp_path / "single", 0))
    ref, ref_meta = _params(tmp_path / "single")
    for R in (1, 2, 3):
        out = tmp_path / f"r{R}"
        _run(_train_cmd(algo, out, R))
        p, meta = _params(out)
        assert meta["step"] == ref_meta["step"] == 20
        err = rel_error(p, ref)
        assert err <= 1e-12, (algo, R, err)
        assert not np.array_equal(p, _params_at_init(algo))   # it did train
        with open(out / "metrics.jsonl") as f:              # rank 0 alone wrote the log
            steps = [json.loads(line)["step"] for line in f]
        assert steps == sorted(steps) and steps.count(20) == 2


def _params_at_init(algo):
    from metacore.training import Trainer, make_config
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cfg = make_config(algo, "sinusoid", d, seed=4, dtype="float64", meta_batch=5)
        return Trainer(cfg, progress=False).params


@needs_mpi
def test_resume_with_another_rank_count(tmp_path):
    _run(_train_cmd("maml", tmp_path / "single", 0))
    out = tmp_path / "mixed"
    _run(_train_cmd("maml", out, 2, iterations=10))
    _run(_train_cmd("maml", out, 3, iterations=20, extra=["--resume"]))
    err = rel_error(_params(out)[0], _params(tmp_path / "single")[0])
    assert err <= 1e-12, err


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


@needs_mpi
def test_killed_rank_ends_the_job_with_an_error_and_a_valid_checkpoint(tmp_path):
    out = tmp_path / "killed"
    cmd = _train_cmd("maml", out, 2, iterations=10 ** 6)
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpt = out / "checkpoint.npz"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    ranks = [k for k in _children(proc.pid) if "python" in open(f"/proc/{k}/cmdline").read()]
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGKILL)
    t0 = time.time()
    try:
        text = proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job hung for 60 s after a rank was killed")
    assert proc.returncode != 0
    assert time.time() - t0 < 60
    assert "signal 9" in text or "Killed" in text or "exited" in text, text[-3000:]
    arrays, meta = load_checkpoint(ckpt)                     # atomic: still valid
    assert meta["step"] % 5 == 0 and np.isfinite(arrays["params"]).all()
