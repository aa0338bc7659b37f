"""Episodic distances and the ProtoNet loss: reference vs float64 finite differences,
Numba vs reference with per-dtype bounds, identities, ugly shapes, cancellation, errors.

Shape letters: T tasks, Q queries, N supports/prototypes, D features.

Tolerances (kernel a against the float64 reference r of the same inputs):
    |a - r| <= atol + mag * eps(dtype) * c
where mag is the sum of the absolute values of the summed terms (so cancellation cannot hide
behind a small result) and c is the number of rounding steps per output plus a margin: a
recursive sum of B terms has error at most about B eps times the sum of |terms|.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
from metacore import gradcheck
from metacore.kernels import distance as K
from metacore.reference import distance as R

from _cuda_helpers import assert_close, ddata, magnitudes, steps  # noqa: E402  (tests/ on sys.path)

OPS = ("sqeuclidean", "l1", "cosine")
HAS_NUMBA = "numba" in K.available_backends()
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The Numba backend routes by problem size (kernels/distance_numba.py): serial kernels and
# the fused ProtoNet loss below SMALL_TERMS, the parallel tiled kernels above, and the
# centred-GEMM squared Euclidean / GEMM cosine above GEMM_TERMS. The tests' shapes are tiny,
# so the `route` fixture lowers the thresholds to run every route on them.
ROUTES = {"serial": {}, "parallel": {"SMALL_TERMS": 0},
          "gemm": {"SMALL_TERMS": 0, "GEMM_TERMS": 0, "GEMM_MIN_D": 1},
          # the same GEMM route with NumPy's BLAS and NumPy's softmax (from BLAS_TERMS)
          "blas": {"SMALL_TERMS": 0, "GEMM_TERMS": 0, "GEMM_MIN_D": 1, "BLAS_TERMS": 0}}


@pytest.fixture(params=list(ROUTES))
def route(request, monkeypatch):
    """Numba's size thresholds set so that every call takes this route; -> its name."""
    if not HAS_NUMBA:
        pytest.skip("numba not installed")
    mod = K._backend("route", "numba")
    for name, value in ROUTES[request.param].items():
        monkeypatch.setattr(mod, name, value)
    return request.param

SHAPES = [  # (T, Q, N, D)
    (1, 1, 1, 1),
    (2, 7, 13, 17),
    (3, 5, 1, 64),
    (1, 1, 11, 3),
    (4, 13, 7, 1),
    (2, 0, 3, 4),     # no queries: legal, empty result
]


def fwd(op):
    return getattr(K, "pairwise_" + op)


def bwd(op):
    return getattr(K, "pairwise_" + op + "_backward")


def data(shape, dtype, seed):
    """(T, Q, N, D) -> q (T, Q, D), s (T, N, D), g (T, Q, N), standard normal."""
    return ddata(shape, dtype, seed)


# ---------------------------------------------------------------- reference vs finite differences
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 1, 1, 1), (1, 2, 3, 1)])
def test_reference_backward_matches_finite_differences(op, shape):
    q, s, g = data(shape, np.float64, seed=1)
    dq, ds = R.__dict__["pairwise_" + op + "_backward"](g, q, s)

    def f():
        return float((R.__dict__["pairwise_" + op](q, s) * g).sum())

    assert gradcheck.rel_error(dq, gradcheck.numerical_gradient(f, q)) <= 1e-7
    assert gradcheck.rel_error(ds, gradcheck.numerical_gradient(f, s)) <= 1e-7


@needs_numba
@pytest.mark.parametrize("op", OPS)
def test_numba_backward_matches_finite_differences(op, route):
    q, s, g = data((2, 5, 3, 7), np.float64, seed=2)
    dq, ds = bwd(op)(g, q, s, backend="numba")

    def f():
        return float((fwd(op)(q, s, backend="numba") * g).sum())

    assert gradcheck.rel_error(dq, gradcheck.numerical_gradient(f, q)) <= 1e-7
    assert gradcheck.rel_error(ds, gradcheck.numerical_gradient(f, s)) <= 1e-7


# ---------------------------------------------------------------- identities
@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
@pytest.mark.parametrize("op", OPS)
def test_homogeneity_identity(op, backend):
    """Euler's theorem on sum(out * g): sqeuclidean is 2-homogeneous in (q, s), L1 is
    1-homogeneous, cosine is 0-homogeneous in q and in s separately. Both distances are
    also translation invariant, so sum_i dq_i + sum_j ds_j = 0 per task."""
    q, s, g = data((3, 6, 5, 9), np.float64, seed=3)
    out = fwd(op)(q, s, backend=backend)
    dq, ds = bwd(op)(g, q, s, backend=backend)
    total = float((out * g).sum())
    if op == "cosine":
        assert abs(float((q * dq).sum())) <= 1e-12 * np.abs(g).sum()
        assert abs(float((s * ds).sum())) <= 1e-12 * np.abs(g).sum()
    else:
        degree = 2.0 if op == "sqeuclidean" else 1.0
        lhs = float((q * dq).sum() + (s * ds).sum())
        assert abs(lhs - degree * total) <= 1e-12 * (np.abs(out * g).sum())
        shift = dq.sum(axis=1) + ds.sum(axis=1)           # (T, D)
        assert np.abs(shift).max() <= 1e-12 * (np.abs(dq).sum() + np.abs(ds).sum())


# ---------------------------------------------------------------- numba vs reference
@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("op", OPS)
def test_numba_matches_reference(op, shape, dtype, route):
    q, s, g = data(shape, dtype, seed=4)
    c_out, c_dq, c_ds = steps(op, shape)
    m_out, m_dq, m_ds = magnitudes(op, g, q, s)
    # the oracle is the reference on the same values, in float64
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    out = fwd(op)(q, s, backend="numba")
    dq, ds = bwd(op)(g, q, s, backend="numba")
    assert out.dtype == dq.dtype == ds.dtype == dtype
    assert out.shape == shape[:2] + shape[2:3] and dq.shape == q.shape and ds.shape == s.shape
    assert_close(f"{op} forward", out, R.__dict__["pairwise_" + op](q64, s64), m_out, dtype,
                 c_out)
    rdq, rds = R.__dict__["pairwise_" + op + "_backward"](g64, q64, s64)
    assert_close(f"{op} dq", dq, rdq, m_dq, dtype, c_dq)
    assert_close(f"{op} ds", ds, rds, m_ds, dtype, c_ds)


@needs_numba
@pytest.mark.parametrize("op", OPS)
def test_noncontiguous_inputs(op):
    rng = np.random.default_rng(5)
    big_q = rng.standard_normal((2, 14, 11))
    big_s = rng.standard_normal((11, 7, 2))
    q = big_q[:, ::2, :]                                  # (2, 7, 11) strided
    s = big_s.transpose(2, 1, 0)                          # (2, 7, 11) transposed
    g = np.asfortranarray(rng.standard_normal((2, 7, 7)))
    assert not (q.flags.c_contiguous or s.flags.c_contiguous or g.flags.c_contiguous)
    qc, sc, gc = (np.ascontiguousarray(x) for x in (q, s, g))
    # numba copies to contiguous first, so it must agree bit for bit; NumPy's pairwise
    # summation depends on the memory layout, so the reference agrees to rounding
    for backend, check in (("numba", np.testing.assert_array_equal),
                           ("reference", lambda a, b: np.testing.assert_allclose(a, b,
                                                                                 rtol=1e-13))):
        check(fwd(op)(q, s, backend=backend), fwd(op)(qc, sc, backend=backend))
        for a, b in zip(bwd(op)(g, q, s, backend=backend), bwd(op)(gc, qc, sc, backend=backend)):
            check(a, b)


def test_reference_returns_input_dtype_and_fresh_arrays():
    q, s, g = data((2, 3, 4, 5), np.float32, seed=6)
    for op in OPS:
        out = fwd(op)(q, s, backend="reference")
        dq, ds = bwd(op)(g, q, s, backend="reference")
        assert out.dtype == dq.dtype == ds.dtype == np.float32
        assert not np.shares_memory(dq, q) and not np.shares_memory(ds, s)


@needs_numba
def test_auto_is_numba_when_installed():
    assert K._backend("test", "auto") is K._backend("test", "numba")


# ---------------------------------------------------------------- cancellation
@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
def test_sqeuclidean_no_cancellation_far_from_origin(backend):
    """Points near 1e4, separated by about 1e-2, in float32: the result must agree with the
    float64 direct formula to (D + 8) eps relative; the expansion |q|^2+|s|^2-2q.s does not."""
    _far_from_origin_case(backend)


def test_numba_routes_no_cancellation_far_from_origin(route):
    """The same case through each Numba route, the centred GEMM included."""
    _far_from_origin_case("numba")


def test_gemm_route_recomputes_cancelling_pairs(route):
    """Two tight clusters at +-1e4 (float32): centring on the task mean leaves every
    within-cluster pair cancelling (|q'|^2 ~ 1e9 against d ~ 1e-2), so those pairs must be
    recomputed by the direct formula; the cross-cluster pairs (d ~ 2.6e10) are the GEMM's.
    Bound (D + 8) eps relative on every route; the centred expansion alone fails it."""
    T, Q, N, D = 1, 12, 10, 64
    rng = np.random.default_rng(8)
    side_q = np.where(np.arange(Q) % 2 == 0, 1.0, -1.0)[None, :, None]
    side_s = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)[None, :, None]
    centre = 1e4 + rng.standard_normal((T, 1, D))
    q = (side_q * centre + 1e-2 * rng.standard_normal((T, Q, D))).astype(np.float32)
    s = (side_s * centre + 1e-2 * rng.standard_normal((T, N, D))).astype(np.float32)
    q64, s64 = q.astype(np.float64), s.astype(np.float64)
    ref = ((q64[:, :, None] - s64[:, None]) ** 2).sum(-1)                       # (T, Q, N)
    c_out = steps("sqeuclidean", (T, Q, N, D))[0]
    out = K.pairwise_sqeuclidean(q, s, backend="numba")
    assert_close("two clusters", out, ref, ref, np.float32, c_out)
    mu = ((q64.sum(1) + s64.sum(1)) / (Q + N)).astype(np.float32)[:, None]   # as the route
    qc, sc = q - mu, s - mu
    centred = ((qc * qc).sum(-1)[:, :, None] + (sc * sc).sum(-1)[:, None, :]
               - 2 * np.matmul(qc, sc.transpose(0, 2, 1)))
    with pytest.raises(AssertionError):
        assert_close("centred expansion", centred, ref, ref, np.float32, c_out)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_identical_points_give_exactly_zero(route, dtype):
    """q_i == s_i exactly: d_ii must be exactly 0 on every route (the GEMM route's
    expansion leaves a rounding residue there, which the cancellation test sends to the
    direct formula), and every entry within the usual bound."""
    T, Q, N, D = 2, 9, 6, 33
    q, _, g = data((T, Q, N, D), dtype, seed=21)
    q = (q + 50).astype(dtype)                        # off the origin: the residue is real
    s = q[:, :N].copy()
    out = K.pairwise_sqeuclidean(q, s, backend="numba")
    assert (out[:, np.arange(N), np.arange(N)] == 0).all()
    q64, s64 = q.astype(np.float64), s.astype(np.float64)
    c_out, c_dq, c_ds = steps("sqeuclidean", (T, Q, N, D))
    m_out, m_dq, m_ds = magnitudes("sqeuclidean", g, q, s)
    assert_close("identical points", out, R.pairwise_sqeuclidean(q64, s64), m_out, dtype,
                 c_out)
    dq, ds = K.pairwise_sqeuclidean_backward(g, q, s, backend="numba")
    rdq, rds = R.pairwise_sqeuclidean_backward(g.astype(np.float64), q64, s64)
    assert_close("identical points dq", dq, rdq, m_dq, dtype, c_dq)
    assert_close("identical points ds", ds, rds, m_ds, dtype, c_ds)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_near_duplicate_points(route, dtype):
    """Every support a copy of a query moved by 1e-3 relative, all near 100: the distances
    are ~1e-2 against norms ~1e6, so the expansion cancels almost every bit; the results
    must still meet the direct formula's bounds (distance relative to itself, gradients
    relative to the sum of their terms)."""
    T, Q, N, D = 2, 8, 8, 40
    rng = np.random.default_rng(22)
    q = (100 + rng.standard_normal((T, Q, D))).astype(dtype)
    s = (q[:, rng.permutation(Q)[:N]] + 1e-3 * rng.standard_normal((T, N, D))).astype(dtype)
    g = rng.standard_normal((T, Q, N)).astype(dtype)
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    ref = R.pairwise_sqeuclidean(q64, s64)
    c_out, c_dq, c_ds = steps("sqeuclidean", (T, Q, N, D))
    _, m_dq, m_ds = magnitudes("sqeuclidean", g, q, s)
    out = K.pairwise_sqeuclidean(q, s, backend="numba")
    assert_close("near duplicates", out, ref, ref, dtype, c_out)
    dq, ds = K.pairwise_sqeuclidean_backward(g, q, s, backend="numba")
    rdq, rds = R.pairwise_sqeuclidean_backward(g64, q64, s64)
    assert_close("near duplicates dq", dq, rdq, m_dq, dtype, c_dq)
    assert_close("near duplicates ds", ds, rds, m_ds, dtype, c_ds)


@needs_numba
def test_gemm_backward_recomputes_cancelling_rows(monkeypatch):
    """Supports in one tight cluster at +1e4, queries half beside it and half at -1e4
    (float32). Centring leaves the near queries at |q'| ~ 1e4 while their gradient terms
    are ~1e-2, so the GEMM form 2 (r_i q'_i - sum_j g_ij s'_j) loses every digit there; the
    elementwise KAPPA test alone must send those rows to the direct formula. With both tests
    disabled (KAPPA = KAPPA_ROW = inf) the same bound fails, so this test can fail."""
    mod = K._backend("t", "numba")
    for name, value in ROUTES["gemm"].items():
        monkeypatch.setattr(mod, name, value)
    T, Q, N, D = 1, 10, 6, 48
    rng = np.random.default_rng(23)
    centre = 1e4 + rng.standard_normal((T, 1, D))
    side = np.where(np.arange(Q) % 2 == 0, 1.0, -1.0)[None, :, None]
    q = (side * centre + 1e-2 * rng.standard_normal((T, Q, D))).astype(np.float32)
    s = (centre + 1e-2 * rng.standard_normal((T, N, D))).astype(np.float32)
    g = rng.standard_normal((T, Q, N)).astype(np.float32)
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    rdq, rds = R.pairwise_sqeuclidean_backward(g64, q64, s64)
    _, c_dq, c_ds = steps("sqeuclidean", (T, Q, N, D))
    _, m_dq, m_ds = magnitudes("sqeuclidean", g, q, s)
    dq, ds = K.pairwise_sqeuclidean_backward(g, q, s, backend="numba")
    assert_close("split queries dq", dq, rdq, m_dq, np.float32, c_dq)
    assert_close("split queries ds", ds, rds, m_ds, np.float32, c_ds)
    monkeypatch.setattr(mod, "KAPPA_ROW", np.inf)                 # the elementwise test alone
    dq1, _ = K.pairwise_sqeuclidean_backward(g, q, s, backend="numba")
    assert_close("elementwise test alone", dq1, rdq, m_dq, np.float32, c_dq)
    monkeypatch.setattr(mod, "KAPPA", np.inf)
    dq_bad, _ = K.pairwise_sqeuclidean_backward(g, q, s, backend="numba")
    with pytest.raises(AssertionError):
        assert_close("GEMM form alone", dq_bad, rdq, m_dq, np.float32, c_dq)


@needs_numba
def test_gemm_backward_two_clusters_gradient_inside(monkeypatch):
    """Two tight clusters at +-1e4, each with queries and supports, and the upstream
    gradient zero across clusters (a converged ProtoNet's softmax): every row passes the
    elementwise test (its partners span both clusters), but the GEMM form's error ~ eps 1e4
    against terms ~ 1e-2 is caught by the g-weighted normwise test (KAPPA_ROW) and the rows
    recomputed directly. With that test disabled the bound fails, so this test can fail.
    The fused ProtoNet loss goes through the same backward."""
    mod = K._backend("t", "numba")
    for name, value in ROUTES["gemm"].items():
        monkeypatch.setattr(mod, name, value)
    T, Q, N, D = 1, 12, 8, 40
    rng = np.random.default_rng(25)
    centre = 1e4 + rng.standard_normal((T, 1, D))
    side_q = np.where(np.arange(Q) % 2 == 0, 1.0, -1.0)
    side_s = np.where(np.arange(N) % 2 == 0, 1.0, -1.0)
    q = (side_q[None, :, None] * centre + 1e-2 * rng.standard_normal((T, Q, D))).astype(
        np.float32)
    s = (side_s[None, :, None] * centre + 1e-2 * rng.standard_normal((T, N, D))).astype(
        np.float32)
    same = (side_q[:, None] == side_s[None, :])[None]                   # (1, Q, N)
    g = np.where(same, rng.standard_normal((T, Q, N)), 0).astype(np.float32)
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    rdq, rds = R.pairwise_sqeuclidean_backward(g64, q64, s64)
    _, c_dq, c_ds = steps("sqeuclidean", (T, Q, N, D))
    _, m_dq, m_ds = magnitudes("sqeuclidean", g, q, s)
    dq, ds = K.pairwise_sqeuclidean_backward(g, q, s, backend="numba")
    assert_close("two clusters dq", dq, rdq, m_dq, np.float32, c_dq)
    assert_close("two clusters ds", ds, rds, m_ds, np.float32, c_ds)
    monkeypatch.setattr(mod, "KAPPA_ROW", np.inf)
    dq_bad, _ = K.pairwise_sqeuclidean_backward(g, q, s, backend="numba")
    with pytest.raises(AssertionError):
        assert_close("GEMM form alone", dq_bad, rdq, m_dq, np.float32, c_dq)


@needs_numba
def test_fast_path_finiteness_names_the_array():
    """The host fast path's single finiteness probe: a NaN or Inf in any argument is still
    reported by name, and huge finite values (whose plain sum overflows) are accepted."""
    q, s, g = data((2, 4, 3, 5), np.float32, seed=24)
    y = np.zeros((2, 4), dtype=np.int64)
    for name, pos in (("q", 0), ("s", 1), ("g", 2)):
        args = [q.copy(), s.copy(), g.copy()]
        args[pos][1, 2, 1] = np.inf if name == "s" else np.nan
        bq, bs, bg = args
        if name != "g":
            _raises(ValueError, ["pairwise_sqeuclidean", name, "1 non-finite"],
                    K.pairwise_sqeuclidean, bq, bs)
            _raises(ValueError, ["protonet_loss", name, "1 non-finite"],
                    K.protonet_loss, bq, bs, y)
        _raises(ValueError, ["pairwise_sqeuclidean_backward", name, "1 non-finite"],
                K.pairwise_sqeuclidean_backward, bg, bq, bs)
    big = np.full((1, 3, 4), 3e38, np.float32)
    K.pairwise_sqeuclidean_backward(np.zeros((1, 3, 3), np.float32), big, big)   # no raise


def _far_from_origin_case(backend):
    T, Q, N, D = 2, 9, 5, 64
    rng = np.random.default_rng(7)
    centre = 1e4 + rng.standard_normal((T, 1, D))
    q = (centre + 1e-2 * rng.standard_normal((T, Q, D))).astype(np.float32)   # (T, Q, D)
    s = (centre + 1e-2 * rng.standard_normal((T, N, D))).astype(np.float32)   # (T, N, D)
    g = rng.standard_normal((T, Q, N)).astype(np.float32)                       # (T, Q, N)
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    ref = ((q64[:, :, None] - s64[:, None]) ** 2).sum(-1)                       # (T, Q, N)
    assert 1e-3 < ref.min() and ref.max() < 1e-1           # separations really are ~1e-2
    c_out, c_dq, c_ds = steps("sqeuclidean", (T, Q, N, D))
    m_out, m_dq, m_ds = magnitudes("sqeuclidean", g, q, s)
    out = K.pairwise_sqeuclidean(q, s, backend=backend)
    assert_close("sqeuclidean far from origin", out, ref, m_out, np.float32, c_out)
    dq, ds = K.pairwise_sqeuclidean_backward(g, q, s, backend=backend)
    rdq, rds = R.pairwise_sqeuclidean_backward(g64, q64, s64)
    assert_close("dq far from origin", dq, rdq, m_dq, np.float32, c_dq)
    assert_close("ds far from origin", ds, rds, m_ds, np.float32, c_ds)
    # the same bound rejects the BLAS expansion, so this test can fail
    blas = ((q * q).sum(-1)[:, :, None] + (s * s).sum(-1)[:, None, :]
            - 2 * np.matmul(q, s.transpose(0, 2, 1)))
    with pytest.raises(AssertionError):
        assert_close("expansion", blas, ref, m_out, np.float32, c_out)


# ---------------------------------------------------------------- cosine near zero vectors
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
def test_cosine_zero_vectors(backend, dtype):
    """A zero vector has similarity 0 with everything; its gradient is g s/(EPS |s|)."""
    q, s, g = data((2, 4, 3, 5), dtype, seed=8)
    q[0, 1] = 0
    s[1, 2] = 0
    c = K.pairwise_cosine(q, s, backend=backend)
    assert np.all(c[0, 1] == 0) and np.all(c[1, :, 2] == 0)
    dq, ds = K.pairwise_cosine_backward(g, q, s, backend=backend)
    assert np.isfinite(dq).all() and np.isfinite(ds).all()
    sn = np.linalg.norm(s[0].astype(np.float64), axis=-1)            # (N,)
    want = (g[0, 1].astype(np.float64) / (R.EPS * sn)) @ s[0].astype(np.float64)   # (D,)
    np.testing.assert_allclose(dq[0, 1], want, rtol=50 * np.finfo(dtype).eps)


@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
def test_cosine_below_eps_gradient_matches_finite_differences(backend):
    """Inside the clamp (|q| <= EPS) the similarity is linear in q; check that branch with
    steps small enough to stay inside it."""
    q, s, g = data((1, 3, 4, 5), np.float64, seed=9)
    q[0, 0] = 0.0
    q[0, 2] *= 1e-10 / np.linalg.norm(q[0, 2])
    dq, _ = K.pairwise_cosine_backward(g, q, s, backend=backend)

    def f():
        return float((K.pairwise_cosine(q, s, backend=backend) * g).sum())

    num = gradcheck.numerical_gradient(f, q, h=1e-12)
    for i in (0, 2):
        assert gradcheck.rel_error(dq[0, i], num[0, i]) <= 1e-7


# ---------------------------------------------------------------- ProtoNet loss
@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
@pytest.mark.parametrize("metric", OPS)
def test_protonet_gradient_matches_finite_differences(metric, backend):
    T, Q, N, D = 2, 7, 3, 5
    q, s, _ = data((T, Q, N, D), np.float64, seed=10)
    rng = np.random.default_rng(11)
    y = rng.integers(0, N, (T, Q))
    gloss = rng.standard_normal(T)
    scale = 0.7
    loss, dq, ds, pred = K.protonet_loss(q, s, y, gloss, metric=metric, scale=scale,
                                         backend=backend)

    def f():
        return float(K.protonet_loss(q, s, y, gloss, metric=metric, scale=scale,
                                     backend=backend)[0] @ gloss)

    assert gradcheck.rel_error(dq, gradcheck.numerical_gradient(f, q)) <= 1e-7
    assert gradcheck.rel_error(ds, gradcheck.numerical_gradient(f, s)) <= 1e-7
    sign = 1.0 if metric == "cosine" else -1.0
    logits = sign * fwd(metric)(q, s, backend="reference")
    np.testing.assert_array_equal(pred, logits.argmax(-1))


@needs_numba
def test_protonet_blas_route_matches_finite_differences(monkeypatch):
    """The BLAS route of the ProtoNet loss (distance_numba._blas_loss: three GEMMs through
    NumPy, NumPy softmax) in float64 against central differences, with an upstream gloss,
    a scale and several tasks; and against the reference and the Numba GEMM route."""
    mod = K._backend("route", "numba")
    T, Q, N, D = 2, 9, 4, 6
    q, s, _ = data((T, Q, N, D), np.float64, seed=21)
    rng = np.random.default_rng(22)
    y = rng.integers(0, N, (T, Q))
    gloss = rng.standard_normal(T)
    scale = 0.7
    for name, value in ROUTES["gemm"].items():
        monkeypatch.setattr(mod, name, value)
    gemm = K.protonet_loss(q, s, y, gloss, scale=scale, backend="numba")
    monkeypatch.setattr(mod, "BLAS_TERMS", 0)
    calls = []
    real = mod._blas_loss
    monkeypatch.setattr(mod, "_blas_loss", lambda *a: calls.append(1) or real(*a))
    loss, dq, ds, pred = K.protonet_loss(q, s, y, gloss, scale=scale, backend="numba")
    assert calls, "the BLAS route was not taken"

    def f():
        return float(K.protonet_loss(q, s, y, gloss, scale=scale, backend="numba")[0] @ gloss)

    assert gradcheck.rel_error(dq, gradcheck.numerical_gradient(f, q)) <= 1e-7
    assert gradcheck.rel_error(ds, gradcheck.numerical_gradient(f, s)) <= 1e-7
    ref = R.protonet_loss(q, s, y, gloss, scale=scale)
    for a, b, r in zip((loss, dq, ds), gemm[:3], ref[:3]):
        assert gradcheck.rel_error(a, r) <= 1e-12
        assert gradcheck.rel_error(a, b) <= 1e-12
    np.testing.assert_array_equal(pred, ref[3])


@pytest.mark.parametrize("backend", ["reference"] + (["numba"] if HAS_NUMBA else []))
def test_protonet_closed_forms(backend):
    """Equal distances to every prototype give loss log N exactly and zero gradient on the
    queries; a prototype placed on each query gives a loss and accuracy we can write down."""
    T, Q, N, D = 2, 5, 4, 3
    rng = np.random.default_rng(12)
    q = rng.standard_normal((T, Q, D))
    s = np.repeat(rng.standard_normal((T, 1, D)), N, axis=1)             # (T, N, D) equal
    y = rng.integers(0, N, (T, Q))
    loss, dq, ds, _ = K.protonet_loss(q, s, y, backend=backend)
    np.testing.assert_allclose(loss, np.log(N), rtol=1e-15)
    assert np.abs(dq).max() <= 1e-15
    # one query per task, prototype 0 on it, the others at squared distance 1 and 4:
    q1 = np.zeros((1, 1, 2))
    s1 = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]])
    loss1, _, _, pred1 = K.protonet_loss(q1, s1, np.array([[0]]), backend=backend)
    np.testing.assert_allclose(loss1, [np.log(1 + np.exp(-1) + np.exp(-4))], rtol=1e-15)
    assert pred1[0, 0] == 0


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", OPS)
def test_protonet_numba_matches_reference(metric, dtype, route):
    """Loss is an average of log-sum-exps of O(1) logits: bound 8 (N + D) eps on the loss,
    relative to max|ref| on the gradients (their entries mix signs after the softmax)."""
    T, Q, N, D = 3, 11, 5, 13
    q, s, _ = data((T, Q, N, D), dtype, seed=13)
    y = np.random.default_rng(14).integers(0, N, (T, Q))
    got = K.protonet_loss(q, s, y, metric=metric, backend="numba")
    ref = R.protonet_loss(q.astype(np.float64), s.astype(np.float64), y, metric=metric)
    c = 8 * (N + D + Q)
    for name, a, r in zip(("loss", "dq", "ds"), got[:3], ref[:3]):
        assert a.dtype == dtype
        scale = np.abs(r).max() + np.abs(ref[0]).max()
        assert_close(f"protonet {metric} {name}", a, r, scale, dtype, c)
    np.testing.assert_array_equal(got[3], ref[3])


# ---------------------------------------------------------------- bad input
def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    for part in match:
        assert part in msg, f"{part!r} not in error message {msg!r}"


def test_bad_inputs_name_the_problem():
    q = np.zeros((2, 3, 4))
    s = np.zeros((2, 5, 4))
    g = np.zeros((2, 3, 5))
    y = np.zeros((2, 3), dtype=np.int64)
    _raises(ValueError, ["pairwise_sqeuclidean", "q", "3 dimensions", "(3, 4)"],
            K.pairwise_sqeuclidean, q[0], s)
    _raises(ValueError, ["pairwise_l1", "s", "(2, *, 4)", "(3, 5, 4)"],
            K.pairwise_l1, q, np.zeros((3, 5, 4)))
    _raises(ValueError, ["pairwise_cosine", "(2, *, 4)", "(2, 5, 6)"],
            K.pairwise_cosine, q, np.zeros((2, 5, 6)))
    _raises(TypeError, ["pairwise_sqeuclidean", "s", "float32", "float64"],
            K.pairwise_sqeuclidean, q, s.astype(np.float32))
    _raises(TypeError, ["pairwise_sqeuclidean", "q", "int64"],
            K.pairwise_sqeuclidean, q.astype(np.int64), s)
    bad = q.copy()
    bad[1, 2, 3] = np.nan
    _raises(ValueError, ["pairwise_sqeuclidean", "q", "1 non-finite"],
            K.pairwise_sqeuclidean, bad, s)
    _raises(ValueError, ["pairwise_l1_backward", "g", "(2, 3, 5)", "(2, 5, 3)"],
            K.pairwise_l1_backward, np.zeros((2, 5, 3)), q, s)
    _raises(ValueError, ["protonet_loss", "y", "5", "< 5"],
            K.protonet_loss, q, s, y + 5)
    _raises(ValueError, ["protonet_loss", "y", "below", "0"], K.protonet_loss, q, s, y - 1)
    _raises(TypeError, ["protonet_loss", "y", "integer"], K.protonet_loss, q, s, y * 1.0)
    _raises(ValueError, ["protonet_loss", "y", "(2, 3)", "(3, 2)"],
            K.protonet_loss, q, s, y.T.copy())
    _raises(ValueError, ["protonet_loss", "gloss", "(2)"],
            K.protonet_loss, q, s, y, np.ones(3))
    _raises(ValueError, ["protonet_loss", "metric", "'hamming'"],
            K.protonet_loss, q, s, y, metric="hamming")
    _raises(ValueError, ["protonet_loss", "at least one query"],
            K.protonet_loss, q[:, :0], s, y[:, :0])
    _raises(ValueError, ["pairwise_sqeuclidean", "unknown backend", "'cuda'"],
            K.pairwise_sqeuclidean, q, s, backend="cuda")
    _raises(TypeError, ["pairwise_cosine", "numpy.ndarray", "list"],
            K.pairwise_cosine, q.tolist(), s)


def test_works_without_numba():
    """With numba blocked, the module imports, auto falls back to the reference, and asking
    for numba says what is missing."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import numpy as np\n"
        "import metacore.kernels.distance as K\n"
        "assert K.available_backends() == ['reference'], K.available_backends()\n"
        "q = np.ones((1, 2, 3)); s = np.zeros((1, 4, 3))\n"
        "assert (K.pairwise_sqeuclidean(q, s) == 3).all()\n"
        "try:\n"
        "    K.pairwise_l1(q, s, backend='numba')\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
        "else:\n"
        "    raise SystemExit('numba backend did not fail')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR pairwise_l1: backend 'numba' needs the package 'numba'" in res.stdout
    assert "backend='reference'" in res.stdout
