"""Runs tests/cuda_sim_cases.py (every Numba CUDA kernel under the CUDA simulator against
reference/) in a fresh pytest subprocess with NUMBA_ENABLE_CUDASIM=1.

Why a subprocess: Numba reads NUMBA_ENABLE_CUDASIM once, when numba is first imported, and by
the time this module runs the session has imported numba (the CPU kernels) and usually
numba.cuda (the dispatch and the PTX tests). Setting the variable here would change nothing;
a child interpreter that sets it before its first import is the robust way.
"""
import importlib.metadata
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _has(dist):
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _has("numba-cuda"),
                    reason="numba-cuda is not installed (pip install -e '.[cuda]'): the CUDA "
                           "simulator tests of the Numba CUDA kernels need it")
def test_numba_cuda_kernels_under_the_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NUMBA_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-rs", "-n", "0", "--dist", "no",
           "-p", "no:cacheprovider",
           "-p", "no:benchmark", os.path.join("tests", "cuda_sim_cases.py")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"simulator tests failed (exit {res.returncode}):\n{tail}"
    # the module skips as a whole when it does not see the simulator: that must not pass
    assert " passed" in res.stdout and "run by tests/test_cuda_sim.py" not in res.stdout, tail
    # nor may any case skip inside it: every one runs under the simulator (the skip reasons
    # are in the tail, from -rs)
    summary = res.stdout.strip().splitlines()[-1]
    assert "skipped" not in summary and "xfail" not in summary, \
        f"simulator cases skipped ({summary}):\n{tail}"
