"""The run directory: its lock (one process per run, named in the refusal, released by the
OS when its holder is SIGKILLed), --resume without a run, a run that cannot be resumed left
untouched, and moved or copied runs resumed bit-identically (metacore.rundir, Trainer)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from metacore.errors import RunDirError, RunExistsError, RunLockedError, UserError
from metacore.rundir import LOCK_NAME, open_run_dir
from metacore.training import Trainer, make_config

from _run_helpers import ROOT, checkpoint_step, child_env

HOLD = """
import sys, time
from metacore.rundir import open_run_dir
lock = open_run_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(120)
"""


def _cfg(out, **over):
    kw = dict(iterations=6, eval_every=3, eval_tasks=4, log_every=1, ckpt_every=3, seed=4,
              dtype="float64")
    kw.update(over)
    return make_config("fomaml", "sinusoid", out, **kw)


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], env=child_env(True),
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_names_its_holder_and_dies_with_it(tmp_path):
    run = tmp_path / "run"
    proc = _holder(run)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by another metacore process "
                                                 rf"\(PID {proc.pid};"):
            open_run_dir(run)
        with pytest.raises(RunLockedError, match=f"PID {proc.pid}"):   # the Trainer too
            Trainer(_cfg(run), progress=False)
        assert sorted(os.listdir(run)) == [LOCK_NAME]                    # nothing written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with open_run_dir(run) as lock:         # the OS dropped the dead holder's flock
        assert lock.held
        with open(run / LOCK_NAME) as f:
            assert f.read().strip() == str(os.getpid())
    assert not lock.held


def test_one_trainer_per_directory_in_one_process(tmp_path):
    with Trainer(_cfg(tmp_path), progress=False) as t:
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            Trainer(_cfg(tmp_path), resume=True, progress=False)
        t.train()                   # releases the lock when its training ends
        t2 = Trainer(_cfg(tmp_path, iterations=8), resume=True, progress=False)
        assert t2.step == 6
        t.cfg["iterations"] = 7
        with pytest.raises(RunLockedError, match=f"PID {os.getpid()}"):
            t.train()               # t2 holds it now
        t2.train()
        with pytest.raises(RunDirError, match="changed since this Trainer last saved or "
                                              "loaded it"):
            t.train()               # t2 moved the run on: t's state is stale
    with Trainer(_cfg(tmp_path, iterations=9), resume=True, progress=False) as t3:
        assert t3.step == 8
        t3.train()
        t3.cfg["iterations"] = 10
        t3.train()                  # the same Trainer may train again: it takes the lock back
        assert t3.step == 10
    # a refused construction releases the lock at once (no Trainer object to close)
    with pytest.raises(RunExistsError, match="pass --resume"):
        Trainer(_cfg(tmp_path), progress=False)
    open_run_dir(tmp_path).release()


def _train_cmd(out, *extra):
    return [sys.executable, "-m", "metacore", "train", "fomaml", "--task", "sinusoid", "--out",
            str(out), "--iterations", "100000", "--ckpt-every", "5", "--log-every", "5",
            "--eval-every", "100000", "--eval-tasks", "4", "--seed", "2", "--no-progress"
            ] + list(extra)


def test_two_processes_on_one_run_directory(tmp_path):
    """Two trainings started together: one runs, the other is refused naming its PID. A
    --resume while it runs is refused too; after SIGKILL, --resume continues the run."""
    run = tmp_path / "run"
    procs = [subprocess.Popen(_train_cmd(run), env=child_env(True), cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline = time.time() + 60
        while all(p.poll() is None for p in procs) and time.time() < deadline:
            time.sleep(0.02)
        done = [p for p in procs if p.poll() is not None]
        assert len(done) == 1, "neither process was refused"
        loser = done[0]
        winner = procs[1 - procs.index(loser)]
        err = loser.stderr.read()
        assert loser.returncode == 2, err
        assert err.strip().splitlines() == [
            f"metacore train: error: {run} is in use by another metacore process "
            f"(PID {winner.pid}; lock {run / LOCK_NAME}); wait for it to end or choose "
            f"another --out"], err
        while checkpoint_step(run / "checkpoint.npz") < 5 and time.time() < deadline:
            time.sleep(0.02)
        assert winner.poll() is None
        r = subprocess.run(_train_cmd(run, "--resume"), env=child_env(True), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and f"(PID {winner.pid};" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
            p.stdout.close(), p.stderr.close()
    assert winner.returncode == -signal.SIGKILL
    stopped = checkpoint_step(run / "checkpoint.npz")
    r = subprocess.run(_train_cmd(run, "--resume", "--iterations", str(stopped + 5)),
                       env=child_env(True), cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert checkpoint_step(run / "checkpoint.npz") == stopped + 5


def test_resume_without_a_run_is_an_error(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(RunDirError, match="no run to resume in .*missing.*--resume-or-start"):
        Trainer(_cfg(missing), resume=True, progress=False)
    assert not missing.exists()                          # nothing created
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match="no run to resume"):
        Trainer(_cfg(empty), resume=True, progress=False)
    with Trainer(_cfg(empty), resume="auto", progress=False) as t:    # --resume-or-start
        assert t.step == 0
        t.train()
    with Trainer(_cfg(empty, iterations=8), resume="auto", progress=False) as t:
        assert t.step == 6
    with pytest.raises(ValueError, match="resume must be False, True or 'auto'"):
        Trainer(_cfg(empty), resume="yes", progress=False)


@pytest.mark.parametrize("resume", [False, True, "auto"])
def test_a_run_without_checkpoint_is_never_overwritten(tmp_path, resume):
    with Trainer(_cfg(tmp_path), progress=False) as t:
        t.train()
    os.remove(tmp_path / "checkpoint.npz")
    before = {n: (tmp_path / n).read_bytes() for n in ("config.json", "metrics.jsonl")}
    assert before["metrics.jsonl"].count(b"\n") == 8         # 6 train + 2 eval records
    with pytest.raises(RunDirError, match="holds config.json and metrics.jsonl of a run but "
                                          "no checkpoint.npz"):
        Trainer(_cfg(tmp_path), resume=resume, progress=False)
    assert {n: (tmp_path / n).read_bytes() for n in before} == before


def test_moved_and_copied_runs_resume_bit_identically(tmp_path):
    with Trainer(_cfg(tmp_path / "full"), progress=False) as t:
        t.train()
        full = t.params.copy()
    with Trainer(_cfg(tmp_path / "half", iterations=3), progress=False) as t:
        t.train()
    shutil.copytree(tmp_path / "half", tmp_path / "copy")
    shutil.move(tmp_path / "half", tmp_path / "moved")
    for name in ("copy", "moved"):
        with Trainer(_cfg(tmp_path / name), resume=True, progress=False) as t:
            assert t.step == 3
            t.train()
            assert t.params.tobytes() == full.tobytes(), name
        with open(tmp_path / name / "config.json") as f:
            assert f'"out": "{tmp_path / name}"' in f.read()
        with open(tmp_path / name / "metrics.jsonl") as f, \
                open(tmp_path / "full" / "metrics.jsonl") as g:
            assert len(f.readlines()) == len(g.readlines())


def test_cli_resumes_a_moved_run(tmp_path, capsys):
    from metacore.cli import main
    args = ["--iterations", "4", "--eval-every", "2", "--eval-tasks", "4", "--log-every", "1",
            "--ckpt-every", "2", "--no-progress"]
    assert main(["train", "fomaml", "--task", "sinusoid", "--out", str(tmp_path / "a")]
                + args) == 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    assert main(["train", "fomaml", "--task", "sinusoid", "--out", str(tmp_path / "b"),
                 "--resume", "--iterations", "6", "--no-progress"]) == 0
    assert "step 6" in capsys.readouterr().out
    # resuming with another setting: one line, exit 2
    assert main(["train", "fomaml", "--task", "sinusoid", "--out", str(tmp_path / "b"),
                 "--resume", "--inner-lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("metacore train: error: train --resume: the settings ['inner_lr'] "
                          "differ from the checkpoint's"), err
    assert "inner_lr 0.5 (checkpoint: 0.01)" in err


def test_user_error_type_is_a_value_error():
    # API callers that catch ValueError for bad input keep working
    assert issubclass(UserError, ValueError) and issubclass(RunExistsError, FileExistsError)


def test_cli_resume_or_start(tmp_path, capsys):
    from metacore.cli import main
    base = ["train", "fomaml", "--task", "sinusoid", "--out", str(tmp_path / "r"),
            "--eval-every", "2", "--eval-tasks", "4", "--log-every", "1", "--ckpt-every", "2",
            "--no-progress", "--resume-or-start"]
    assert main(base + ["--iterations", "2"]) == 0             # no run: starts one
    assert "step 2" in capsys.readouterr().out
    assert main(base + ["--iterations", "4"]) == 0             # a run: continues it
    assert "step 4" in capsys.readouterr().out
    assert main(base[:-1] + ["--iterations", "6"]) == 2       # without a resume flag: refused
    assert "pass --resume to continue it" in capsys.readouterr().err
