"""Helpers for the tests that run `metacore train` in a child process and compare runs
(tests/test_training.py, tests/test_metric_methods.py, tests/test_lstm_optimizer.py). Not a
test module; imported from the tests folder, which pytest puts on sys.path."""
import json
import os

from metacore.checkpoint import CheckpointError, load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(one_thread=False):
    """os.environ with the checkout first on PYTHONPATH (and one BLAS/Numba thread)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    if one_thread:
        env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    return env


def checkpoint_step(path):
    """The step of the checkpoint at `path`, or -1 while there is none (or it is mid-write)."""
    try:
        return load_checkpoint(path)[1]["step"]
    except (FileNotFoundError, CheckpointError, OSError):
        return -1


def metrics_without_time(path):
    """The records of a metrics.jsonl with their wall times removed (the only field that may
    differ between a resumed and an uninterrupted run)."""
    with open(path) as f:
        recs = [json.loads(line) for line in f]
    for r in recs:
        r.pop("elapsed_s")
    return recs
