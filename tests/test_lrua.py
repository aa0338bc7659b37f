"""LRUA memory (MANN): reference vs float64 finite differences, Numba vs reference with
per-dtype bounds, closed forms, the 1-homogeneity identity, the non-differentiable
selection, ugly shapes, bad input, and the import without numba.

Shape letters: T time steps, B episodes, H heads, S memory slots, W slot width.

Tolerance of a kernel array a against the float64 reference r of the same inputs:
    |a - r| <= eps(dtype) * c * max|r|,   c = 4 T (S + W + H)
normwise per array (as gradcheck.rel_error), because the recurrence mixes every slot and
step into every output: a step sums over at most S + W + H terms per output, T steps chain.
(Measured on SHAPES: at most 1.0 T (S + W + H) eps, for the W = 1 case; 0.01-0.3 elsewhere.)
The 0/1 least-used weights must agree exactly.

Finite differences only hold where the least-used selection (w_lu and the zeroed slot) does
not switch inside the step h; `selection_margin` measures how far each usage vector is from
a switch, and every gradient test asserts that margin before trusting its finite differences.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
from metacore import gradcheck
from metacore.kernels import lrua as K

from _cuda_helpers import ldata  # noqa: E402  (tests/ on sys.path)

HAS_NUMBA = "numba" in K.available_backends()
needs_numba = pytest.mark.skipif(not HAS_NUMBA, reason="numba not installed")
BACKENDS = ["reference"] + (["numba"] if HAS_NUMBA else [])
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAMMA = 0.9
MARGIN = 1e-3      # usage gaps below this would let an FD step of 1e-6 near a switch


def data(shape, dtype, seed, per_step=False):
    """shape (T, B, H, S, W) -> keys, alpha, memory0, read0, usage0, c (the probe weights).

    usage0 holds a permutation of 0, 0.3, ..., 0.3 (S - 1): distinct, well separated."""
    return ldata(shape, dtype, seed, per_step)


def selection_margin(usage0, w_u, H):
    """Smallest distance from a switch of the argmin or of the n-th smallest (n = H) over
    every usage vector that selects something: usage0 and w_u_t, t < T. -> float."""
    us = np.concatenate([usage0[None], w_u], axis=0).astype(np.float64)  # (T + 1, B, S)
    s = np.sort(us, axis=-1)
    S = s.shape[-1]
    gaps = [np.inf]
    if S > 1:
        gaps.append((s[..., 1] - s[..., 0]).min())
    if H < S:
        gaps.append((s[..., H] - s[..., H - 1]).min())
    return float(min(gaps))


def assert_close(name, a, ref, dtype, c):
    """|a - ref| <= eps(dtype) * c * max|ref|; prints the first mismatches."""
    a = np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert a.shape == ref.shape, f"{name}: shape {a.shape} vs reference {ref.shape}"
    bound = np.finfo(dtype).eps * c * max(np.abs(ref).max(), np.finfo(dtype).tiny)
    bad = ~(np.abs(a - ref) <= bound)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        lines = [f"  at {tuple(i)}: got {a[tuple(i)]!r}, ref {ref[tuple(i)]!r}"
                 for i in idx]
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} entries differ by more "
                             f"than {bound:.3g}\n" + "\n".join(lines))


def probe(backend, keys, alpha, memory0, read0, usage0, c, gamma=GAMMA):
    """The scalar probe loss sum(c * reads), float64."""
    reads = K.lrua_forward(keys, alpha, memory0, read0, usage0, gamma, backend=backend)[0]
    return float((reads * c).sum())


# ---------------------------------------------------------------- finite differences
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("shape, seed", [((5, 2, 2, 7, 3), 1), ((3, 1, 3, 4, 2), 1),
                                         ((1, 1, 1, 3, 1), 3)])
def test_backward_matches_finite_differences(shape, seed, per_step, backend):
    """Seeds are chosen so that no gradient is zero by symmetry (with W = 1 every cosine is
    +-1; seed 1 puts every row on the key's side, and then dalpha = 0 exactly)."""
    keys, alpha, memory0, read0, usage0, c = data(shape, np.float64, seed=seed,
                                                  per_step=per_step)
    w_u = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)[3]
    assert selection_margin(usage0, w_u, shape[2]) > MARGIN
    grads = K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)

    def f():
        return probe(backend, keys, alpha, memory0, read0, usage0, c)

    for name, x, dx in zip(("keys", "alpha", "memory0", "read0"),
                           (keys, alpha, memory0, read0), grads):
        assert dx.shape == x.shape and dx.dtype == x.dtype, name
        assert np.abs(dx).max() > 1e-3, f"d{name} is ~0: a comparison that cannot fail"
        err = gradcheck.rel_error(dx, gradcheck.numerical_gradient(f, x))
        assert err <= 1e-7, f"d{name}: rel_error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_usage0_and_gamma_have_zero_gradient_away_from_ties(backend):
    """usage reaches the reads only through the least-used selection: away from a switch
    the finite differences w.r.t. usage0 and gamma are exactly 0 (what the backward, which
    returns no gradient for them, assumes)."""
    keys, alpha, memory0, read0, usage0, c = data((4, 2, 2, 6, 3), np.float64, seed=2)
    w_u = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)[3]
    assert selection_margin(usage0, w_u, 2) > MARGIN
    f = lambda: probe(backend, keys, alpha, memory0, read0, usage0, c)   # noqa: E731
    assert np.all(gradcheck.numerical_gradient(f, usage0) == 0)
    fg = lambda g: probe(backend, keys, alpha, memory0, read0, usage0, c, gamma=g)  # noqa
    assert fg(GAMMA + 1e-6) == fg(GAMMA - 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_switch_is_a_jump(backend):
    """The other side of the convention: two slots tied in usage0 within 1e-9, and a step
    of 1e-6 across the tie moves the zeroed slot, so the reads jump and the finite
    difference explodes; the margin check above is what keeps the gradient tests honest."""
    keys, alpha, memory0, read0, usage0, c = data((2, 1, 1, 5, 3), np.float64, seed=3)
    usage0[0] = [0.5, 0.5 + 1e-9, 0.8, 0.9, 1.0]
    w_u = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)[3]
    assert selection_margin(usage0, w_u, 1) < 1e-8
    f = lambda: probe(backend, keys, alpha, memory0, read0, usage0, c)   # noqa: E731
    num = gradcheck.numerical_gradient(f, usage0)
    assert np.abs(num).max() > 1e3


# ---------------------------------------------------------------- identities, closed forms
@pytest.mark.parametrize("backend", BACKENDS)
def test_homogeneity_identity(backend):
    """Scaling keys and memory0 by s > 0 leaves every weight unchanged (cosines, gates) and
    scales every M_t, hence the reads, by s: Euler's theorem gives
    sum(keys dkeys) + sum(memory0 dmemory0) = sum(c reads)."""
    keys, alpha, memory0, read0, usage0, c = data((6, 3, 2, 9, 4), np.float64, seed=4)
    reads = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)[0]
    dk, _, dm, _ = K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA,
                                   backend=backend)
    lhs = float((keys * dk).sum() + (memory0 * dm).sum())
    rhs = float((c * reads).sum())
    assert abs(lhs - rhs) <= 1e-12 * (np.abs(keys * dk).sum() + np.abs(memory0 * dm).sum())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_step_closed_form(backend, dtype):
    """S = 3, H = 1, W = 1, usage0 = (0, 1, 2), M_0 = (5, 0, 0): w_lu_0 = (1, 0, 0) and
    slot 0 (the 5) is zeroed, so M_1 = w_w k with w_w = g w_r_0 + (1 - g) e_0 summing to 1;
    every row is a positive multiple of k, so each cosine is 1, w_r = 1/3 and r = k/3."""
    k = 1.7
    a = 0.4
    g = 1 / (1 + np.exp(-a))
    wr0 = np.array([0.2, 0.3, 0.5])
    keys = np.full((1, 1, 1, 1), k, dtype)
    alpha = np.full(1, a, dtype)
    memory0 = np.array([[[5.0], [0.0], [0.0]]], dtype)     # slot 0 holds 5, then is zeroed
    read0 = wr0[None, None].astype(dtype)
    usage0 = np.array([[0.0, 1.0, 2.0]], dtype)
    reads, w_r, w_w, w_u, w_lu, memory = K.lrua_forward(keys, alpha, memory0, read0, usage0,
                                                        0.5, backend=backend)
    ww = g * wr0 + (1 - g) * np.array([1.0, 0.0, 0.0])
    tol = 8 * np.finfo(dtype).eps
    np.testing.assert_allclose(w_w[0, 0, 0], ww, rtol=tol)
    np.testing.assert_allclose(memory[0, :, 0], ww * k, rtol=tol)
    np.testing.assert_allclose(w_r[0, 0, 0], [1 / 3] * 3, rtol=tol)
    np.testing.assert_allclose(reads[0, 0, 0, 0], k / 3, rtol=tol)
    np.testing.assert_allclose(w_u[0, 0], 0.5 * np.array([0, 1, 2]) + 1 / 3 + ww, rtol=tol)
    np.testing.assert_array_equal(w_lu[0, 0], (w_u[0, 0] <= w_u[0, 0].min()).astype(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_mark_every_slot_at_the_threshold(backend):
    """usage0 = 0 everywhere (the usual start): every slot is at or below the n-th smallest,
    so the first write spreads (1 - g) over all slots, and slot 0 (the first argmin) is
    the one zeroed."""
    T, B, H, S, W = 1, 1, 2, 4, 3
    keys, alpha, memory0, read0, _, _ = data((T, B, H, S, W), np.float64, seed=5)
    usage0 = np.zeros((B, S))
    _, _, w_w, _, _, memory = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA,
                                             backend=backend)
    g = 1 / (1 + np.exp(-alpha))
    np.testing.assert_allclose(w_w[0, 0], g[:, None] * read0[0] + (1 - g)[:, None],
                               rtol=1e-15)
    want = memory0[0].copy()
    want[0] = 0
    want += w_w[0, 0].T @ keys[0, 0]
    np.testing.assert_allclose(memory[0], want, rtol=1e-14, atol=1e-15)


# ---------------------------------------------------------------- numba vs reference
SHAPES = [  # (T, B, H, S, W), seed
    ((7, 3, 2, 11, 5), 6),
    ((1, 1, 1, 3, 1), 3),   # one step, one episode, one head, 3 slots, W = 1 (see below)
    ((6, 1, 3, 3, 2), 6),   # S = H: every slot is least used
    ((13, 2, 1, 5, 17), 6),
    ((4, 5, 4, 31, 1), 6),
]


@needs_numba
@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, seed", SHAPES)
def test_numba_matches_reference(shape, seed, dtype, per_step):
    """The bound is relative to max|ref| per array, so no reference array may vanish by
    symmetry (with W = 1 and every row on the key's side, w_r is uniform and dalpha = 0
    up to rounding): the seeds avoid that and the test asserts it."""
    T, B, H, S, W = shape
    keys, alpha, memory0, read0, usage0, c = data(shape, dtype, seed=seed, per_step=per_step)
    as64 = [x.astype(np.float64) for x in (keys, alpha, memory0, read0, usage0, c)]
    ref = K.lrua_forward(*as64[:5], GAMMA, backend="reference")
    # the selection must be far from a switch at this dtype's precision, or the backends
    # may legitimately choose different slots
    assert selection_margin(as64[4], ref[3], H) > 1e-4
    got = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend="numba")
    bound = 4 * T * (S + W + H)
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got, ref):
        assert a.dtype == dtype, name
        if name == "w_lu":
            np.testing.assert_array_equal(a, r)
        else:
            assert_close(name, a, r, dtype, bound)
    got = K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA, backend="numba")
    ref = K.lrua_backward(as64[5], *as64[:5], GAMMA, backend="reference")
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"), got, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert np.abs(r).max() > 1e-3, f"reference {name} is ~0: no scale to compare at"
        assert_close(name, a, r, dtype, bound)


@needs_numba
def test_noncontiguous_inputs():
    keys, alpha, memory0, read0, usage0, c = data((4, 3, 2, 6, 5), np.float64, seed=7)
    nc = [np.asfortranarray(x) for x in (keys, memory0, read0, usage0, c)]
    assert not any(x.flags.c_contiguous for x in nc)
    k2, m2, r2, u2, c2 = nc
    for a, b in zip(K.lrua_forward(k2, alpha, m2, r2, u2, GAMMA, backend="numba"),
                    K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA,
                                   backend="numba")):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(K.lrua_backward(c2, k2, alpha, m2, r2, u2, GAMMA, backend="numba"),
                    K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA,
                                    backend="numba")):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_returns_input_dtype_and_fresh_arrays(backend):
    args = data((3, 2, 2, 5, 4), np.float32, seed=8)
    keys, alpha, memory0, read0, usage0, c = args
    before = [x.copy() for x in args]
    out = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)
    grads = K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)
    for x in out + grads:
        assert x.dtype == np.float32
        assert not any(np.shares_memory(x, y) for y in args)
    for x, y in zip(args, before):
        np.testing.assert_array_equal(x, y)            # inputs untouched


@needs_numba
def test_auto_is_numba_when_installed():
    assert K._backend("test", "auto") is K._backend("test", "numba")


# ---------------------------------------------------------------- bad input
def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc) as info:
        fn(*args, **kw)
    msg = str(info.value)
    for part in match:
        assert part in msg, f"{part!r} not in error message {msg!r}"


def test_bad_inputs_name_the_problem():
    keys, alpha, memory0, read0, usage0, c = data((3, 2, 2, 5, 4), np.float64, seed=9)
    F, Bk = K.lrua_forward, K.lrua_backward
    _raises(ValueError, ["lrua_forward", "keys", "4 dimensions", "(2, 2, 4)"],
            F, keys[0], alpha, memory0, read0, usage0, GAMMA)
    _raises(ValueError, ["lrua_forward", "memory0", "(2, *, 4)", "(2, 5, 3)"],
            F, keys, alpha, memory0[..., :3], read0, usage0, GAMMA)
    _raises(ValueError, ["lrua_forward", "memory0", "S = 1", "H = 2"],
            F, keys, alpha, memory0[:, :1], read0[..., :1], usage0[:, :1], GAMMA)
    _raises(ValueError, ["lrua_forward", "alpha", "(2,)", "(3, 2, 2)", "(3,)"],
            F, keys, np.zeros(3), memory0, read0, usage0, GAMMA)
    _raises(ValueError, ["lrua_forward", "read0", "(2, 2, 5)", "(2, 5, 2)"],
            F, keys, alpha, memory0, read0.transpose(0, 2, 1).copy(), usage0, GAMMA)
    _raises(ValueError, ["lrua_forward", "usage0", "(2, 5)", "(5,)"],
            F, keys, alpha, memory0, read0, usage0[0], GAMMA)
    _raises(TypeError, ["lrua_forward", "memory0", "float32", "float64"],
            F, keys, alpha, memory0.astype(np.float32), read0, usage0, GAMMA)
    _raises(TypeError, ["lrua_forward", "keys", "int64"],
            F, keys.astype(np.int64), alpha, memory0, read0, usage0, GAMMA)
    _raises(TypeError, ["lrua_forward", "alpha", "numpy.ndarray", "float"],
            F, keys, 0.5, memory0, read0, usage0, GAMMA)
    _raises(ValueError, ["lrua_forward", "gamma", "[0, 1]", "1.5"],
            F, keys, alpha, memory0, read0, usage0, 1.5)
    _raises(ValueError, ["lrua_forward", "gamma", "[0, 1]", "-0.1"],
            F, keys, alpha, memory0, read0, usage0, -0.1)
    _raises(ValueError, ["lrua_forward", "gamma", "nan"],
            F, keys, alpha, memory0, read0, usage0, float("nan"))
    _raises(TypeError, ["lrua_forward", "gamma", "real number", "str"],
            F, keys, alpha, memory0, read0, usage0, "0.9")
    bad = keys.copy()
    bad[1, 0, 1, 2] = np.inf
    _raises(ValueError, ["lrua_forward", "keys", "1 non-finite"],
            F, bad, alpha, memory0, read0, usage0, GAMMA)
    bad = usage0.copy()
    bad[0, 0] = np.nan
    _raises(ValueError, ["lrua_backward", "usage0", "1 non-finite"],
            Bk, c, keys, alpha, memory0, read0, bad, GAMMA)
    _raises(ValueError, ["lrua_backward", "dreads", "(3, 2, 2, 4)", "(3, 2, 2, 3)"],
            Bk, c[..., :3], keys, alpha, memory0, read0, usage0, GAMMA)
    _raises(ValueError, ["lrua_forward", "at least one step"],
            F, keys[:0], alpha, memory0, read0, usage0, GAMMA)
    _raises(ValueError, ["lrua_forward", "unknown backend", "'cuda'"],
            F, keys, alpha, memory0, read0, usage0, GAMMA, backend="cuda")


# ---------------------------------------------------------------- the step pair
def step_data(shape, dtype, seed, per_episode=False):
    """shape (B, H, S, W) -> key, alpha, memory_prev, w_r_prev, w_u_prev and the probe
    weights c_r (B, H, W), c_m (B, S, W), c_w (B, H, S) on read, memory and w_r."""
    B, H, S, W = shape
    keys, alpha, memory0, read0, usage0, _ = data((1, B, H, S, W), np.float64, seed,
                                                  per_step=per_episode)
    rng = np.random.default_rng(seed + 100)
    out = [keys[0], alpha[0] if per_episode else alpha, memory0, read0, usage0,
           rng.standard_normal((B, H, W)), rng.standard_normal((B, S, W)),
           rng.standard_normal((B, H, S))]
    return [x.astype(dtype) for x in out]


def step_probe(backend, key, alpha, memory_prev, w_r_prev, w_u_prev, c_r, c_m, c_w):
    """sum(c_r read) + sum(c_m memory) + sum(c_w w_r): every output that flows onward."""
    read, memory, w_r, _, _ = K.lrua_step_forward(key, alpha, memory_prev, w_r_prev,
                                                  w_u_prev, GAMMA, backend=backend)
    return float((c_r * read).sum() + (c_m * memory).sum() + (c_w * w_r).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_episode", [False, True])
@pytest.mark.parametrize("shape, seed", [((2, 2, 7, 3), 1), ((1, 3, 4, 2), 2),
                                         ((3, 1, 3, 1), 3)])
def test_step_backward_matches_finite_differences(shape, seed, per_episode, backend):
    key, alpha, mp, wrp, wup, c_r, c_m, c_w = step_data(shape, np.float64, seed, per_episode)
    assert selection_margin(wup, wup[None], shape[1]) > MARGIN
    grads = K.lrua_step_backward(c_r, c_m, c_w, key, alpha, mp, wrp, wup, GAMMA,
                                 backend=backend)

    def f():
        return step_probe(backend, key, alpha, mp, wrp, wup, c_r, c_m, c_w)

    for name, x, dx in zip(("key", "alpha", "memory_prev", "w_r_prev"),
                           (key, alpha, mp, wrp), grads):
        assert dx.shape == x.shape and dx.dtype == x.dtype, name
        assert np.abs(dx).max() > 1e-3, f"d{name} is ~0: a comparison that cannot fail"
        err = gradcheck.rel_error(dx, gradcheck.numerical_gradient(f, x))
        assert err <= 1e-7, f"d{name}: rel_error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_step", [False, True])
def test_chained_steps_equal_the_whole_episode(backend, per_step):
    """T step calls, feeding M_t, w_r_t and w_u_t forward, then T reverse calls, feeding
    dL/dM and dL/dw_r back, give lrua_forward's and lrua_backward's results. The same
    scalar code runs in both paths and the sums run in the same order, so the results agree
    to rounding only (bound: 64 eps relative)."""
    T, B, H, S, W = 6, 3, 2, 9, 4
    keys, alpha, memory0, read0, usage0, c = data((T, B, H, S, W), np.float64, seed=10,
                                                  per_step=per_step)
    ref = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)
    assert selection_margin(usage0, ref[3], H) > MARGIN
    at = (lambda t: alpha[t]) if per_step else (lambda t: alpha)          # noqa: E731
    M, wr, wu = memory0, read0, usage0
    states, reads, w_rs, w_ws, w_us = [], [], [], [], []
    for t in range(T):
        states.append((M, wr, wu))
        r, M, wr, ww, wu = K.lrua_step_forward(keys[t], at(t), M, wr, wu, GAMMA,
                                               backend=backend)
        reads.append(r), w_rs.append(wr), w_ws.append(ww), w_us.append(wu)
    tol = 64 * np.finfo(np.float64).eps
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "memory"),
                          (np.stack(reads), np.stack(w_rs), np.stack(w_ws), np.stack(w_us),
                           M), (ref[0], ref[1], ref[2], ref[3], ref[5])):
        assert gradcheck.rel_error(a, r) <= tol, name
    dk_ref, da_ref, dm_ref, dr_ref = K.lrua_backward(c, keys, alpha, memory0, read0, usage0,
                                                     GAMMA, backend=backend)
    dM, dwr = np.zeros_like(memory0), np.zeros_like(read0)
    dks, das = [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        Mp, wrp, wup = states[t]
        dks[t], das[t], dM, dwr = K.lrua_step_backward(c[t], dM, dwr, keys[t], at(t), Mp,
                                                       wrp, wup, GAMMA, backend=backend)
    da = np.stack(das) if per_step else np.sum(das, axis=0)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"),
                          (np.stack(dks), da, dM, dwr), (dk_ref, da_ref, dm_ref, dr_ref)):
        assert np.abs(r).max() > 1e-3, name
        assert gradcheck.rel_error(a, r) <= tol, f"{name}: {gradcheck.rel_error(a, r):.3g}"


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_episode", [False, True])
@pytest.mark.parametrize("shape, seed", [((3, 2, 11, 5), 6), ((1, 1, 3, 1), 3),
                                         ((2, 3, 3, 2), 6), ((5, 4, 31, 17), 6)])
def test_numba_step_matches_reference(shape, seed, per_episode, dtype):
    B, H, S, W = shape
    args = step_data(shape, dtype, seed, per_episode)
    as64 = [x.astype(np.float64) for x in args]
    assert selection_margin(as64[4], as64[4][None], H) > 1e-4
    bound = 4 * (S + W + H)
    got = K.lrua_step_forward(*args[:5], GAMMA, backend="numba")
    ref = K.lrua_step_forward(*as64[:5], GAMMA, backend="reference")
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"), got, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert_close(name, a, r, dtype, bound)
    got = K.lrua_step_backward(*args[5:], *args[:5], GAMMA, backend="numba")
    ref = K.lrua_step_backward(*as64[5:], *as64[:5], GAMMA, backend="reference")
    for name, a, r in zip(("dkey", "dalpha", "dmemory_prev", "dw_r_prev"), got, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert np.abs(r).max() > 1e-3, f"reference {name} is ~0: no scale to compare at"
        assert_close(name, a, r, dtype, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_returns_fresh_arrays_and_leaves_inputs(backend):
    args = step_data((2, 2, 5, 4), np.float32, seed=8)
    before = [x.copy() for x in args]
    out = K.lrua_step_forward(*args[:5], GAMMA, backend=backend)
    grads = K.lrua_step_backward(*args[5:], *args[:5], GAMMA, backend=backend)
    for x in out + grads:
        assert x.dtype == np.float32
        assert not any(np.shares_memory(x, y) for y in args)
    for x, y in zip(args, before):
        np.testing.assert_array_equal(x, y)


def test_step_bad_inputs_name_the_problem():
    key, alpha, mp, wrp, wup, c_r, c_m, c_w = step_data((2, 2, 5, 4), np.float64, seed=9)
    F, Bk = K.lrua_step_forward, K.lrua_step_backward
    _raises(ValueError, ["lrua_step_forward", "key", "3 dimensions"],
            F, key[0], alpha, mp, wrp, wup, GAMMA)
    _raises(ValueError, ["lrua_step_forward", "alpha", "(2,)", "(2, 2)", "(3,)"],
            F, key, np.zeros(3), mp, wrp, wup, GAMMA)
    _raises(ValueError, ["lrua_step_forward", "memory_prev", "S = 1", "H = 2"],
            F, key, alpha, mp[:, :1], wrp[..., :1], wup[:, :1], GAMMA)
    _raises(ValueError, ["lrua_step_forward", "w_r_prev", "(2, 2, 5)"],
            F, key, alpha, mp, wrp[:, :1], wup, GAMMA)
    _raises(TypeError, ["lrua_step_forward", "w_u_prev", "float32", "float64"],
            F, key, alpha, mp, wrp, wup.astype(np.float32), GAMMA)
    _raises(ValueError, ["lrua_step_forward", "gamma", "[0, 1]"],
            F, key, alpha, mp, wrp, wup, 2.0)
    _raises(ValueError, ["lrua_step_backward", "dmemory", "(2, 5, 4)"],
            Bk, c_r, c_m[:, :3], c_w, key, alpha, mp, wrp, wup, GAMMA)
    _raises(ValueError, ["lrua_step_backward", "dw_r", "(2, 2, 5)"],
            Bk, c_r, c_m, c_w[..., :2], key, alpha, mp, wrp, wup, GAMMA)
    _raises(ValueError, ["lrua_step_backward", "dread", "(2, 2, 4)"],
            Bk, c_r[..., :1], c_m, c_w, key, alpha, mp, wrp, wup, GAMMA)


def test_step_ops_skip_a_backend_without_the_step_pair(monkeypatch):
    """A backend implementing only the whole-episode pair: 'auto' passes over it for the
    step ops, and naming it says what it lacks."""
    import types
    fake = types.SimpleNamespace(lrua_forward=None, lrua_backward=None)
    real = K._backend
    monkeypatch.setattr(K, "_backend",
                        lambda op, name: fake if name == "fake" else real(op, name))
    monkeypatch.setattr(K, "AUTO_ORDER", ("fake", "reference"))
    args = step_data((2, 2, 5, 4), np.float64, seed=11)
    want = K.lrua_step_forward(*args[:5], GAMMA, backend="reference")
    for a, b in zip(K.lrua_step_forward(*args[:5], GAMMA), want):
        np.testing.assert_array_equal(a, b)
    _raises(NotImplementedError, ["lrua_step_backward", "'fake'", "whole-episode"],
            K.lrua_step_backward, *args[5:], *args[:5], GAMMA, backend="fake")


def test_works_without_numba():
    """With numba blocked, the module imports, auto falls back to the reference, and asking
    for numba says what is missing."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import numpy as np\n"
        "import metacore.kernels.lrua as K\n"
        "assert K.available_backends() == ['reference'], K.available_backends()\n"
        "keys = np.ones((2, 1, 1, 3)); a = np.zeros(1); m = np.zeros((1, 3, 3))\n"
        "r0 = np.full((1, 1, 3), 1 / 3); u0 = np.arange(3.0)[None]\n"
        "reads = K.lrua_forward(keys, a, m, r0, u0, 0.9)[0]\n"
        "assert reads.shape == (2, 1, 1, 3) and np.isfinite(reads).all()\n"
        "try:\n"
        "    K.lrua_forward(keys, a, m, r0, u0, 0.9, backend='numba')\n"
        "except ImportError as err:\n"
        "    print('ERR', err)\n"
        "else:\n"
        "    raise SystemExit('numba backend did not fail')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR lrua_forward: backend 'numba' needs the package 'numba'" in res.stdout
    assert "backend='reference'" in res.stdout


# ---------------------------------------------------------------- the tape pair
def tape_grads(backend, c, keys, alpha, memory0, read0, usage0, gamma=GAMMA):
    """lrua_forward_tape then lrua_backward_tape -> (forward outputs, gradients)."""
    *out, tape = K.lrua_forward_tape(keys, alpha, memory0, read0, usage0, gamma,
                                     backend=backend)
    assert isinstance(tape, K.LruaTape) and tape.backend == backend
    return out, K.lrua_backward_tape(c, tape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("shape, seed", [((5, 2, 2, 7, 3), 1), ((3, 1, 3, 4, 2), 1),
                                         ((1, 1, 1, 3, 1), 3)])
def test_tape_backward_matches_finite_differences(shape, seed, per_step, backend):
    keys, alpha, memory0, read0, usage0, c = data(shape, np.float64, seed=seed,
                                                  per_step=per_step)
    out, grads = tape_grads(backend, c, keys, alpha, memory0, read0, usage0)
    assert selection_margin(usage0, out[3], shape[2]) > MARGIN

    def f():
        return probe(backend, keys, alpha, memory0, read0, usage0, c)

    for name, x, dx in zip(("keys", "alpha", "memory0", "read0"),
                           (keys, alpha, memory0, read0), grads):
        assert dx.shape == x.shape and dx.dtype == x.dtype, name
        assert np.abs(dx).max() > 1e-3, f"d{name} is ~0: a comparison that cannot fail"
        err = gradcheck.rel_error(dx, gradcheck.numerical_gradient(f, x))
        assert err <= 1e-7, f"d{name}: rel_error {err:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("per_step", [False, True])
def test_tape_pair_equals_the_recomputing_pair(backend, dtype, per_step):
    """Same kernels, same order of operations: the tape pair gives lrua_forward's and
    lrua_backward's results bit for bit on one backend."""
    keys, alpha, memory0, read0, usage0, c = data((7, 3, 2, 11, 5), dtype, seed=6,
                                                  per_step=per_step)
    out, grads = tape_grads(backend, c, keys, alpha, memory0, read0, usage0)
    want = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)
    for a, b in zip(out, want):
        assert a.dtype == dtype
        np.testing.assert_array_equal(a, b)
    want = K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)
    for a, b in zip(grads, want):
        assert a.dtype == dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@needs_numba
@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, seed", SHAPES)
def test_numba_tape_matches_reference(shape, seed, dtype, per_step):
    """The numba tape pair against the float64 reference, with test_numba_matches_reference's
    bounds."""
    T, B, H, S, W = shape
    keys, alpha, memory0, read0, usage0, c = data(shape, dtype, seed=seed, per_step=per_step)
    as64 = [x.astype(np.float64) for x in (keys, alpha, memory0, read0, usage0, c)]
    ref_out, ref = tape_grads("reference", as64[5], *as64[:5])
    assert selection_margin(as64[4], ref_out[3], H) > 1e-4
    out, grads = tape_grads("numba", c, keys, alpha, memory0, read0, usage0)
    bound = 4 * T * (S + W + H)
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), out, ref_out):
        assert a.dtype == dtype, name
        if name == "w_lu":
            np.testing.assert_array_equal(a, r)
        else:
            assert_close(name, a, r, dtype, bound)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"), grads, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        assert np.abs(r).max() > 1e-3, f"reference {name} is ~0: no scale to compare at"
        assert_close(name, a, r, dtype, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tape_keeps_copies_and_can_be_used_again(backend):
    """Overwriting the inputs and the returned arrays after the forward changes nothing; the
    backward leaves the tape as it was (a second call, for another dreads, is exact), and
    every result is a fresh array."""
    args = data((4, 2, 3, 6, 5), np.float32, seed=12)
    keys, alpha, memory0, read0, usage0, c = args
    want = K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA, backend=backend)
    want2 = K.lrua_backward(2 * c, keys, alpha, memory0, read0, usage0, GAMMA,
                            backend=backend)
    ins = [x.copy() for x in (keys, alpha, memory0, read0, usage0)]
    *out, tape = K.lrua_forward_tape(*ins, GAMMA, backend=backend)
    for x in ins + out:
        x[...] = np.nan
    grads = K.lrua_backward_tape(c, tape)
    grads2 = K.lrua_backward_tape(2 * c, tape)
    for a, b in zip(grads + grads2, want + want2):
        np.testing.assert_array_equal(a, b)
    for x in grads:
        assert not any(np.shares_memory(x, y) for y in grads2 + (c,))


def test_tape_bad_inputs_name_the_problem(monkeypatch):
    keys, alpha, memory0, read0, usage0, c = data((3, 2, 2, 5, 4), np.float64, seed=9)
    F, Bk = K.lrua_forward_tape, K.lrua_backward_tape
    _raises(ValueError, ["lrua_forward_tape", "memory0", "(2, *, 4)", "(2, 5, 3)"],
            F, keys, alpha, memory0[..., :3], read0, usage0, GAMMA)
    _raises(ValueError, ["lrua_forward_tape", "gamma", "[0, 1]"],
            F, keys, alpha, memory0, read0, usage0, 1.5)
    tape = F(keys, alpha, memory0, read0, usage0, GAMMA, backend="reference")[-1]
    _raises(TypeError, ["lrua_backward_tape", "LruaTape", "dict"], Bk, c, {"shape": 1})
    _raises(ValueError, ["lrua_backward_tape", "dreads", "(3, 2, 2, 4)", "(3, 2, 2, 3)"],
            Bk, c[..., :3], tape)
    _raises(TypeError, ["lrua_backward_tape", "dreads", "float32", "float64"],
            Bk, c.astype(np.float32), tape)
    bad = c.copy()
    bad[0, 0, 0, 0] = np.nan
    _raises(ValueError, ["lrua_backward_tape", "dreads", "1 non-finite"], Bk, bad, tape)
    # a backend with only the whole-episode pair: 'auto' passes over it, naming it fails
    import types
    fake = types.SimpleNamespace(lrua_forward=None, lrua_backward=None)
    real = K._backend
    monkeypatch.setattr(K, "_backend",
                        lambda op, name, *a: fake if name == "fake" else real(op, name, *a))
    monkeypatch.setattr(K, "AUTO_ORDER", ("fake", "reference"))
    assert F(keys, alpha, memory0, read0, usage0, GAMMA)[-1].backend == "reference"
    _raises(NotImplementedError, ["lrua_forward_tape", "'fake'", "lrua_backward"],
            F, keys, alpha, memory0, read0, usage0, GAMMA, backend="fake")


@pytest.mark.parametrize("backend", BACKENDS)
def test_live_tapes_do_not_share_buffers(backend):
    """The numba backend reuses a dead tape's buffers for the next forward of the same
    shape: tapes alive at the same time (and one made after another died) each keep their
    own episode."""
    eps = [data((4, 2, 2, 6, 3), np.float64, seed=s) for s in (13, 14, 15)]
    want = [K.lrua_backward(e[5], *e[:5], GAMMA, backend=backend) for e in eps]
    t0 = K.lrua_forward_tape(*eps[0][:5], GAMMA, backend=backend)[-1]
    t1 = K.lrua_forward_tape(*eps[1][:5], GAMMA, backend=backend)[-1]
    del t0                                                 # its buffers are now spare
    t2 = K.lrua_forward_tape(*eps[2][:5], GAMMA, backend=backend)[-1]
    for tape, e, w in ((t1, eps[1], want[1]), (t2, eps[2], want[2])):
        for a, b in zip(K.lrua_backward_tape(e[5], tape), w):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- write rules, add vector
def per_head_margin(usage0, w_u, H):
    """Smallest gap between consecutive sorted usages at positions 0..H (each head's own
    slot under "per_head" switches when any of them swaps) over every selecting usage."""
    us = np.concatenate([usage0[None], w_u], axis=0).astype(np.float64)  # (T + 1, B, S)
    s = np.sort(us, axis=-1)
    top = min(H, s.shape[-1] - 1)
    return float(np.diff(s[..., :top + 1], axis=-1).min()) if top > 0 else np.inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("write_rule, with_adds", [("per_head", False), ("per_head", True),
                                                   ("shared", True)])
def test_write_rule_and_add_vector_match_finite_differences(backend, write_rule, with_adds):
    """Whole episode, the tape pair and the chained step pair under each setting: every
    gradient (dadds too) against float64 central differences, rel_error <= 1e-7."""
    shape = (5, 2, 3, 7, 3)
    keys, alpha, memory0, read0, usage0, c = data(shape, np.float64, seed=5, per_step=True)
    adds = np.random.default_rng(6).standard_normal(keys.shape) if with_adds else None
    kw = dict(backend=backend, write_rule=write_rule, adds=adds)
    out = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, **kw)
    margin = per_head_margin if write_rule == "per_head" else selection_margin
    assert margin(usage0, out[3], shape[2]) > MARGIN
    grads = K.lrua_backward(c, keys, alpha, memory0, read0, usage0, GAMMA, **kw)
    assert len(grads) == (5 if with_adds else 4)
    *_, tape = K.lrua_forward_tape(keys, alpha, memory0, read0, usage0, GAMMA, **kw)
    for a, b in zip(K.lrua_backward_tape(c, tape), grads):
        np.testing.assert_array_equal(a, b)

    def f():
        reads = K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, **kw)[0]
        return float((reads * c).sum())

    names = ("keys", "alpha", "memory0", "read0") + (("adds",) if with_adds else ())
    xs = (keys, alpha, memory0, read0) + ((adds,) if with_adds else ())
    for name, x, dx in zip(names, xs, grads):
        assert dx.shape == x.shape, name
        assert np.abs(dx).max() > 1e-3, f"d{name} is ~0: a comparison that cannot fail"
        err = gradcheck.rel_error(dx, gradcheck.numerical_gradient(f, x))
        assert err <= 1e-7, f"d{name}: rel_error {err:.3g}"
    # the step pair chained over the episode gives the same reads and gradients
    M, wr, wu = memory0, read0, usage0
    saved = []
    for t in range(shape[0]):
        a_t = None if adds is None else adds[t]
        saved.append((M, wr, wu))
        r, M, wr, _, wu = K.lrua_step_forward(keys[t], alpha[t], M, wr, wu, GAMMA,
                                              backend=backend, write_rule=write_rule,
                                              add=a_t)
        np.testing.assert_allclose(r, out[0][t], rtol=1e-12, atol=1e-14)
    dM, dwr = np.zeros_like(memory0), np.zeros_like(read0)
    for t in range(shape[0] - 1, -1, -1):
        a_t = None if adds is None else adds[t]
        res = K.lrua_step_backward(c[t], dM, dwr, keys[t], alpha[t], *saved[t], GAMMA,
                                   backend=backend, write_rule=write_rule, add=a_t)
        dk, da, dM, dwr = res[:4]
        np.testing.assert_allclose(dk, grads[0][t], rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(da, grads[1][t], rtol=1e-11, atol=1e-13)
        if with_adds:
            np.testing.assert_allclose(res[4], grads[4][t], rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(dM, grads[2], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_head_rule_closed_form_and_ties(backend):
    """One step, gates forced to 0 (alpha = -50: w_w = w_lu): under "per_head" head h's
    write weights are one-hot at the h-th slot of the (usage, index) order, a three-way tie
    at the minimum going to the lower indices 1, 2, 4; under "shared" every head's row marks
    the n = 3 least-used slots (the same three here); the zeroed slot is 1 under both."""
    keys, alpha, memory0, read0, _, _ = data((1, 1, 3, 6, 2), np.float64, seed=7)
    usage0 = np.array([[0.5, 0.2, 0.2, 0.9, 0.2, 0.7]])
    alpha = np.full(3, -50.0)
    per = K.lrua_forward(keys, alpha, memory0, read0, usage0, 1.0, backend=backend,
                         write_rule="per_head")
    np.testing.assert_allclose(per[2][0, 0], np.eye(6)[[1, 2, 4]], atol=1e-20)
    shared = K.lrua_forward(keys, alpha, memory0, read0, usage0, 1.0, backend=backend,
                            write_rule="shared")
    np.testing.assert_allclose(shared[2][0, 0], np.tile([0, 1, 1, 0, 1, 0], (3, 1)),
                               atol=1e-20)
    # M_1 = M_0 with slot 1 zeroed, plus each head's key in its own slot (per_head) or the
    # sum of the keys in all three (shared)
    M = memory0[0].copy()
    M[1] = 0
    Mp, Ms = M.copy(), M.copy()
    for h, i in enumerate((1, 2, 4)):
        Mp[i] += keys[0, 0, h]
        Ms[[1, 2, 4]] += keys[0, 0, h]
    np.testing.assert_allclose(per[5][0], Mp, rtol=1e-14, atol=1e-14)
    np.testing.assert_allclose(shared[5][0], Ms, rtol=1e-14, atol=1e-14)
    # the returned w_lu: the union over heads (usage now differs per slot)
    np.testing.assert_array_equal(per[4].sum(axis=-1), [[3.0]])


@needs_numba
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_matches_reference_per_head_and_add_vector(dtype):
    """Numba against the float64 reference under write_rule='per_head' with an add vector,
    whole episode (forward, backward, tape) and step pair; ties in usage0 included."""
    shape = (4, 3, 3, 9, 5)
    T, B, H, S, W = shape
    keys, alpha, memory0, read0, usage0, c = data(shape, dtype, seed=9, per_step=False)
    usage0[1, :4] = usage0[1, 4]                  # a five-way tie in episode 1
    adds = np.random.default_rng(10).standard_normal(keys.shape).astype(dtype)
    args = (keys, alpha, memory0, read0, usage0)
    a64 = [x.astype(np.float64) for x in args]
    kw = dict(write_rule="per_head")
    bound = 4 * T * (S + W + H)
    got = K.lrua_forward(*args, GAMMA, backend="numba", adds=adds, **kw)
    ref = K.lrua_forward(*a64, GAMMA, backend="reference", adds=adds.astype(np.float64), **kw)
    np.testing.assert_array_equal(got[4], ref[4])
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got, ref):
        assert_close(name, a, r, dtype, bound)
    got = K.lrua_backward(c, *args, GAMMA, backend="numba", adds=adds, **kw)
    ref = K.lrua_backward(c.astype(np.float64), *a64, GAMMA, backend="reference",
                          adds=adds.astype(np.float64), **kw)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0", "dadds"), got, ref):
        assert a.dtype == dtype
        assert_close(name, a, r, dtype, bound)
    s_args = (keys[0], alpha, memory0, read0, usage0)
    s64 = [x.astype(np.float64) for x in s_args]
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"),
                          K.lrua_step_forward(*s_args, GAMMA, backend="numba", add=adds[0],
                                              **kw),
                          K.lrua_step_forward(*s64, GAMMA, backend="reference",
                                              add=adds[0].astype(np.float64), **kw)):
        assert_close(name, a, r, dtype, bound)


def test_settings_bad_input():
    keys, alpha, memory0, read0, usage0, _ = data((2, 1, 2, 4, 3), np.float64, seed=11)
    with pytest.raises(ValueError, match=r"lrua_forward: write_rule must be one of "
                                         r"\('shared', 'per_head'\), got 'lru'"):
        K.lrua_forward(keys, alpha, memory0, read0, usage0, GAMMA, write_rule="lru")
    with pytest.raises(ValueError, match=r"lrua_backward: adds must have shape \(2, 1, 2, 3\)"):
        K.lrua_backward(keys, keys, alpha, memory0, read0, usage0, GAMMA, adds=keys[:, :, :1])
    with pytest.raises(TypeError, match="lrua_step_forward: add has dtype float32"):
        K.lrua_step_forward(keys[0], alpha, memory0, read0, usage0, GAMMA,
                            add=keys[0].astype(np.float32))
