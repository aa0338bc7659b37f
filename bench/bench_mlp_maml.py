"""Fused Numba second-order MAML meta-gradient (metacore.kernels.mlp_maml, for a Model through
metacore.algorithms.mlp_maml) against the NumPy path (metacore.algorithms.maml.maml_gradient)
in the same run, float32, one BLAS thread.

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
from metacore.algorithms.mlp_maml import mlp_maml_gradient  # noqa: E402

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


def test_phase_profile(benchmark):
    """Where the fused kernel's time goes (k = 1, T = 25, float32): each phase of one task
    run T times inside one compiled loop, the minimum over 300 repeats (robust to load).
    FLOPs per task (2 per multiply-add; S = sum_l D_l D_{l+1} = 1680, S' = 1640 without the
    first layer, N = 10 rows): forward 2NS, loss + backward 2N(S + S'), HVP with the pass
    kept 2N(2S + 4S') (bench/peers/workloads.py's mlp_flops)."""
    from numba import njit

    import metacore.kernels.mlp_maml_numba as m
    from metacore.algorithms.mlp_maml import mlp_structure
    model, theta, batch, _ = workload()
    dims, woff, boff = mlp_structure(model)
    rng = np.random.default_rng(1)
    th = theta + np.float32(0.1) * rng.standard_normal(theta.size).astype(np.float32)
    x, y = batch[0][0], batch[1][0]                       # one task's support (N, 1)
    N, T, P, total = x.shape[0], 25, theta.size, int(dims.sum())
    aoff, zoff = m._offsets(dims, N)
    A, Z, G, rA, rZ, rG = (np.zeros(N * total, np.float32) for _ in range(6))
    wt, ut, g, hv = (np.empty(P, np.float32) for _ in range(4))
    u = (0.01 * rng.standard_normal(P)).astype(np.float32)
    scale = np.float32(2.0 / N)
    zlast = zoff[zoff.shape[0] - 1]

    @njit
    def fwd(reps, th, x, dims, woff, boff, A, aoff, Z, zoff):
        for _ in range(reps):
            m._forward(th, x, dims, woff, boff, A, aoff, Z, zoff)

    @njit
    def bwd(reps, Z, zlast, y, scale, G, dims, woff, boff, wt, A, aoff, zoff, g):
        for _ in range(reps):
            m._loss_dout(Z, zlast, y, scale, G)
            m._backward(y.shape[0], dims, woff, boff, wt, A, aoff, Z, zoff, G, g)

    @njit
    def trans(reps, th, dims, woff, wt):
        for _ in range(reps):
            m._transpose_weights(th, dims, woff, wt)

    @njit
    def hvp(reps, th, u, ut, dims, woff, boff, wt, A, aoff, Z, zoff, G, scale, rA, rZ, rG,
            hv, N):
        for _ in range(reps):
            m._hvp(th, u, ut, N, dims, woff, boff, wt, A, aoff, Z, zoff, G, scale, rA, rZ,
                   rG, hv)

    m._transpose_weights(th, dims, woff, wt)
    m._transpose_weights(u, dims, woff, ut)
    fwd(1, th, x, dims, woff, boff, A, aoff, Z, zoff)       # the pass the HVP reads
    bwd(1, Z, zlast, y, scale, G, dims, woff, boff, wt, A, aoff, zoff, g)
    phases = [
        ("forward", 2 * N * 1680,
         lambda r: fwd(r, th, x, dims, woff, boff, A, aoff, Z, zoff)),
        ("transpose w", 0, lambda r: trans(r, th, dims, woff, wt)),
        ("loss + backward", 2 * N * (1680 + 1640),
         lambda r: bwd(r, Z, zlast, y, scale, G, dims, woff, boff, wt, A, aoff, zoff, g)),
        ("hvp", 2 * N * (2 * 1680 + 4 * 1640),
         lambda r: hvp(r, th, u, ut, dims, woff, boff, wt, A, aoff, Z, zoff, G, scale, rA,
                       rZ, rG, hv, N)),
    ]
    print(f"\nfused kernel phases, {T} tasks, float32, 1 thread (min of 300):")
    for name, fl, call in phases:
        call(1)                                            # compile
        best = min(median_seconds(lambda: call(T), 1) for _ in range(300))
        rate = f"{fl * T / best / 1e9:5.1f} GFLOP/s" if fl else ""
        print(f"  {name:16s} {1e6 * best:8.1f} us  {rate}")
        benchmark.extra_info[name + "_us"] = 1e6 * best
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
