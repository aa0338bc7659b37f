"""`metacore train --distributed` under mpirun on localhost: R = 1, 2, 3 ranks end with the
parameters of the single-process run (float64, 1e-12 relative) for MAML, FOMAML, Reptile and
ProtoNets (a meta-batch of episodes, BN running statistics included), the task split rule,
resume with another rank count, clear errors for what cannot be split or ranks that start
apart, and a killed rank or one that raises ending the job with an error instead of a hang."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from metacore.checkpoint import load_checkpoint
from metacore.distributed import ABORT_EXIT_CODE, check_same_start, mpi_unavailable, task_blocks
from metacore.gradcheck import rel_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


needs_mpi = pytest.mark.skipif(mpi_unavailable() is not None, reason=str(mpi_unavailable()))


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


# ProtoNets: tiny 3-way 1-shot episodes on 8-channel Conv-4, 5 episodes a step (so R = 3
# gets blocks of 2, 2, 1). SGD, not Adam: a conv bias before batch norm (and the last BN
# shift, as distances ignore a common shift) has a gradient that is zero but for rounding,
# and Adam's g / sqrt(v) turns that noise into real steps, so those entries differ between
# any two summation orders (docs/DISTRIBUTED.md); SGD keeps noise at noise.
PROTO = ["--set", "channels=8", "--set", "n_way=3", "--set", "queries=2", "--set",
         "val_way=3", "--set", "val_episodes=3", "--outer-opt", "sgd", "--outer-lr", "0.1"]


def _protonet_cmd(out, ranks, meta_batch=5, algo="protonet"):
    cmd = [sys.executable, "-m", "metacore", "train", algo, "--task", "omniglot", "--out",
           str(out), "--iterations", "20", "--meta-batch", str(meta_batch), "--dtype",
           "float64", "--seed", "4", "--eval-every", "10", "--log-every", "5", "--ckpt-every",
           "5", "--no-progress"] + PROTO
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


class _TwoRanks:
    """Rank 0 of 2, the other rank's share of every sum given."""
    rank, size = 0, 2

    def __init__(self, other_step, other_params):
        self.other = (other_step, other_params)

    def allreduce_sum(self, x):
        peer = np.zeros_like(x)
        peer[1] = _row(*self.other)
        return x + peer


def _row(step, params):
    return step, int.from_bytes(hashlib.sha256(params.tobytes()).digest()[:6], "big")


def test_ranks_that_start_apart_are_refused():
    p = np.arange(5.0)
    check_same_start(_TwoRanks(7, p.copy()), 7, p)          # agree: nothing raised
    with pytest.raises(RuntimeError, match="rank 1 starts at step 0, rank 0 at step 7;.*"
                                           "file system they all share"):
        check_same_start(_TwoRanks(0, p.copy()), 7, p)
    with pytest.raises(RuntimeError, match="rank 1 starts at step 7, rank 0 at step 7 with "
                                           "other parameters"):
        check_same_start(_TwoRanks(7, p + 1e-9 * np.eye(5)[0]), 7, p)


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
def test_protonet_ranks_match_single_process(tmp_path):
    _run(_protonet_cmd(tmp_path / "single", 0))
    ref_arrays, ref_meta = load_checkpoint(tmp_path / "single" / "checkpoint.npz")
    bufs = sorted(k for k in ref_arrays if k.startswith("buf."))
    assert len(bufs) == 8                                    # 4 BN layers x mean, var
    p0, b0 = _protonet_at_init(tmp_path / "init")
    assert not np.array_equal(ref_arrays["params"], p0)     # it did train
    for R in (1, 2, 3):
        out = tmp_path / f"r{R}"
        _run(_protonet_cmd(out, R))
        arrays, meta = load_checkpoint(out / "checkpoint.npz")
        assert meta["step"] == ref_meta["step"] == 20
        err = rel_error(arrays["params"], ref_arrays["params"])
        assert err <= 1e-12, (R, err)
        for k in bufs:              # every rank's running statistics are the whole batch's
            assert not np.array_equal(arrays[k], b0[k[4:]]), k
            err = rel_error(arrays[k], ref_arrays[k])
            assert err <= 1e-12, (R, k, err)
        with open(out / "metrics.jsonl") as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == sorted(steps) and steps.count(20) == 2


def _protonet_at_init(out):
    from metacore.training import Trainer, make_config
    cfg = make_config("protonet", "omniglot", out, seed=4, dtype="float64", meta_batch=5,
                      channels=8, n_way=3, queries=2, val_way=3, val_episodes=3,
                      outer_opt="sgd", outer_lr=0.1)
    t = Trainer(cfg, progress=False)
    return t.params, t.method.buffers()


@needs_mpi
def test_what_cannot_be_split_is_refused_clearly(tmp_path):
    for cmd, msg in [(_protonet_cmd(tmp_path / "one", 2, meta_batch=1),
                      "2 ranks for a meta-batch of 1 tasks"),
                     (_protonet_cmd(tmp_path / "matching", 2, meta_batch=1, algo="matching"),
                      "matching does not support --distributed")]:
        r = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True,
                           timeout=240)
        assert r.returncode != 0 and msg in r.stdout + r.stderr, r.stderr[-3000:]
        assert not os.path.exists(os.path.join(cmd[cmd.index("--out") + 1],
                                               "checkpoint.npz"))


def test_meta_batch_of_episodes_is_protonet_only(tmp_path):
    from metacore.training import make_config
    assert make_config("protonet", "omniglot", tmp_path)["meta_batch"] == 1   # the paper's
    with pytest.raises(ValueError, match="implemented for protonet only, not relation"):
        make_config("relation", "omniglot", tmp_path, meta_batch=2)
    with pytest.raises(ValueError, match="meta_batch must be an int >= 1"):
        make_config("protonet", "omniglot", tmp_path, meta_batch=0)


def test_checkpoint_from_before_meta_batch_still_resumes(tmp_path):
    """A ProtoNet run written before meta_batch existed resumes at the default (1), the old
    behaviour; another value is a changed setting and refused."""
    from metacore.checkpoint import save_checkpoint
    from metacore.training import Trainer, make_config
    tiny = dict(channels=8, n_way=3, queries=2, val_way=3, val_episodes=3, log_every=1,
                eval_every=1, ckpt_every=1)
    Trainer(make_config("protonet", "omniglot", tmp_path, iterations=1, **tiny),
            progress=False).train()
    path = tmp_path / "checkpoint.npz"
    arrays, meta = load_checkpoint(path)
    del meta["config"]["meta_batch"]
    save_checkpoint(path, arrays, meta)
    with pytest.raises(ValueError, match=r"settings \['meta_batch'\] differ"):
        Trainer(make_config("protonet", "omniglot", tmp_path, iterations=2, meta_batch=2,
                            **tiny), resume=True, progress=False)
    t = Trainer(make_config("protonet", "omniglot", tmp_path, iterations=2, **tiny),
                resume=True, progress=False)
    assert t.step == 1
    t.train()
    assert load_checkpoint(path)[1]["step"] == 2


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
    # mpirun exits with 128 + the signal that ended a rank. (Its "mpirun noticed that process
    # rank 1 ... exited on signal 9" text comes from show_help, which Open MPI 4.1 can drop.)
    assert proc.returncode == 128 + signal.SIGKILL, (proc.returncode, text[-3000:])
    assert time.time() - t0 < 60
    arrays, meta = load_checkpoint(ckpt)                     # atomic: still valid
    assert meta["step"] % 5 == 0 and np.isfinite(arrays["params"]).all()


# Runs `metacore train` through the CLI with rank 1's meta-gradient raising at its 8th call.
RAISING_RANK = """
import os, sys
from metacore.methods import maml_family
if os.environ["OMPI_COMM_WORLD_RANK"] == "1":
    calls = [0]
    real = maml_family.Method.gradient
    def gradient(self, params, batch):
        calls[0] += 1
        if calls[0] == 8:
            raise RuntimeError("injected failure on rank 1")
        return real(self, params, batch)
    maml_family.Method.gradient = gradient
from metacore.cli import main
sys.exit(main(sys.argv[1:]))
"""


@needs_mpi
def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    script = tmp_path / "raising.py"
    script.write_text(RAISING_RANK)
    cmd = _train_cmd("maml", tmp_path / "raised", 2, iterations=1000)
    cmd[cmd.index("-m"):cmd.index("-m") + 2] = [str(script)]      # python raising.py train ...
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        text = proc.communicate(timeout=90)[0]
    except subprocess.TimeoutExpired:
        proc.terminate()                                         # mpirun ends its ranks
        proc.communicate()
        pytest.fail("the job hung after rank 1 raised")
    # mpirun exits with the code given to MPI_Abort: proof the abort path ended the job.
    # (Open MPI's own "MPI_ABORT was invoked" banner is not checked: 4.1's show_help
    # sometimes drops it with "ORTE_ERROR_LOG: Data unpack would read past end of buffer".)
    assert proc.returncode == ABORT_EXIT_CODE, (proc.returncode, text[-3000:])
    assert "rank 1 of 2 failed; aborting the job" in text, text[-3000:]
    assert "injected failure on rank 1" in text, text[-3000:]
    arrays, meta = load_checkpoint(tmp_path / "raised" / "checkpoint.npz")
    assert meta["step"] == 5 and np.isfinite(arrays["params"]).all()
