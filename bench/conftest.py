"""Benchmarks time one process alone: pytest.ini's `-n auto` gives them no xdist workers
(pytest-benchmark switches itself off under xdist)."""


def pytest_xdist_auto_num_workers(config):
    return 0
