"""LRUA memory (MANN): one episode forward + backward per backend, float32, with the ratio to
the NumPy reference measured in the same run; once through the whole-episode pair, once as
MANN runs it (50 calls of the step pair forward, then 50 step backward calls in reverse).

Run: python -m pytest bench/bench_lrua.py --benchmark-only -q -s

Shape letters: T time steps, B episodes, H heads, S memory slots, W slot width.
Size (issue 5 and Santoro et al. 2016's Omniglot setup): T = 50 steps, B = 16 episodes,
H = 4 read heads, memory S x W = 128 x 40. Inputs start as MANN does: M_0 = 1e-6, w_u_0 = 0,
w_r_0 one-hot on slot 0; keys and gates random.

The timed call is what one training step of the memory costs, per backend in two ways:
"tape", lrua_forward_tape then lrua_backward_tape (the reverse sweep only, from what the
forward kept), and "recompute", lrua_forward then lrua_backward (which reruns the forward
inside). Nominal FLOP count per step per episode, the same for every variant so that
GFLOP/s ratios are time ratios (2 per multiply-add, only the H S W terms):
    forward   6 H S W   (write w_w^T k, cosines k . M(i), read w_r M)
    sweep    14 H S W   (read: dw_r, dM; cosine: dk, dM; write: dk, dw_w)
    total    20 H S W   = forward + sweep
The recomputing backward and the step chain (each step backward recomputes its step's
forward) do 6 H S W more, not counted.
Before timing, every backend's reads and gradients are checked against the float64
reference on the same inputs (normwise relative error <= 1e-4); the first call also warms
up (compiles Numba, or loads its cache).
"""

import numpy as np
import pytest
from _timing import median_seconds
from peers.workloads import LRUA, lrua_flops, make_lrua   # bench/ is on sys.path, as for _timing

import metacore  # noqa: F401
from metacore.gradcheck import rel_error
from metacore.kernels import lrua as K

T, B, H, S, W = (LRUA[n] for n in ("T", "B", "H", "S", "W"))
GAMMA = LRUA["gamma"]
FLOPS = lrua_flops(T, B, H, S, W)


def make(seed=0):
    """-> keys (T, B, H, W), alpha (H,), memory0 (B, S, W), read0 (B, H, S), usage0 (B, S),
    dreads (T, B, H, W), float32: the inputs of the peer benchmark's LRUA workload (one
    maker, so both benches time the same episode)."""
    a = make_lrua(LRUA, seed)
    return tuple(a[n] for n in ("keys", "alpha", "memory0", "read0", "usage0", "probe"))


def step(backend, keys, alpha, memory0, read0, usage0, dreads, path="recompute"):
    """Forward then backward of one batch of episodes -> (reads, dkeys, dalpha, dmemory0,
    dread0); path "tape": lrua_forward_tape + lrua_backward_tape, "recompute":
    lrua_forward + lrua_backward."""
    if path == "tape":
        *out, tape = K.lrua_forward_tape(keys, alpha, memory0, read0, usage0, GAMMA,
                                         backend=backend)
        return (out[0],) + tuple(K.lrua_backward_tape(dreads, tape))
    reads = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)[0]
    grads = K.lrua_backward(dreads, keys, alpha, memory0, read0, usage0, GAMMA,
                            backend=backend)
    return (reads,) + tuple(grads)


_REF64 = {}


def check(result, args):
    """Reads and gradients against the float64 reference on the same (float32) values."""
    if "ref" not in _REF64:
        _REF64["ref"] = step("reference", *(x.astype(np.float64) for x in args))
    for name, a, r in zip(("reads", "dkeys", "dalpha", "dmemory0", "dread0"), result,
                          _REF64["ref"]):
        err = rel_error(a, r)
        assert err <= 1e-4, f"{name}: rel_error {err:.3g}; not timing a wrong result"


@pytest.mark.parametrize("path", ["tape", "recompute"])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_bench_lrua_episode(benchmark, backend, path):
    if backend not in K.available_backends():
        pytest.skip(f"{backend} not importable")
    args = make()
    fn = lambda: step(backend, *args, path=path)          # noqa: E731
    check(fn(), args)                          # also the warm-up
    result = benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    check(result, args)
    med = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = round(FLOPS / med / 1e9, 3)
    benchmark.extra_info["episodes_per_s"] = round(B / med, 1)
    if backend != "reference":
        base = median_seconds(lambda: step("reference", *args), 5, warmup=True)
        benchmark.extra_info["reference_median_s"] = round(base, 4)
        benchmark.extra_info["speedup_over_reference"] = round(base / med, 2)
    print(f"\nlrua {backend} ({path}): median {med * 1e3:.1f} ms per forward+backward of "
          f"{B} x {T}-step episodes, {FLOPS / med / 1e9:.2f} GFLOP/s nominal"
          + (f", {benchmark.extra_info['speedup_over_reference']}x the reference "
             f"({benchmark.extra_info['reference_median_s'] * 1e3:.1f} ms, same run)"
             if backend != "reference" else ""))


def step_chain(backend, keys, alpha, memory0, read0, usage0, dreads):
    """The episode as MANN runs it: T step forwards, then T step backwards in reverse
    -> (reads, dkeys, dalpha, dmemory0, dread0), comparable with step()."""
    M, wr, wu = memory0, read0, usage0
    states, reads = [], []
    for t in range(T):
        states.append((M, wr, wu))
        r, M, wr, _, wu = K.lrua_step_forward(keys[t], alpha, M, wr, wu, GAMMA,
                                              backend=backend)
        reads.append(r)
    dM, dwr = np.zeros_like(memory0), np.zeros_like(read0)
    dkeys, dalpha = [None] * T, 0
    for t in range(T - 1, -1, -1):
        dkeys[t], da, dM, dwr = K.lrua_step_backward(dreads[t], dM, dwr, keys[t], alpha,
                                                     *states[t], GAMMA, backend=backend)
        dalpha = dalpha + da
    return np.stack(reads), np.stack(dkeys), dalpha, dM, dwr


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_bench_lrua_step_chain(benchmark, backend):
    if backend not in K.available_backends():
        pytest.skip(f"{backend} not importable")
    args = make()
    fn = lambda: step_chain(backend, *args)    # noqa: E731
    check(fn(), args)                          # also the warm-up
    result = benchmark.pedantic(fn, rounds=10, warmup_rounds=1)
    check(result, args)
    med = benchmark.stats.stats.median
    benchmark.extra_info["gflops"] = round(FLOPS / med / 1e9, 3)
    benchmark.extra_info["episodes_per_s"] = round(B / med, 1)
    if backend != "reference":
        base = median_seconds(lambda: step_chain("reference", *args), 5, warmup=True)
        benchmark.extra_info["reference_median_s"] = round(base, 4)
        benchmark.extra_info["speedup_over_reference"] = round(base / med, 2)
    print(f"\nlrua step chain {backend}: median {med * 1e3:.1f} ms per {T} step forwards + "
          f"{T} step backwards of {B} episodes, {FLOPS / med / 1e9:.2f} GFLOP/s nominal"
          + (f", {benchmark.extra_info['speedup_over_reference']}x the reference "
             f"({benchmark.extra_info['reference_median_s'] * 1e3:.1f} ms, same run)"
             if backend != "reference" else ""))
