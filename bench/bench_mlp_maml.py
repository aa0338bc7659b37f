"""Fused Numba second-order MAML meta-gradient (metacore.kernels.mlp_maml) against the NumPy
path (metacore.algorithms.maml.maml_gradient) in the same run, float32, one BLAS thread.

Run: python -m pytest bench/bench_mlp_maml.py --benchmark-only -q -s

Shape letters: T tasks per meta-batch, N points per task, P parameters.

Workload (Finn et al. 2017): sinusoid MLP 1-40-40-1 (P = 1761), T = 25 tasks, K = 10 support
+ 10 query points, alpha = 0.01, k = 1 and 5 inner steps. Timed: the meta-gradient alone
(input checks included on both sides; no optimizer step).

Issue 3's target: a sinusoid second-order meta-step (k = 1) under 0.15 ms on one core. The
figure that matters is ms per meta-gradient and its ratio to maml_gradient; the target is
printed beside it (extra_info "target_ms").
"""
import numpy as np
import pytest
from _timing import median_seconds

from metacore.algorithms.maml import maml_gradient
from metacore.blas import blas_threads
from metacore.gradcheck import rel_error
from metacore.models import sinusoid_mlp
from metacore.tasks import sample_sinusoid

pytest.importorskip("numba")
from metacore.kernels.mlp_maml import mlp_maml_gradient  # noqa: E402

TARGET_MS = 0.15


@pytest.fixture(autouse=True)
def _one_blas_thread():
    with blas_threads(1):
        yield


def workload(T=25, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    model = sinusoid_mlp()
    sx, sy, qx, qy = sample_sinusoid(rng, T, 20, dtype).split(10)
    batch = tuple(np.ascontiguousarray(a) for a in (sx, sy, qx, qy))
    return model, model.init_params(rng, dtype), batch, 0.01


@pytest.mark.parametrize("k", [1, 5])
def test_fused_maml(benchmark, k):
    model, theta, batch, alpha = workload()
    # check first: float32 fused against float64 maml_gradient on the same inputs
    ref = maml_gradient(model, theta.astype(np.float64),
                        *[a.astype(np.float64) for a in batch], alpha, steps=k)
    qloss, grad = mlp_maml_gradient(model, theta, *batch, alpha, steps=k)
    err = rel_error(grad, ref.grad)
    assert err <= 1e-5, f"fused float32 vs float64 maml_gradient: rel_error {err:.2e}"
    assert rel_error(qloss, ref.query_loss) <= 1e-5
    print(f"\nsinusoid k={k}: fused float32 vs float64 maml_gradient rel_error {err:.1e}. "
          f"All results match.")

    fused = lambda: mlp_maml_gradient(model, theta, *batch, alpha, steps=k)  # noqa: E731
    numpy_path = lambda: maml_gradient(model, theta, *batch, alpha, steps=k)  # noqa: E731
    fused()                                      # warm-up (the first call loads the kernel)
    benchmark.pedantic(fused, rounds=300, iterations=1, warmup_rounds=2)
    t_fused = benchmark.stats.stats.median
    t_numpy = median_seconds(numpy_path, 100, warmup=True)
    benchmark.extra_info.update(fused_ms=1e3 * t_fused, maml_gradient_ms=1e3 * t_numpy,
                                speedup=t_numpy / t_fused, target_ms=TARGET_MS,
                                check_rel_error=err)
    print(f"sinusoid second-order MAML k={k}, T=25, float32, 1 thread: fused "
          f"{1e3 * t_fused:.3f} ms, maml_gradient {1e3 * t_numpy:.3f} ms "
          f"({t_numpy / t_fused:.2f}x); issue 3 target (k=1) {TARGET_MS} ms")
