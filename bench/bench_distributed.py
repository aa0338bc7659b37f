"""Meta-steps per second of Conv-4 second-order MAML on Omniglot (5-way 1-shot, meta-batch 32,
float32, one BLAS thread per rank) with R = 1 and 2 MPI ranks on this machine.

Run: python -m pytest bench/bench_distributed.py -q -s      (skips without mpirun / mpi4py)

Each R runs `mpirun -n R metacore train maml --task omniglot --distributed` for STEPS steps and
reads the training wall time that the trainer logs (metrics.jsonl "elapsed_s": sampling,
meta-gradient, Allreduce and the Adam update; start-up, evaluation and checkpoints excluded).
The first LOG steps are a warm-up: the rate is measured over the steps after them. The load
average is printed beside the rates: on a machine shared with other jobs, R ranks get fewer
than R free cores and the speed-up says so.
Communication per step: one Allreduce of the P float32 of the meta-gradient (P read from the
checkpoint: 112,261 for this model, 449 KB) plus one of 2 float64 metrics.
"""
import json
import os
import subprocess
import sys

import pytest

from metacore.distributed import mpi_unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS, LOG = 12, 4


def _rate(out):
    """Meta-steps per second over steps LOG+1 .. STEPS, from the logged training time."""
    with open(out / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    t = {r["step"]: r["elapsed_s"] for r in recs if r["kind"] == "train"}
    return (STEPS - LOG) / (t[STEPS] - t[LOG])


@pytest.mark.skipif(mpi_unavailable() is not None, reason=str(mpi_unavailable()))
def test_conv4_maml_steps_per_second(tmp_path):
    from metacore.checkpoint import load_checkpoint
    env = dict(os.environ, PYTHONPATH=ROOT, OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OPENBLAS_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    rates, loads = {}, {}
    for R in (1, 2):
        out = tmp_path / f"r{R}"
        cmd = ["mpirun", "-n", str(R), "--oversubscribe", sys.executable, "-m", "metacore",
               "train", "maml", "--task", "omniglot", "--out", str(out), "--iterations",
               str(STEPS), "--log-every", str(LOG), "--eval-every", str(10 ** 6),
               "--eval-tasks", "4", "--ckpt-every", str(10 ** 6), "--no-progress",
               "--distributed"]
        r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        loads[R] = os.getloadavg()[0]                  # the 1-minute average over the run
        rates[R] = _rate(out)
    params = load_checkpoint(out / "checkpoint.npz")[0]["params"]
    print(f"\nConv-4 MAML 5-way 1-shot, meta-batch 32, float32, {os.cpu_count()} CPUs; "
          f"Allreduce of P = {params.size:,} {params.dtype} ({params.nbytes / 1e3:.0f} KB) "
          f"per step")
    for R, rate in rates.items():
        print(f"  R = {R}: {rate:.3f} meta-steps/s ({1 / rate:.2f} s per step), "
              f"speed-up {rate / rates[1]:.2f}x, load average {loads[R]:.1f} at the end")
    assert all(r > 0 for r in rates.values())
