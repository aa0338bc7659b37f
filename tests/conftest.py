"""pytest-xdist's worker count for the suite (pytest.ini: -n auto --dist loadfile).

One worker per core this process may run on (`taskset -c 1 python -m pytest ...` gets one),
and no worker process at all where that is a single core: the tests then run in-process, as
without xdist."""
import os


def pytest_xdist_auto_num_workers(config):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 0 if (cores or 1) <= 1 else cores


# The longest files first, so that no worker starts one of them last while the others idle
# (each is mostly first-time Numba compiles, or a simulator run in a subprocess).
LONGEST_FIRST = ("test_cuda_sim.py", "test_derivations.py", "test_check_cli.py",
                 "test_lrua.py", "test_distance.py", "test_distributed.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
    items.sort(key=rank)                 # stable: each file keeps its own order
