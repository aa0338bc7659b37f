"""Conv-4 forward + backward (ProtoNet) and loss + gradient + Hessian-vector product (MAML) on
the Numba kernels of the layers (metacore.kernels.convnet_numba) against the layers' NumPy
code, side by side in one run, float32, one BLAS thread.

Run: python -m pytest bench/bench_conv.py --benchmark-only -q -s
Per-op profile (median per op and pass, NumPy path vs Numba path, process CPU time so that
a loaded machine's descheduling does not land on whichever op was running):
     python bench/bench_conv.py [--repeats 5]

Shape letters: T tasks, B images per task, P parameters.

Workloads (real Omniglot episodes, Vinyals split / MAML split, train part):
  protonet  conv4_protonet, one 60-way 1-shot 5-query episode (Snell et al. 2017 training):
            T = 1, B = 360 images of 28 x 28 x 1, batch-norm batch statistics;
            ProtoNet.episode_loss_and_grad (embedding forward, loss, embedding backward).
  maml      conv4_maml 5-way, T = 4 tasks of 5 x (1 + 15) = 80 images (Finn et al. 2017);
            Model.hvp: loss, gradient and exact Hessian-vector product in one call.

Each benchmark first checks both paths against the float64 NumPy path (rel_error): the
float64 Numba path must agree to 1e-10, and the float32 Numba path must be no further from it
than the float32 NumPy path is (its float64 batch-norm sums make it closer: measured 2.1e-3
vs 1.9e-2 for the ProtoNet gradient, 6.4e-5 vs 8.5e-3 for the MAML output). Then it warms up
(compilation is never timed) and reports medians. The figure that matters is the time per
call and its ratio to the NumPy path.
"""
import os
import sys
import time

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)                                  # _timing
if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(HERE))             # run as a script from a checkout
from _timing import median_seconds  # noqa: E402

from metacore.algorithms.protonet import ProtoNet  # noqa: E402
from metacore.blas import blas_threads  # noqa: E402
from metacore.data.omniglot import EpisodeSampler, load_omniglot, split_characters  # noqa: E402
from metacore.gradcheck import rel_error  # noqa: E402
from metacore.kernels.convnet import numba_kernels, numpy_only  # noqa: E402
from metacore.models import conv4_maml, conv4_protonet  # noqa: E402
from metacore.params import tile_tasks  # noqa: E402


def _episode(scheme, n_way, k_shot, q_query, T, dtype, seed):
    data = load_omniglot()
    sampler = EpisodeSampler(data.images, split_characters(data, scheme, "train"), n_way,
                             k_shot, q_query, seed=seed, dtype=dtype)
    return sampler.sample(T)


def protonet_workload(dtype=np.float32, seed=0):
    """-> call() running one 60-way 1-shot 5-query episode's loss and gradient, and the model."""
    net = ProtoNet(conv4_protonet())
    params = net.init_params(np.random.default_rng(seed), dtype)
    ep = _episode("vinyals", 60, 1, 5, 1, dtype, seed)

    def call():
        loss, grad, _ = net.episode_loss_and_grad(params, ep.support_x, ep.support_y,
                                                  ep.query_x, ep.query_y)
        return np.concatenate([[loss], grad])
    return call, net.model


def maml_workload(dtype=np.float32, seed=0):
    """-> call() running conv4_maml's loss, gradient and H v on T = 4 tasks of 80 images."""
    model = conv4_maml(n_way=5)
    rng = np.random.default_rng(seed)
    theta = tile_tasks(model.init_params(rng, dtype), 4)
    v = rng.standard_normal(theta.shape).astype(dtype)
    ep = _episode("maml", 5, 1, 15, 4, dtype, seed)
    x = np.concatenate([ep.support_x, ep.query_x], axis=1)           # (T, 80, 28, 28, 1)
    y = np.concatenate([ep.support_y, ep.query_y], axis=1)           # (T, 80)

    def call():
        loss, grad, hv = model.hvp(theta, x, y, v)
        return np.concatenate([loss, grad.ravel(), hv.ravel()])
    return call, model


WORKLOADS = {"protonet": protonet_workload, "maml": maml_workload}


def check_agreement(name):
    """rel_error against the float64 NumPy path of: the float64 Numba path, the float32 Numba
    path and the float32 NumPy path."""
    call64, _ = WORKLOADS[name](np.float64)
    call32, _ = WORKLOADS[name](np.float32)
    with numpy_only():
        ref, numpy32 = call64(), call32()
    return {"numba64": rel_error(call64(), ref), "numba32": rel_error(call32(), ref),
            "numpy32": rel_error(numpy32, ref)}


# ---------------------------------------------------------------- per-op profile
class OpTimer:
    """Wraps every layer's forward / backward / rforward / rbackward of a model (instance
    attributes shadowing the methods) and sums process CPU time per (layer type, pass)."""
    PASSES = ("forward", "backward", "rforward", "rbackward")

    def __init__(self, model):
        self.model, self.totals = model, {}
        for layer in model.layers:
            for p in self.PASSES:
                setattr(layer, p, self._wrap(getattr(layer, p), f"{type(layer).__name__}.{p}"))

    def _wrap(self, fn, key):
        def timed(*args, **kwargs):
            t0 = time.process_time()
            out = fn(*args, **kwargs)
            self.totals[key] = self.totals.get(key, 0.0) + time.process_time() - t0
            return out
        return timed

    def remove(self):
        for layer in self.model.layers:
            for p in self.PASSES:
                layer.__dict__.pop(p, None)


def op_profile(name, repeats=5, numpy_path=False):
    """-> ({op: median CPU seconds per call}, median total CPU seconds per call)."""
    call, model = WORKLOADS[name](np.float32)
    timer = OpTimer(model)
    runs, totals = [], []
    ctx = numpy_only() if numpy_path else _nullctx()
    with ctx:
        call()                                   # warm-up: compilation, first touch
        for _ in range(repeats):
            timer.totals = {}
            t0 = time.process_time()
            call()
            totals.append(time.process_time() - t0)
            runs.append(dict(timer.totals))
    timer.remove()
    ops = {k: float(np.median([r.get(k, 0.0) for r in runs])) for k in runs[0]}
    return ops, float(np.median(totals))


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def print_profile(name, repeats):
    old, t_old = op_profile(name, repeats, numpy_path=True)
    new, t_new = op_profile(name, repeats)
    print(f"\n{name}: CPU time, median of {repeats} calls, float32, 1 BLAS thread; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"  {'op.pass':<22}{'numpy ms':>10}{'numba ms':>10}{'ratio':>8}")
    for k in sorted(old, key=lambda k: -old[k]):
        print(f"  {k:<22}{1e3 * old[k]:>10.1f}{1e3 * new.get(k, 0):>10.1f}"
              f"{old[k] / max(new.get(k, 0), 1e-9):>8.1f}")
    print(f"  {'layers, sum':<22}{1e3 * sum(old.values()):>10.1f}{1e3 * sum(new.values()):>10.1f}")
    print(f"  {'whole call':<22}{1e3 * t_old:>10.1f}{1e3 * t_new:>10.1f}{t_old / t_new:>8.2f}")


# ---------------------------------------------------------------- pytest-benchmark
@pytest.fixture(autouse=True)
def _one_blas_thread():
    with blas_threads(1):
        yield


@pytest.mark.parametrize("name", ["protonet", "maml"])
def test_conv4(benchmark, name):
    if numba_kernels() is None:
        pytest.skip("numba not importable (or METACORE_NO_NUMBA set)")
    errs = check_agreement(name)
    assert errs["numba64"] <= 1e-10, errs
    assert errs["numba32"] <= errs["numpy32"], errs
    print(f"\n{name}: rel_error vs float64 NumPy path: numba float64 {errs['numba64']:.1e}, "
          f"numba float32 {errs['numba32']:.1e} (NumPy float32 {errs['numpy32']:.1e}). "
          f"All results match.")
    call, _ = WORKLOADS[name](np.float32)
    call()                                              # warm-up (compilation)
    benchmark.pedantic(call, rounds=5, iterations=1, warmup_rounds=1)
    t_new = benchmark.stats.stats.median
    with numpy_only():
        t_old = median_seconds(call, 5, warmup=True)
    benchmark.extra_info.update(numba_ms=1e3 * t_new, numpy_ms=1e3 * t_old,
                                speedup=t_old / t_new, rel_error=errs,
                                load_average=os.getloadavg()[0])
    print(f"{name} float32, 1 thread: numba path {1e3 * t_new:.0f} ms, NumPy path "
          f"{1e3 * t_old:.0f} ms ({t_old / t_new:.2f}x); load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("workloads", nargs="*", default=["protonet", "maml"])
    args = ap.parse_args()
    with blas_threads(1):
        for w in args.workloads:
            print_profile(w, args.repeats)
