"""The fused Numba MAML meta-gradient (metacore.kernels.mlp_maml, called for a Model through
metacore.algorithms.mlp_maml) against
metacore.algorithms.maml.maml_gradient (itself checked by finite differences in
tests/test_maml.py): float64 to 1e-12 relative, float32 within a per-dtype bound, and the
models it must refuse.

Shape letters: T tasks, N support points, M query points, D inputs, O outputs, P parameters.
"""
import numpy as np
import pytest

pytest.importorskip("numba")

from metacore.algorithms import fomaml_gradient, maml_gradient   # noqa: E402
from metacore.algorithms.reptile import reptile_direction         # noqa: E402
from metacore.algorithms.mlp_maml import (mlp_maml_gradient,     # noqa: E402
                                          mlp_reptile_direction, mlp_sizes)
from metacore.kernels import mlp_maml as fused                    # noqa: E402
from metacore.models import bn_mlp, sinusoid_mlp                 # noqa: E402
from metacore.network import Linear, Model, ReLU                 # noqa: E402

F64_TOL = 1e-12
# float32 against the float64 path on the same (float32-rounded) inputs: k steps of short
# float32 sums; measured worst here 1.8e-7 of max |grad|, bound 16 eps32 ~ 1.9e-6.
F32_TOL = 16 * float(np.finfo(np.float32).eps)


def odd_mlp():
    """Odd, prime and size-1 widths: D = 3 inputs, O = 2 outputs, a 1-unit hidden layer."""
    layers = [Linear(3, 7), ReLU(), Linear(7, 1), ReLU(), Linear(1, 5), ReLU(), Linear(5, 2)]
    return Model("odd_mlp", layers, in_shape=(3,), loss="mse")


def wide_mlp():
    """Widths that take every block of kernels/small_gemm.py: 48 = 6 float32 vectors (a
    5-vector block and a single one), 17 = 2 vectors and a scalar column; N = 11 and
    M = 13 points give 4-row blocks, a 2-row block and an odd last row."""
    layers = [Linear(3, 48), ReLU(), Linear(48, 17), ReLU(), Linear(17, 2)]
    return Model("wide_mlp", layers, in_shape=(3,), loss="mse")


def linear_only():
    return Model("linear", [Linear(3, 2)], in_shape=(3,), loss="mse")


def _case(model, T, N, M, seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    theta = model.init_params(rng, np.float64)
    theta += 0.3 * rng.standard_normal(theta.shape)   # away from the tiny init: H clearly != 0
    D, O = model.in_shape[0], model.out_shape[0]
    sx, qx = rng.standard_normal((T, N, D)), rng.standard_normal((T, M, D))
    sy, qy = rng.standard_normal((T, N, O)), rng.standard_normal((T, M, O))
    return [a.astype(dtype) for a in (theta, sx, sy, qx, qy)]


def _max_rel(got, ref):
    return float(np.abs(got.astype(np.float64) - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("make", [sinusoid_mlp, odd_mlp, wide_mlp, linear_only])
@pytest.mark.parametrize("T", [1, 7])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_float64_equals_maml_gradient(make, T, k):
    model = make()
    theta, sx, sy, qx, qy = _case(model, T, N=5 if k < 3 else 11, M=13, seed=10 * T + k)
    alpha = 0.1
    ref = maml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=k)
    qloss, grad = mlp_maml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=k)
    assert grad.shape == (model.num_params,) and grad.dtype == np.float64
    assert qloss.shape == (T,)
    assert _max_rel(grad, ref.grad) <= F64_TOL, _max_rel(grad, ref.grad)
    assert _max_rel(qloss, ref.query_loss) <= F64_TOL
    # the second-order term is present: first-order MAML differs by far more than the bound
    fo = fomaml_gradient(model, theta, sx, sy, qx, qy, alpha, steps=k).grad
    assert _max_rel(fo, ref.grad) > 1e3 * F64_TOL


@pytest.mark.parametrize("make", [sinusoid_mlp, odd_mlp, wide_mlp])
@pytest.mark.parametrize("k", [1, 3])
def test_float32_close_to_float64(make, k):
    model = make()
    T = 7
    c64 = _case(model, T, N=10, M=10, seed=k)
    c32 = [a.astype(np.float32) for a in c64]
    qloss, grad = mlp_maml_gradient(model, *c32, 0.01, steps=k)
    assert grad.dtype == np.float32 and qloss.dtype == np.float32
    # the float64 reference run on the float32-rounded inputs
    ref = maml_gradient(model, *[a.astype(np.float64) for a in c32], 0.01, steps=k)
    assert _max_rel(grad, ref.grad) <= F32_TOL, _max_rel(grad, ref.grad)
    assert _max_rel(qloss, ref.query_loss) <= F32_TOL


def test_alpha_zero_is_query_gradient():
    """alpha = 0: no adaptation, the meta-gradient is the mean query gradient at theta."""
    model = odd_mlp()
    theta, sx, sy, qx, qy = _case(model, 3, N=4, M=6, seed=5)
    _, grad = mlp_maml_gradient(model, theta, sx, sy, qx, qy, 0.0, steps=2)
    T = qx.shape[0]
    _, g = model.loss_and_grad(np.repeat(theta[None], T, 0), qx, qy)
    assert _max_rel(grad, g.mean(axis=0)) <= F64_TOL


def test_refuses_other_models_and_inputs():
    theta, sx, sy, qx, qy = _case(odd_mlp(), 2, N=3, M=3, seed=0)
    bn = bn_mlp(n_way=2, in_features=3, hidden=(4,))
    with pytest.raises(ValueError, match="Linear, ReLU, Linear"):
        mlp_maml_gradient(bn, bn.init_params(np.random.default_rng(0)), sx, sy, qx, qy, 0.1)
    no_end = Model("ends_in_relu", [Linear(3, 2), ReLU()], in_shape=(3,), loss="mse")
    with pytest.raises(ValueError, match="ending in Linear"):
        mlp_maml_gradient(no_end, np.zeros(no_end.num_params), sx, sy, qx, qy, 0.1)
    ce = Model("ce", [Linear(3, 7), ReLU(), Linear(7, 2)], in_shape=(3,), loss="softmax_ce")
    with pytest.raises(ValueError, match="loss 'mse'"):
        mlp_maml_gradient(ce, np.zeros(ce.num_params), sx, sy, qx, qy, 0.1)
    with pytest.raises(TypeError, match="metacore.network.Model"):
        mlp_maml_gradient("mlp", theta, sx, sy, qx, qy, 0.1)
    model = odd_mlp()
    with pytest.raises(ValueError, match="alpha must be a scalar"):
        mlp_maml_gradient(model, theta, sx, sy, qx, qy, np.full(model.num_params, 0.1))
    with pytest.raises(ValueError, match="not a list of batches"):
        mlp_maml_gradient(model, theta, [sx, sx], [sy, sy], qx, qy, 0.1, steps=2)
    with pytest.raises(ValueError, match="steps"):
        mlp_maml_gradient(model, theta, sx, sy, qx, qy, 0.1, steps=0)
    with pytest.raises(ValueError, match="theta"):
        mlp_maml_gradient(model, theta[:-1], sx, sy, qx, qy, 0.1)
    with pytest.raises((TypeError, ValueError), match="float32|dtype"):
        mlp_maml_gradient(model, theta, sx.astype(np.float32), sy, qx, qy, 0.1)


def test_refuses_non_finite_inputs_naming_them():
    model = sinusoid_mlp()
    theta, sx, sy, qx, qy = _case(model, 3, N=4, M=5, seed=3, dtype=np.float32)
    for name, idx, value in [("theta", 0, np.nan), ("support_y", 2, np.nan),
                             ("query_x", 3, np.inf)]:
        bad = [a.copy() for a in (theta, sx, sy, qx, qy)]
        bad[idx].reshape(-1)[-1] = value
        with pytest.raises(ValueError, match=f"{name} contains 1 non-finite"):
            mlp_maml_gradient(model, *bad, 0.1)


@pytest.mark.parametrize("make", [sinusoid_mlp, odd_mlp, wide_mlp])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_first_order_and_reptile_equal_their_references(make, k, dtype):
    model = make()
    case = _case(model, 5, N=7, M=9, seed=20 + k)
    c = [a.astype(dtype) for a in case]
    c64 = [a.astype(np.float64) for a in c]      # the float64 path on the same inputs
    tol = F64_TOL if dtype == np.float64 else F32_TOL
    qloss, grad = mlp_maml_gradient(model, *c, 0.05, steps=k, first_order=True)
    ref = fomaml_gradient(model, *c64, 0.05, steps=k)
    assert grad.dtype == dtype and qloss.shape == (5,)
    assert _max_rel(grad, ref.grad) <= tol and _max_rel(qloss, ref.query_loss) <= tol
    theta, sx, sy = c[:3]
    loss0, d = mlp_reptile_direction(model, theta, sx, sy, 0.05, steps=k)
    ref_loss0, ref_d = reptile_direction(model, *c64[:3], 0.05, k)
    assert d.dtype == dtype and loss0.shape == (5,)
    assert _max_rel(d, ref_d) <= tol and _max_rel(loss0, ref_loss0) <= tol


def test_the_kernel_takes_layer_sizes_and_plain_arrays():
    """The kernel itself knows no Model: widths and arrays in, the same numbers out as
    through the adapter (which only reads the widths)."""
    model = odd_mlp()
    assert mlp_sizes(model) == (3, 7, 1, 5, 2)
    theta, sx, sy, qx, qy = _case(model, 3, N=4, M=6, seed=7)
    ref = mlp_maml_gradient(model, theta, sx, sy, qx, qy, 0.1, steps=2)
    for sizes in [(3, 7, 1, 5, 2), [3, 7, 1, 5, 2], np.array([3, 7, 1, 5, 2])]:
        got = fused.mlp_maml_gradient(sizes, theta, sx, sy, qx, qy, 0.1, steps=2)
        assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    dims, woff, boff = fused.mlp_layout((3, 7, 1, 5, 2))
    assert dims.tolist() == [3, 7, 1, 5, 2]
    # w (d_in, d_out) then b (d_out,), layer by layer: the Model's layout
    assert woff.tolist() == [model.layout.slice(f"{i}.linear.w").start for i in (0, 2, 4, 6)]
    assert boff.tolist() == [model.layout.slice(f"{i}.linear.b").start for i in (0, 2, 4, 6)]
    for bad in [(3,), (3, 0, 2), (3, 7.0, 2), (3, True, 2), "3-7-2", None]:
        with pytest.raises(ValueError, match="sizes must be the layer widths"):
            fused.mlp_maml_gradient(bad, theta, sx, sy, qx, qy, 0.1)
    with pytest.raises(ValueError, match="theta"):       # widths that do not fit theta
        fused.mlp_maml_gradient((3, 8, 1, 5, 2), theta, sx, sy, qx, qy, 0.1)
