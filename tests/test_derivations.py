"""Every derivation of the core against float64 central finite differences, through the same
harness as `metacore check`, plus the full Hessian assembled column by column and ugly shapes.
"""
import functools

import numpy as np
import pytest

from metacore import check, models
from metacore.gradcheck import rel_error
from metacore.layers import batchnorm as bn
from metacore.layers import conv2d as cv
from metacore.layers import linear as ln
from metacore.layers import maxpool as mp
from metacore.layers import relu as rl
from metacore.layers import reshape as rs

CASES = check.all_cases()


def _expected_quantities(case):
    want = {("gradient", "float64"), ("gradient", "float32")}
    if case.has_hvp:
        want |= {("hvp", "float64"), ("hvp", "float32"), ("symmetry", "float64")}
    return want


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gradient_and_hvp_against_finite_differences(case):
    rows = check.measure(case)
    plain = {(q, d) for q, d, _ in rows if not q.startswith("backend:")}
    assert plain == _expected_quantities(case)
    if case.group == "kernels":                     # every kernel row compares backends too
        assert {d for q, d, _ in rows if q.startswith("backend:")} == {"float64", "float32"}
    bad = [(q, d, e) for q, d, e in rows if not e <= check.tolerance(case, q, d)]
    assert not bad, f"{case.name}: rows over tolerance {bad}"


# ------------------------------------------------------------------ full Hessian
def _flatten(d, keys):
    return np.concatenate([d[k].reshape(-1) for k in keys])


def _unflatten(vec, like):
    out, i = {}, 0
    for k, a in like.items():
        out[k] = vec[i:i + a.size].reshape(a.shape)
        i += a.size
    return out


def _full_hessians(case, inputs):
    """-> (H by R-operator columns, H by finite differences of the gradient), both (n, n)."""
    keys = list(inputs)
    n = sum(a.size for a in inputs.values())
    H_r, H_fd = np.empty((n, n)), np.empty((n, n))
    for j in range(n):
        e = np.zeros(n)
        e[j] = 1.0
        ej = _unflatten(e, inputs)
        H_r[:, j] = _flatten(case.grad_hvp(inputs, ej)[2], keys)
        H_fd[:, j] = _flatten(check.fd_hvp(case, inputs, ej), keys)
    return H_r, H_fd


# layers, losses and the tiny models: a dense Hessian of at most a thousand inputs
SMALL = [c for c in CASES if c.kind in ("layer", "loss") or
         (c.kind == "model" and "tiny" in c.name)] + [
    check._model_case("sinusoid_mlp[hidden=5,3]", models.sinusoid_mlp(hidden=(5, 3)), T=2, N=4)]


@pytest.mark.parametrize("case", SMALL, ids=[c.name for c in SMALL])
def test_full_hessian_column_by_column(case):
    rng = np.random.default_rng(1)
    inputs = case.make(rng)
    n = sum(a.size for a in inputs.values())
    assert n <= 1000
    H_r, H_fd = _full_hessians(case, inputs)
    assert rel_error(H_r, H_fd) <= 1e-6
    assert rel_error(H_r, H_r.T) <= 1e-12            # exact Hessians are symmetric
    v = rng.standard_normal(n)
    hv = _flatten(case.grad_hvp(inputs, _unflatten(v, inputs))[2], list(inputs))
    assert rel_error(hv, H_r @ v) <= 1e-12           # HVP is linear in v


# ------------------------------------------------------------------ ugly shapes
UGLY = [
    check._layer_case("linear[T=1,N=1,D=1,H=1]", ln.linear_forward, ln.linear_backward,
                      ln.linear_rforward, ln.linear_rbackward,
                      lambda r: {"x": r.standard_normal((1, 1, 1)),
                                 "w": r.standard_normal((1, 1, 1)), "b": r.standard_normal((1, 1))}),
    check._layer_case("linear[T=3,N=7,D=13,H=1]", ln.linear_forward, ln.linear_backward,
                      ln.linear_rforward, ln.linear_rbackward,
                      lambda r: {"x": r.standard_normal((3, 7, 13)),
                                 "w": r.standard_normal((3, 13, 1)), "b": r.standard_normal((3, 1))}),
    check._layer_case("relu[T=1,1]", rl.relu_forward, rl.relu_backward, rl.relu_rforward,
                      rl.relu_rbackward, lambda r: {"x": np.array([[[-0.7], [0.3]]])}),
    check._layer_case("conv2d[3x3 valid s2 -> 1x1, C=F=1]",
                      functools.partial(cv.conv2d_forward, stride=2, padding="valid"),
                      cv.conv2d_backward, cv.conv2d_rforward, cv.conv2d_rbackward,
                      lambda r: {"x": r.standard_normal((1, 1, 3, 3, 1)),
                                 "w": r.standard_normal((1, 3, 3, 1, 1)), "b": r.standard_normal((1, 1))}),
    check._layer_case("conv2d[1x1 same s1]",
                      functools.partial(cv.conv2d_forward, stride=1, padding="same"),
                      cv.conv2d_backward, cv.conv2d_rforward, cv.conv2d_rbackward,
                      lambda r: {"x": r.standard_normal((2, 1, 1, 1, 2)),
                                 "w": r.standard_normal((2, 3, 3, 2, 3)), "b": r.standard_normal((2, 3))}),
    check._layer_case("conv2d[5x7 same s2, odd]",
                      functools.partial(cv.conv2d_forward, stride=2, padding="same"),
                      cv.conv2d_backward, cv.conv2d_rforward, cv.conv2d_rbackward,
                      lambda r: {"x": r.standard_normal((1, 3, 5, 7, 1)),
                                 "w": r.standard_normal((1, 3, 3, 1, 2)), "b": r.standard_normal((1, 2))}),
    check._layer_case("batchnorm[batch,N=2,C=1]", bn.batchnorm_forward, bn.batchnorm_backward,
                      bn.batchnorm_rforward, bn.batchnorm_rbackward,
                      lambda r: {"x": r.standard_normal((1, 2, 1)), "gamma": r.standard_normal((1, 1)),
                                 "beta": r.standard_normal((1, 1))}),
    check._layer_case("maxpool2d[3x2 -> 1x1]", mp.maxpool_forward, mp.maxpool_backward,
                      mp.maxpool_rforward, mp.maxpool_rbackward,
                      lambda r: {"x": r.standard_normal((1, 1, 3, 2, 1))}),
    check._layer_case("meanpool[1x1]", rs.meanpool_forward, rs.meanpool_backward,
                      rs.meanpool_rforward, rs.meanpool_rbackward,
                      lambda r: {"x": r.standard_normal((1, 1, 1, 1, 2))}),
]


@pytest.mark.parametrize("case", UGLY, ids=[c.name for c in UGLY])
def test_ugly_shapes(case):
    bad = [(q, d, e) for q, d, e in check.measure(case) if not e <= check.tolerance(case, q, d)]
    assert not bad, f"{case.name}: rows over tolerance {bad}"


def test_batchnorm_single_entry_is_finite():
    """One entry per channel: variance 0, so xhat = 0 and y = beta; everything stays finite."""
    x = np.array([[[3.0, -1.0]]])                   # (T=1, N=1, C=2)
    g, b = np.array([[2.0, 0.5]]), np.array([[0.1, 0.2]])
    y, cache = bn.batchnorm_forward(x, g, b)
    np.testing.assert_allclose(y, b[:, None, :])
    dx, dg, db = bn.batchnorm_backward(np.ones_like(y), cache)
    assert np.all(dx == 0) and np.all(dg == 0) and np.all(db == 1)


def test_maxpool_ties_route_to_first_maximum():
    x = np.zeros((1, 1, 2, 2, 1))
    y, cache = mp.maxpool_forward(x)
    dx = mp.maxpool_backward(np.ones_like(y), cache)
    assert dx[0, 0, 0, 0, 0] == 1 and dx.sum() == 1


def test_conv2d_same_padding_follows_tensorflow():
    assert cv.conv2d_geometry(28, 28, 2, "same") == (14, 14, (0, 1), (0, 1))
    assert cv.conv2d_geometry(7, 7, 2, "same") == (4, 4, (1, 1), (1, 1))
    assert cv.conv2d_geometry(28, 28, 1, "same") == (28, 28, (1, 1), (1, 1))
    assert cv.conv2d_geometry(7, 8, 2, "valid") == (3, 3, (0, 0), (0, 0))


@pytest.mark.parametrize("op", ["conv2d", "linear", "batchnorm", "softmax_ce", "bce_logits"])
def test_float32_stays_float32(op):
    rng = np.random.default_rng(0)
    f32 = np.float32
    if op == "conv2d":
        y, c = cv.conv2d_forward(rng.standard_normal((1, 2, 5, 5, 2)).astype(f32),
                                 rng.standard_normal((1, 3, 3, 2, 3)).astype(f32),
                                 np.zeros((1, 3), f32), 2, "same")
        outs = (y,) + cv.conv2d_backward(y, c)
    elif op == "linear":
        y, c = ln.linear_forward(rng.standard_normal((2, 3, 4)).astype(f32),
                                 rng.standard_normal((2, 4, 5)).astype(f32), np.zeros((2, 5), f32))
        outs = (y,) + ln.linear_backward(y, c)
    elif op == "batchnorm":
        y, c = bn.batchnorm_forward(rng.standard_normal((2, 3, 4)).astype(f32),
                                    np.ones((2, 4), f32), np.zeros((2, 4), f32))
        outs = (y,) + bn.batchnorm_backward(y, c)
    elif op == "softmax_ce":
        from metacore.losses import softmax_ce
        loss, c = softmax_ce.softmax_ce_forward(rng.standard_normal((2, 3, 4)).astype(f32),
                                                np.zeros((2, 3), np.int64))
        outs = (loss, softmax_ce.softmax_ce_backward(c))
    else:
        from metacore.losses import bce_logits
        loss, c = bce_logits.bce_logits_forward(rng.standard_normal((2, 3)).astype(f32),
                                                np.ones((2, 3), f32))
        outs = (loss, bce_logits.bce_logits_backward(c))
    assert all(o.dtype == np.float32 for o in outs), [o.dtype for o in outs]
