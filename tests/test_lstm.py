"""LSTM cell, sequence and bidirectional pair: float64 finite differences of every input,
the fast module against the one-sequence-at-a-time reference, ugly sizes, bad input.

Shape letters: S steps, B sequences, D input features, H hidden units.
"""
import warnings

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases reference/ from a checkout)
from metacore.gradcheck import numerical_gradient, rel_error
from metacore.layers import lstm as L
from metacore.reference import lstm as R

# (S, B, D, H): the odd sizes of the brief plus ordinary ones
SIZES = [(1, 3, 4, 5), (2, 3, 4, 5), (5, 3, 4, 5), (1, 1, 1, 1), (5, 1, 1, 1), (2, 2, 3, 1),
         (3, 1, 1, 4)]
FD_TOL = 1e-7
# float32 fast vs float64 reference of the same float32 inputs: every output is at most
# S recurrent steps of (D + H)-term dot products and a few sigmoid/tanh evaluations, each
# contributing a few eps32 relative to the scale of the outputs (|h| <= 1); 2e-6 ~ 17 eps32
# covers S = 5, D + H = 9 (rel_error is normwise: max|a-b| / (max|a|+max|b|)); the worst
# seen over 20 seeds of every size below was 1.2e-6 (10 eps32), the fixed seed here is lower.
F32_TOL = 2e-6
F64_TOL = 1e-12


def _case(S, B, D, H, seed, dtype=np.float64, scale=0.8):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((S, B, D)).astype(dtype)             # (S, B, D)
    h0 = (0.5 * rng.standard_normal((B, H))).astype(dtype)       # (B, H)
    c0 = rng.standard_normal((B, H)).astype(dtype)               # (B, H)
    W = (scale * rng.standard_normal((D + H, 4 * H))).astype(dtype)   # (D+H, 4H)
    b = (0.5 * rng.standard_normal(4 * H)).astype(dtype)         # (4H,)
    return x, h0, c0, W, b


def _upstream(S, B, H, seed, dtype=np.float64):
    rng = np.random.default_rng(seed + 1000)
    return (rng.standard_normal((S, B, H)).astype(dtype),       # dhs
            rng.standard_normal((B, H)).astype(dtype),          # dh_S
            rng.standard_normal((B, H)).astype(dtype))          # dc_S


# ------------------------------------------------------------------ finite differences
@pytest.mark.parametrize("size", [(1, 3, 4, 5), (1, 1, 1, 1), (2, 2, 3, 1)])
def test_cell_backward_matches_finite_differences(size):
    _, B, D, H = size
    x, h, c, W, b = _case(1, B, D, H, seed=1)
    x = x[0]
    _, gh, gc = _upstream(1, B, H, seed=1)

    def f():
        h_new, c_new, _ = L.lstm_cell_forward(x, h, c, W, b)
        return float((h_new * gh).sum() + (c_new * gc).sum())

    _, _, cache = L.lstm_cell_forward(x, h, c, W, b)
    grads = L.lstm_cell_backward(gh, gc, cache)
    for name, arr, g in zip(("x", "h", "c", "W", "b"), (x, h, c, W, b), grads):
        err = rel_error(g, numerical_gradient(f, arr))
        assert err <= FD_TOL, f"d{name}: rel_error {err:.2e}"


@pytest.mark.parametrize("size", [s for s in SIZES if s[0] in (1, 2, 5)])
def test_sequence_backward_matches_finite_differences(size):
    """Every input (x, h0, c0, W, b) through sequences of length 1, 2, 5, with gradient
    arriving on every step's output and on the final (h_S, c_S)."""
    S, B, D, H = size
    x, h0, c0, W, b = _case(S, B, D, H, seed=2 + S)
    dhs, dh_S, dc_S = _upstream(S, B, H, seed=2 + S)

    def f():
        hs, (hS, cS), _ = L.lstm_forward(x, h0, c0, W, b)
        return float((hs * dhs).sum() + (hS * dh_S).sum() + (cS * dc_S).sum())

    _, _, cache = L.lstm_forward(x, h0, c0, W, b)
    grads = L.lstm_backward(dhs, dh_S, dc_S, cache)
    for name, arr, g in zip(("x", "h0", "c0", "W", "b"), (x, h0, c0, W, b), grads):
        assert g.shape == arr.shape and g.dtype == arr.dtype
        err = rel_error(g, numerical_gradient(f, arr))
        assert err <= FD_TOL, f"S={S} d{name}: rel_error {err:.2e}"


@pytest.mark.parametrize("size", [(1, 2, 3, 4), (5, 2, 3, 4), (2, 1, 1, 1)])
def test_bilstm_backward_matches_finite_differences(size):
    S, B, D, H = size
    rng = np.random.default_rng(7 + S)
    x = rng.standard_normal((S, B, D))                           # (S, B, D)
    Wf, Wb = (0.8 * rng.standard_normal((D + H, 4 * H)) for _ in range(2))
    bf, bb = (0.5 * rng.standard_normal(4 * H) for _ in range(2))
    gf, gb = rng.standard_normal((S, B, H)), rng.standard_normal((S, B, H))

    def f():
        hf, hb, _ = L.bilstm_forward(x, Wf, bf, Wb, bb)
        return float((hf * gf).sum() + (hb * gb).sum())

    _, _, cache = L.bilstm_forward(x, Wf, bf, Wb, bb)
    grads = L.bilstm_backward(gf, gb, cache)
    for name, arr, g in zip(("x", "Wf", "bf", "Wb", "bb"), (x, Wf, bf, Wb, bb), grads):
        err = rel_error(g, numerical_gradient(f, arr))
        assert err <= FD_TOL, f"d{name}: rel_error {err:.2e}"


def test_none_upstream_equals_zero_upstream():
    x, h0, c0, W, b = _case(3, 2, 3, 4, seed=4)
    dhs, dh_S, dc_S = _upstream(3, 2, 4, seed=4)
    _, _, cache = L.lstm_forward(x, h0, c0, W, b)
    z = np.zeros_like(dh_S)
    for args, zargs in (((None, dh_S, dc_S), (np.zeros_like(dhs), dh_S, dc_S)),
                        ((dhs, None, dc_S), (dhs, z, dc_S)),
                        ((dhs, dh_S, None), (dhs, dh_S, z))):
        for a, bz in zip(L.lstm_backward(*args, cache), L.lstm_backward(*zargs, cache)):
            np.testing.assert_array_equal(a, bz)


# ------------------------------------------------------------------ fast vs reference
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sequence_matches_reference(size, dtype):
    S, B, D, H = size
    tol = F64_TOL if dtype == np.float64 else F32_TOL
    x, h0, c0, W, b = _case(S, B, D, H, seed=11, dtype=dtype)
    dhs, dh_S, dc_S = _upstream(S, B, H, seed=11, dtype=dtype)
    hs, (hS, cS), cache = L.lstm_forward(x, h0, c0, W, b)
    grads = L.lstm_backward(dhs, dh_S, dc_S, cache)
    for a in (hs, hS, cS) + tuple(grads):
        assert a.dtype == dtype
    rhs, rhS, rcS = R.lstm_forward(x, h0, c0, W, b)
    rgrads = R.lstm_backward(dhs, dh_S, dc_S, x, h0, c0, W, b)
    for name, a, r in zip(("hs", "h_S", "c_S", "dx", "dh0", "dc0", "dW", "db"),
                          (hs, hS, cS) + tuple(grads), (rhs, rhS, rcS) + tuple(rgrads)):
        err = rel_error(a, r)
        assert err <= tol, f"{name} ({np.dtype(dtype).name}): rel_error {err:.2e}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cell_equals_one_step_sequence_and_reference(dtype):
    x, h, c, W, b = _case(1, 4, 3, 2, seed=12, dtype=dtype)
    h1, c1, cache = L.lstm_cell_forward(x[0], h, c, W, b)
    hs, (hS, cS), _ = L.lstm_forward(x, h, c, W, b)
    np.testing.assert_array_equal(h1, hS)
    np.testing.assert_array_equal(c1, cS)
    np.testing.assert_array_equal(hs[0], hS)
    rhs, _, rcS = R.lstm_forward(x, h, c, W, b)
    tol = F64_TOL if dtype == np.float64 else F32_TOL
    assert rel_error(h1, rhs[0]) <= tol and rel_error(c1, rcS) <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_bilstm_matches_reference(dtype):
    S, B, D, H = 4, 3, 2, 5
    rng = np.random.default_rng(13)
    x = rng.standard_normal((S, B, D)).astype(dtype)
    Wf, Wb = (rng.standard_normal((D + H, 4 * H)).astype(dtype) for _ in range(2))
    bf, bb = (rng.standard_normal(4 * H).astype(dtype) for _ in range(2))
    gf, gb = (rng.standard_normal((S, B, H)).astype(dtype) for _ in range(2))
    hf, hb, cache = L.bilstm_forward(x, Wf, bf, Wb, bb)
    grads = L.bilstm_backward(gf, gb, cache)
    rhf, rhb = R.bilstm_forward(x, Wf, bf, Wb, bb)
    rgrads = R.bilstm_backward(gf, gb, x, Wf, bf, Wb, bb)
    tol = F64_TOL if dtype == np.float64 else F32_TOL
    for name, a, r in zip(("hf", "hb", "dx", "dWf", "dbf", "dWb", "dbb"),
                          (hf, hb) + tuple(grads), (rhf, rhb) + tuple(rgrads)):
        assert a.dtype == dtype
        assert rel_error(a, r) <= tol, f"{name}: rel_error {rel_error(a, r):.2e}"
    # the backward direction's last output has read only x[S-1]
    h_last, _, _ = L.lstm_cell_forward(x[-1], np.zeros((B, H), dtype),
                                       np.zeros((B, H), dtype), Wb, bb)
    np.testing.assert_array_equal(hb[-1], h_last)


def test_reverse_direction_is_a_reversed_forward_lstm():
    """With Wb = Wf the backward LSTM's output equals the forward LSTM run on reversed x."""
    rng = np.random.default_rng(14)
    x = rng.standard_normal((5, 2, 3))
    W, b = rng.standard_normal((3 + 4, 16)), rng.standard_normal(16)
    _, hb, _ = L.bilstm_forward(x, W, b, W, b)
    z = np.zeros((2, 4))
    hrev, _, _ = L.lstm_forward(np.ascontiguousarray(x[::-1]), z, z, W, b)
    np.testing.assert_array_equal(hb, hrev[::-1])


# ------------------------------------------------------------------ numerics and init
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_is_stable_and_exact_in_the_tails(dtype):
    z = np.array([-1e4, -800.0, -50.0, -1.0, 0.0, 1.0, 50.0, 800.0, 1e4], dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no overflow warning from exp
        s = L.sigmoid(z)
    assert s.dtype == dtype
    assert s[0] == 0.0 and s[-1] == 1.0 and s[4] == 0.5
    with np.errstate(over="ignore"):           # the naive formula, where exp(-z) = inf -> 0
        ref = 1.0 / (1.0 + np.exp(-z.astype(np.float64)))
    rel = np.abs(s - ref) / np.maximum(ref, np.finfo(np.float64).tiny)
    assert np.all(rel <= 2 * np.finfo(dtype).eps), rel   # relative accuracy in both tails


def test_saturated_gates_give_finite_gradients():
    x, h0, c0, W, b = _case(3, 2, 3, 4, seed=15, scale=300.0)
    dhs, dh_S, dc_S = _upstream(3, 2, 4, seed=15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hs, _, cache = L.lstm_forward(x, h0, c0, W, b)
        grads = L.lstm_backward(dhs, dh_S, dc_S, cache)
    assert np.isfinite(hs).all() and all(np.isfinite(g).all() for g in grads)


def test_init_forget_bias_and_shapes():
    rng = np.random.default_rng(16)
    W, b = L.lstm_init(rng, 3, 5, np.float32, forget_bias=1.0)
    assert W.shape == (8, 20) and b.shape == (20,) and W.dtype == b.dtype == np.float32
    np.testing.assert_array_equal(b[5:10], 1.0)
    np.testing.assert_array_equal(np.delete(b, np.s_[5:10]), 0.0)
    assert np.abs(W).max() <= 1 / np.sqrt(5)
    assert L.lstm_param_shapes(3, 5) == [("W", (8, 20)), ("b", (20,))]


# ------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    x, h0, c0, W, b = _case(2, 3, 4, 5, seed=17)
    with pytest.raises(ValueError, match=r"lstm: W must have shape \(9, 20\), got \(8, 20\)"):
        L.lstm_forward(x, h0, c0, W[:8], b)
    with pytest.raises(ValueError, match=r"lstm: b must have shape \(20\)"):
        L.lstm_forward(x, h0, c0, W, b[:19])
    with pytest.raises(ValueError, match=r"lstm: h0 must have shape \(3, H\).*got \(2, 5\)"):
        L.lstm_forward(x, h0[:2], c0, W, b)
    with pytest.raises(ValueError, match=r"lstm: c0 must have shape \(3, 5\)"):
        L.lstm_forward(x, h0, c0[:, :4], W, b)
    with pytest.raises(TypeError, match=r"lstm: W has dtype float32, expected float64"):
        L.lstm_forward(x, h0, c0, W.astype(np.float32), b)
    with pytest.raises(ValueError, match=r"lstm: x must have 3 dimensions"):
        L.lstm_forward(x[0], h0, c0, W, b)
    with pytest.raises(ValueError, match=r"lstm: x must hold at least one step"):
        L.lstm_forward(x[:0], h0, c0, W, b)
    with pytest.raises(TypeError, match=r"lstm: x must be float32 or float64, got dtype int64"):
        L.lstm_forward(x.astype(np.int64), h0, c0, W, b)
    bad = x.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match=r"lstm: x contains 1 non-finite"):
        L.lstm_forward(bad, h0, c0, W, b)
    with pytest.raises(ValueError, match=r"lstm_cell: W must have shape \(9, 20\)"):
        L.lstm_cell_forward(x[0], h0, c0, W[1:], b)
    _, _, cache = L.lstm_forward(x, h0, c0, W, b)
    with pytest.raises(ValueError, match=r"lstm backward: dhs must have shape \(2, 3, 5\)"):
        L.lstm_backward(np.zeros((2, 3, 4)), None, None, cache)
    with pytest.raises(ValueError, match=r"lstm backward: dc_S must have shape \(3, 5\)"):
        L.lstm_backward(None, None, np.zeros((3, 4)), cache)
    with pytest.raises(ValueError, match=r"bilstm: Wf must have shape \(D \+ H, 4H\)"):
        L.bilstm_forward(x, W[1:], b, W, b)
    with pytest.raises(ValueError, match=r"bilstm \(backward direction\): W must have shape"):
        L.bilstm_forward(x, W, b, W[:, :16], b)
