"""Task threads (metacore.taskpool): block bounds, the pool's order, errors and BLAS setting,
and MAML meta-gradients over task blocks against the one-thread result."""
import threading

import numpy as np
import pytest

from metacore.algorithms import fomaml_gradient, maml_gradient
from metacore.blas import get_blas_threads
from metacore.distributed import task_blocks
from metacore.models import conv4_maml, sinusoid_mlp
from metacore.taskpool import block_bounds, check_workers, map_task_blocks
from metacore.tasks import sample_sinusoid


@pytest.mark.parametrize("T,R", [(1, 1), (5, 2), (7, 3), (4, 4), (32, 3)])
def test_block_bounds_follow_array_split(T, R):
    b = block_bounds(T, R)
    sizes = [len(s) for s in np.array_split(np.arange(T), R)]
    assert list(np.diff(b)) == sizes and b[0] == 0 and b[-1] == T
    assert list(task_blocks(T, R)) == list(b)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", None])
def test_bad_worker_counts_are_refused(bad):
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        check_workers("op", bad)


def test_map_task_blocks_keeps_order_uses_threads_and_one_blas_thread():
    seen = {}

    def fn(lo, hi):
        seen[(lo, hi)] = (threading.get_ident(), get_blas_threads())
        return list(range(lo, hi))

    before = get_blas_threads()
    out = map_task_blocks(fn, 7, 3)
    assert [(lo, hi) for lo, hi, _ in out] == [(0, 3), (3, 5), (5, 7)]
    assert sum((r for _, _, r in out), []) == list(range(7))
    assert all(t != threading.get_ident() for t, _ in seen.values())
    if before is not None:                       # an OpenBLAS was found: held at 1, restored
        assert all(n == 1 for _, n in seen.values())
        assert get_blas_threads() == before
    # more workers than tasks: one task a block; one worker: a plain call on this thread
    assert [(lo, hi) for lo, hi, _ in map_task_blocks(fn, 2, 8)] == [(0, 1), (1, 2)]
    seen.clear()
    assert map_task_blocks(fn, 4, 1) == [(0, 4, [0, 1, 2, 3])]
    assert seen[(0, 4)][0] == threading.get_ident()


def test_an_error_in_a_block_is_raised_to_the_caller():
    def fn(lo, hi):
        if lo > 0:
            raise RuntimeError(f"block {lo}:{hi} failed")
        return lo

    with pytest.raises(RuntimeError, match="block 2:4 failed"):
        map_task_blocks(fn, 4, 2)


def _sinusoid(rng, T):
    model = sinusoid_mlp(hidden=(7, 5))
    theta = model.init_params(rng, np.float64) + 0.3 * rng.standard_normal(model.num_params)
    sx, sy, qx, qy = sample_sinusoid(rng, T, 12, np.float64).split(5)
    return model, theta, (sx, sy, qx, qy)


def _conv4(rng, T):
    # 8 channels: K*K*C = 72 >= conv2d.MIN_FAST_KKC, so the Numba conv kernels run in threads
    model = conv4_maml(n_way=3, image_shape=(8, 8, 1), channels=8, depth=4)
    theta = model.init_params(rng, np.float64)
    sx, qx = rng.random((T, 3, 8, 8, 1)), rng.random((T, 4, 8, 8, 1))
    sy, qy = rng.integers(0, 3, (T, 3)), rng.integers(0, 3, (T, 4))
    return model, theta, (sx, sy, qx, qy)


def _close(a, b, tol):
    return np.max(np.abs(a - b)) <= tol * np.max(np.abs(b))


@pytest.mark.parametrize("case", [_sinusoid, _conv4])
@pytest.mark.parametrize("workers", [2, 3, 8])
@pytest.mark.parametrize("first_order", [False, True])
def test_maml_over_task_blocks_equals_one_thread(case, workers, first_order):
    rng = np.random.default_rng(workers + 10 * first_order)
    model, theta, data = case(rng, T=5)
    for alpha in (0.05, np.full(model.num_params, 0.05) * rng.random(model.num_params)):
        one = maml_gradient(model, theta, *data, alpha, steps=2, first_order=first_order)
        many = maml_gradient(model, theta, *data, alpha, steps=2, first_order=first_order,
                             workers=workers)
        # the same per-task arithmetic: only the final means are summed in another order
        assert np.array_equal(many.query_loss, one.query_loss)
        assert np.array_equal(many.support_loss, one.support_loss)
        assert _close(many.grad, one.grad, 1e-13), np.max(np.abs(many.grad - one.grad))
        assert type(many.alpha_grad) is type(one.alpha_grad)
        assert _close(np.asarray(many.alpha_grad), np.asarray(one.alpha_grad), 1e-13)


def test_float32_and_fomaml_keep_dtype_and_refuse_bad_workers():
    rng = np.random.default_rng(3)
    model, theta, data = _sinusoid(rng, T=4)
    data32 = [d.astype(np.float32) for d in data]
    r = fomaml_gradient(model, theta.astype(np.float32), *data32, 0.05, workers=2)
    assert r.grad.dtype == np.float32 and r.query_loss.shape == (4,)
    with pytest.raises(ValueError, match="maml_gradient: workers must be an int >= 1"):
        maml_gradient(model, theta, *data, 0.05, workers=0)
