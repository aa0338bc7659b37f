"""Forward, gradient and Hessian-vector product of the core models, float32, against the
plain NumPy `reference/` path measured in the same run.

Run: python -m pytest bench/bench_core.py --benchmark-only -q -s

Workloads (the sizes of the papers' meta-batches):
  sinusoid   sinusoid MLP 1-40-40-1, T = 25 tasks x N = 10 points
  conv4      Conv-4 (MAML variant, 5-way), T = 32 tasks x N = 80 images of 28x28x1

FLOP count (GEMM work only, 2 FLOP per multiply-add; elementwise ops are not counted).
Let m_l be layer l's multiply-adds per point: D*H for a linear layer, 9*C*F*Ho*Wo for a 3x3
convolution, and S = sum_l m_l, m_0 the first layer's. Per point:
  forward             S
  loss + gradient     S (forward) + S (dW) + (S - m_0) (dx; none for the data input) = 3S - m_0
  loss + grad + Hv    forward S, R-forward m_0 + 2(S - m_0), backward 2S - m_0,
                      R-backward S + 3(S - m_0)                                  = 9S - 5 m_0
Sinusoid: S = 40 + 1600 + 40 = 1680 -> 3,360 / 9,920 / 29,840 FLOP per point.

BLAS runs single-threaded unless METACORE_BLAS_THREADS is set (see metacore/blas.py).
Every benchmark first checks the fast path against the reference (float32 against float64,
relative error <= 1e-4), warms up, and reports the median. The reference loops over tasks in
Python, one task at a time, so its time is exactly linear in T: for Conv-4 it is timed on
REF_TASKS tasks and scaled to T (stated in the output), since at T = 32 it takes minutes.
"""
import os

import numpy as np
import pytest
from _timing import median_seconds

from metacore import models
from metacore.blas import blas_threads
from metacore.gradcheck import rel_error
from metacore.network import Conv2d, Linear
from metacore.reference.model import (reference_forward, reference_loss_and_grad,
                                      reference_loss_grad_hvp)

REF_TASKS = 1
# One OpenBLAS thread unless METACORE_BLAS_THREADS says otherwise: per-task GEMMs are small,
# and a multithreaded BLAS loses badly on them whenever the other core is busy (metacore.blas).
BLAS_THREADS = int(os.environ.get("METACORE_BLAS_THREADS", "1"))


@pytest.fixture(autouse=True)
def _blas_threads():
    with blas_threads(BLAS_THREADS):
        yield


def gemm_macs_per_point(model):
    """-> (S, m_0): multiply-adds per point of all GEMM layers, and of the first one."""
    macs, shape = [], model.in_shape
    for layer in model.layers:
        out = layer.out_shape(shape)
        if isinstance(layer, Linear):
            macs.append(layer.d_in * layer.d_out)
        elif isinstance(layer, Conv2d):
            macs.append(9 * layer.c_in * layer.c_out * out[0] * out[1])
        shape = out
    return sum(macs), macs[0]


def flops(model, points, which):
    S, m0 = gemm_macs_per_point(model)
    per_point = {"forward": S, "grad": 3 * S - m0, "hvp": 9 * S - 5 * m0}[which]
    return 2 * per_point * points


WORKLOADS = {
    "sinusoid": (models.sinusoid_mlp, 25, 10),
    "conv4": (lambda: models.conv4_maml(n_way=5), 32, 80),
}


def make(name, dtype=np.float32, seed=0):
    build, T, N = WORKLOADS[name]
    model = build()
    rng = np.random.default_rng(seed)
    theta = np.stack([model.init_params(rng, dtype) for _ in range(T)])
    theta += dtype(0.05) * rng.standard_normal(theta.shape).astype(dtype)
    x = rng.standard_normal((T, N) + model.in_shape).astype(dtype)
    if model.loss_name == "mse":
        y = rng.standard_normal((T, N, 1)).astype(dtype)
    else:
        y = rng.integers(0, model.out_shape[0], (T, N))
    v = rng.standard_normal(theta.shape).astype(dtype)
    return model, theta, x, y, v


def fast_call(model, theta, x, y, v, which):
    if which == "forward":
        return lambda: model.loss(theta, x, y)
    if which == "grad":
        return lambda: model.loss_and_grad(theta, x, y)
    return lambda: model.hvp(theta, x, y, v)


def ref_call(model, theta, x, y, v, which):
    if which == "forward":
        return lambda: reference_forward(model, theta, x)
    if which == "grad":
        return lambda: reference_loss_and_grad(model, theta, x, y)
    return lambda: reference_loss_grad_hvp(model, theta, x, y, v)


@pytest.mark.parametrize("which", ["forward", "grad", "hvp"])
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_core(benchmark, name, which):
    model, theta, x, y, v = make(name)
    T, N = x.shape[:2]
    # 1. check: fast float32 against the float64 reference on the first tasks
    k = min(T, 2)
    sub = (theta[:k], x[:k], y[:k], v[:k])
    ref_loss, ref_grad, ref_hv = reference_loss_grad_hvp(model, *sub)
    loss, grad, hv = model.hvp(*sub)
    assert rel_error(loss, ref_loss) <= 1e-4
    assert rel_error(grad, ref_grad) <= 1e-4
    assert rel_error(hv, ref_hv) <= 1e-4
    # 2. the reference, timed on the whole batch (sinusoid) or REF_TASKS tasks scaled to T
    ref_T = T if name == "sinusoid" else REF_TASKS
    rsub = (theta[:ref_T], x[:ref_T], y[:ref_T], v[:ref_T])
    ref_fn = ref_call(model, *rsub, which)
    ref_fn()
    ref_time = median_seconds(ref_fn, 5 if name == "sinusoid" else 1) * (T / ref_T)
    # 3. the fast path
    fn = fast_call(model, theta, x, y, v, which)
    fn()                                                        # warm-up
    rounds = 50 if name == "sinusoid" else 3
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)
    fast_time = benchmark.stats.stats.median
    f = flops(model, T * N, which)
    benchmark.extra_info.update({
        "flop": f, "gflops": f / fast_time / 1e9, "median_s": fast_time,
        "reference_median_s": ref_time, "speedup_vs_reference": ref_time / fast_time,
        "reference_tasks_timed": ref_T})
    print(f"\n{name:9s} {which:8s} T={T} N={N}: {fast_time * 1e3:9.3f} ms  "
          f"{f / 1e6:10.2f} MFLOP  {f / fast_time / 1e9:6.2f} GFLOP/s  "
          f"reference {ref_time * 1e3:10.1f} ms (timed on {ref_T} task(s))  "
          f"speed-up x{ref_time / fast_time:.1f}")
