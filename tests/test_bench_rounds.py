"""The peer benchmark's interleaved rounds (bench/peers/runner.py): the order of the rounds,
when a framework stops taking rounds, and how rounds merge into one row. No timing: the
children are replaced by a fake."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.peers.runner import measure_interleaved, merge_rounds  # noqa: E402


def _fake(call_s, fail=()):
    """run(f, budget, max_calls) with calls of call_s[f] seconds, at least 5 a round."""
    log = []

    def run(f, budget, max_calls):
        log.append((f, budget, max_calls))
        if f in fail:
            return dict(framework=f, ok=False, error="crashed")
        n = min(max_calls, max(5, int(budget / call_s[f])))
        return dict(framework=f, ok=True, check_rel_error=1e-8 * len(log),
                    times=[call_s[f]] * (n - 1) + [call_s[f] / 2])
    return run, log


def test_rounds_interleave_and_a_slow_framework_takes_one():
    run, log = _fake({"fast": 1e-3, "slow": 1.0})
    rows = measure_interleaved(["fast", "slow"], run, budget=2.0, rounds=3)
    assert [f for f, _, _ in log] == ["fast", "slow", "fast", "fast"]
    assert all(b == pytest.approx(2.0 / 3) and m == 666 for _, b, m in log)
    assert rows["fast"]["rounds"] == 3 and rows["fast"]["repeats"] == 3 * 666
    assert rows["slow"]["rounds"] == 1 and rows["slow"]["repeats"] == 5
    assert rows["fast"]["median_s"] == 1e-3 and rows["fast"]["min_s"] == 0.5e-3
    assert rows["fast"]["check_rel_error"] == pytest.approx(4e-8)   # the worst round's
    assert "times" not in rows["fast"]


def test_a_failed_round_fails_the_row_and_ends_its_rounds():
    run, log = _fake({"a": 1e-3, "b": 1e-3}, fail=("b",))
    rows = measure_interleaved(["a", "b"], run, budget=1.0, rounds=2)
    assert [f for f, _, _ in log] == ["a", "b", "a"]
    assert rows["b"] == dict(framework="b", ok=False, error="crashed")
    assert rows["a"]["ok"] and rows["a"]["rounds"] == 2


def test_merge_of_one_round_is_that_round():
    r = dict(framework="x", ok=True, check_rel_error=0.0, times=[3.0, 1.0, 2.0])
    row = merge_rounds([r])
    assert (row["median_s"], row["min_s"], row["repeats"], row["rounds"]) == (2.0, 1.0, 3, 1)


def test_min_rounds_interleave_even_slow_frameworks():
    """On a loaded core every call can fill the budget in one round; --min-rounds keeps the
    rounds interleaved anyway."""
    run, log = _fake({"a": 1.0, "b": 1.0})
    rows = measure_interleaved(["a", "b"], run, budget=1.0, rounds=3, min_rounds=3)
    assert [f for f, _, _ in log] == ["a", "b"] * 3
    assert rows["a"]["rounds"] == rows["b"]["rounds"] == 3
