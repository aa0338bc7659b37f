"""metacore.malloc: freed buffers stay in the process (no page faults per step), and the
user's own settings win. Each case runs in a fresh interpreter: mallopt is process-wide."""
import inspect
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="mallopt thresholds are a glibc feature; elsewhere keep_freed_memory() is a no-op")

# each round allocates and touches four 8 MB arrays and frees them (a step's activations);
# print the call's result and the minor page faults of 40 rounds. Without the setting, glibc
# trims freed memory off the heap top each round (its dynamic trim threshold stays below
# 32 MB), so every round faults pages in again.
CHILD = """
import resource, numpy as np
from metacore.malloc import keep_freed_memory
ok = keep_freed_memory()
def round_():
    arrays = [np.ones(2 * 1024 * 1024, np.float32) for _ in range(4)]
    del arrays
round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    round_()
print(ok, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def run_child(**env_extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                        "METACORE_KEEP_MALLOC")}
    env.update(env_extra)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True,
                         text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@glibc_only
def test_keep_freed_memory_stops_the_page_faults_of_a_reused_buffer():
    kept, faults_kept = run_child()
    off, faults_off = run_child(METACORE_KEEP_MALLOC="0")
    assert kept and not off
    # at least 1,000 pages (4 MB) per round without it (8 MB measured); a handful with it
    assert faults_off > 40 * 1000
    assert faults_kept < 200


@glibc_only
def test_the_users_malloc_environment_wins():
    kept, faults = run_child(MALLOC_MMAP_THRESHOLD_="131072")
    assert not kept
    assert faults > 40 * 1000           # the user's 128 kB threshold is in force


def test_cli_train_and_eval_apply_it(monkeypatch):
    """`train` and `eval` both set up the process through cli._set_up_process."""
    import types
    from metacore import cli, malloc
    calls = []
    monkeypatch.setattr(malloc, "keep_freed_memory", lambda: calls.append(1) or True)
    cli._set_up_process(types.SimpleNamespace(blas_threads=1))
    assert calls == [1]
    for command in (cli._train, cli._eval):
        assert "_set_up_process(args)" in inspect.getsource(command)
