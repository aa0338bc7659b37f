"""Every Numba CUDA kernel run by the CUDA simulator against reference/ (odd shapes).

NOT collected by the normal suite (the name does not match test_*.py): tests/test_cuda_sim.py
runs this file in a fresh `python -m pytest` subprocess with NUMBA_ENABLE_CUDASIM=1, because
Numba reads that variable once, when numba is first imported, and the main test session has
long imported numba (and numba.cuda) by then. Running it by hand:
    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/cuda_sim_cases.py -q

Under the simulator the distance tiles are 4 x 4 and the LRUA blocks 8 threads (see the
kernel modules), so these small shapes cross several tile and thread-stride boundaries:
sizes not a multiple of the tile, N = 1, Q = 1, D = 1, and an empty query set. Every launch
is recorded, and the last test fails if any kernel of either module did not run in both
dtypes (a kernel added without a test here shows up there).

Tolerances (kernel a against the float64 reference r of the same inputs), as in
tests/test_distance.py and tests/test_lrua.py:
    distances: |a - r| <= mag * eps(dtype) * c, mag the sum of |terms| behind each output,
               c the rounding steps per output plus a margin;
    LRUA:      |a - r| <= eps(dtype) * 4 T (S + W + H) * max|r| per array; w_lu exactly.
"""
import os

import numpy as np
import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
    pytest.skip("run by tests/test_cuda_sim.py with NUMBA_ENABLE_CUDASIM=1",
                allow_module_level=True)

import metacore  # noqa: E402,F401  (aliases kernels/ and reference/ from a checkout)
from numba import cuda  # noqa: E402
from metacore.kernels import _dispatch  # noqa: E402
from metacore.kernels import distance_cuda as DC  # noqa: E402
from metacore.kernels import lrua_cuda as LC  # noqa: E402
from metacore.reference import distance as RD  # noqa: E402
from metacore.reference import lrua as RL  # noqa: E402
from _cuda_helpers import (assert_close, check_protonet, ddata, lassert, ldata,  # noqa: E402
                           magnitudes, steps)

OPS = ("sqeuclidean", "l1", "cosine")
DTYPES = (np.float32, np.float64)
LAUNCHED = set()            # (module name, kernel name, dtype name) of every launch


class _Recorded:
    """Stands in for a simulator kernel in the module's kernel dict: kernel[grid, block](...)
    runs it and records the launch."""

    def __init__(self, key, kernel):
        self.key, self.kernel = key, kernel

    def __getitem__(self, config):
        launch = self.kernel[config]

        def run(*args):
            LAUNCHED.add(self.key)
            return launch(*args)
        return run


for _mod in (DC, LC):
    for _dt in DTYPES:
        _ks = _mod.kernels(_dt)               # the cached dict the module launches from
        for _name in list(_ks):
            _ks[_name] = _Recorded((_mod.__name__, _name, np.dtype(_dt).name), _ks[_name])


def test_simulator_is_active():
    assert DC.TILE == 4 and LC.THREADS == 8, "the kernel modules did not see the simulator"
    assert DC.unavailable() is None and LC.unavailable() is None


# (T, Q, N, D): 5, 6, 7 cross the 4-wide tiles; size-1 axes; an empty query set
DSHAPES = [(1, 5, 6, 7), (1, 1, 1, 1), (2, 1, 5, 1), (1, 3, 1, 6), (2, 0, 3, 2)]


# ---------------------------------------------------------------- distance kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DSHAPES)
@pytest.mark.parametrize("op", OPS)
def test_distance_forward_backward(op, shape, dtype):
    """pair_fwd (+ row_norms, cos_div) and pair_grad in both orientations (+ cos_prep,
    cos_fix) against the reference."""
    q, s, g = ddata(shape, dtype, seed=11)
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    c_out, c_dq, c_ds = steps(op, shape)
    m_out, m_dq, m_ds = magnitudes(op, g, q, s)
    out = getattr(DC, "pairwise_" + op)(q, s)
    dq, ds = getattr(DC, "pairwise_" + op + "_backward")(g, q, s)
    assert out.dtype == dq.dtype == ds.dtype == dtype
    assert_close(f"{op} forward", out, getattr(RD, "pairwise_" + op)(q64, s64), m_out, dtype,
                 c_out)
    rdq, rds = getattr(RD, "pairwise_" + op + "_backward")(g64, q64, s64)
    assert_close(f"{op} dq", dq, rdq, m_dq, dtype, c_dq)
    assert_close(f"{op} ds", ds, rds, m_ds, dtype, c_ds)


def test_cosine_zero_vectors_follow_the_clamp():
    """A zero query / support has cosine 0 and the EPS-clamped gradient of the reference."""
    q, s, g = ddata((1, 3, 5, 6), np.float64, seed=12)
    q[0, 1] = 0.0
    s[0, 2] = 0.0
    out = DC.pairwise_cosine(q, s)
    dq, ds = DC.pairwise_cosine_backward(g, q, s)
    np.testing.assert_allclose(out, RD.pairwise_cosine(q, s), rtol=1e-13, atol=1e-15)
    rdq, rds = RD.pairwise_cosine_backward(g, q, s)
    np.testing.assert_allclose(dq, rdq, rtol=1e-12, atol=1e-12 * np.abs(rdq).max())
    np.testing.assert_allclose(ds, rds, rtol=1e-12, atol=1e-12 * np.abs(rds).max())


def test_l1_sign_of_zero_is_zero():
    q = np.array([[[1.0, 2.0, 3.0]]])                      # (1, 1, 3)
    s = np.array([[[1.0, 0.0, 5.0]]])                      # (1, 1, 3)
    g = np.ones((1, 1, 1))
    dq, ds = DC.pairwise_l1_backward(g, q, s)
    np.testing.assert_array_equal(dq, [[[0.0, 1.0, -1.0]]])
    np.testing.assert_array_equal(ds, [[[0.0, -1.0, 1.0]]])


# (T, Q, N, D) with Q, N >= 1
PSHAPES = [(2, 5, 6, 7), (1, 1, 1, 1), (1, 3, 1, 2)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PSHAPES)
@pytest.mark.parametrize("metric", OPS)
def test_protonet_loss(metric, shape, dtype):
    """softmax_ce and row_mean (with the distance kernels around them) against the
    reference, with an upstream gloss and a non-unit scale."""
    T, Q, N, D = shape
    q, s, _ = ddata(shape, dtype, seed=13)
    rng = np.random.default_rng(14)
    y = rng.integers(0, N, size=(T, Q))
    gloss = rng.standard_normal(T).astype(dtype)
    loss, dq, ds, pred = DC.protonet_loss(q, s, y, gloss=gloss, metric=metric, scale=0.7)
    rl, rdq, rds, rpred = RD.protonet_loss(q.astype(np.float64), s.astype(np.float64), y,
                                           gloss=gloss.astype(np.float64), metric=metric,
                                           scale=0.7)
    check_protonet((loss, dq, ds, pred), (rl, rdq, rds, rpred), q, s, gloss, 0.7, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_protonet_loss_default_gloss_is_ones(dtype):
    """gloss=None fills the ones on the device (the fill kernel)."""
    q, s, _ = ddata((2, 3, 4, 5), dtype, seed=15)
    y = np.array([[0, 1, 3], [2, 2, 0]])
    a = DC.protonet_loss(q, s, y)
    b = DC.protonet_loss(q, s, y, gloss=np.ones(2, dtype))
    for x, z in zip(a, b):
        np.testing.assert_array_equal(x, z)


def test_protonet_label_guard():
    """A label outside [0, N) that reaches softmax_ce gives NaN and pred -1, never a read
    out of bounds (the public entry point rejects it before that)."""
    q = np.ones((1, 2, 3))
    s = np.zeros((1, 4, 3))
    loss, dq, _, pred = DC.protonet_loss(q, s, np.array([[0, 7]]))
    assert np.isnan(loss[0]) and np.isnan(dq[0, 1]).all() and pred[0, 1] == -1
    assert pred[0, 0] == 0


def test_device_arrays_stay_on_the_device():
    """Device arrays in, device arrays out (no copy back), equal to the host path; and
    dispatch 'auto' picks numba-cuda for them."""
    q, s, g = ddata((1, 5, 6, 3), np.float64, seed=16)
    dq_, ds_, dg_ = (cuda.to_device(x) for x in (q, s, g))
    out = DC.pairwise_sqeuclidean(dq_, ds_)
    assert _dispatch.array_kind(out) == "numba-cuda"
    np.testing.assert_array_equal(out.copy_to_host(), DC.pairwise_sqeuclidean(q, s))
    dq, ds = DC.pairwise_l1_backward(dg_, dq_, ds_)
    assert _dispatch.array_kind(dq) == _dispatch.array_kind(ds) == "numba-cuda"
    from metacore.kernels import distance as K
    assert K._backend("t", "auto", dq_, ds_) is DC
    assert K._backend("t", "auto", q, s) is not DC        # NumPy arrays stay on the host
    with pytest.raises(TypeError, match="runs on the host"):
        K._backend("t", "numba", dq_, ds_)


# ---------------------------------------------------------------- LRUA kernels
# (T, B, H, S, W): 9 slots and 3 heads cross the 8-thread strides; H = S; W = 1; T = 1
LSHAPES = [(3, 2, 3, 9, 5), (2, 1, 1, 1, 1), (1, 2, 2, 2, 3), (4, 1, 2, 5, 1)]


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LSHAPES)
def test_lrua_forward_backward(shape, dtype, per_step):
    """gates, forward (ping-pong and keep-all memories), backward and sum_tb against the
    reference."""
    T, B, H, S, W = shape
    keys, alpha, memory0, read0, usage0, dreads = ldata(shape, dtype, 21, per_step)
    c = 4 * T * (S + W + H)
    got = LC.lrua_forward(keys, alpha, memory0, read0, usage0, 0.9)
    ref = RL.lrua_forward(*(x.astype(np.float64) for x in (keys, alpha, memory0, read0,
                                                           usage0)), 0.9)
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got, ref):
        assert a.dtype == dtype, name
        if name == "w_lu":
            np.testing.assert_array_equal(a, r)
        else:
            lassert(name, a, r, dtype, c)
    got = LC.lrua_backward(dreads, keys, alpha, memory0, read0, usage0, 0.9)
    ref = RL.lrua_backward(*(x.astype(np.float64) for x in (dreads, keys, alpha, memory0,
                                                            read0, usage0)), 0.9)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"), got, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        lassert(name, a, r, dtype, c)


def test_lrua_ties_mark_every_slot_at_the_threshold():
    """Counting ranks instead of sorting: tied usages at the n-th smallest are all marked,
    and the zeroed slot is the first argmin, as in the reference."""
    keys, alpha, memory0, read0, _, dreads = ldata((2, 1, 2, 6, 3), np.float64, 22, False)
    usage0 = np.array([[0.5, 0.2, 0.2, 0.9, 0.2, 0.7]])      # three-way tie at the minimum
    got = LC.lrua_forward(keys, alpha, memory0, read0, usage0, 1.0)
    ref = RL.lrua_forward(keys, alpha, memory0, read0, usage0, 1.0)
    np.testing.assert_array_equal(got[2][0, 0] > 0, ref[2][0, 0] > 0)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-13)
    for a, r in zip(LC.lrua_backward(dreads, keys, alpha, memory0, read0, usage0, 1.0),
                    RL.lrua_backward(dreads, keys, alpha, memory0, read0, usage0, 1.0)):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12 * np.abs(r).max())


@pytest.mark.parametrize("dtype", DTYPES)
def test_lrua_per_head_rule_with_ties(dtype):
    """write_rule='per_head': head h writes at the slot of rank h in the (usage, index)
    order; a three-way tie at the minimum must go to the lower indices, as in the
    reference's stable sort. Whole episode and step pair, both dtypes (bound of
    test_lrua_forward_backward); w_lu (the union over heads) exactly."""
    T, B, H, S, W = 3, 2, 3, 9, 5
    keys, alpha, memory0, read0, usage0, dreads = ldata((T, B, H, S, W), dtype, 24, True)
    usage0[0] = np.array([0.5, 0.2, 0.2, 0.9, 0.2, 0.7, 0.3, 0.8, 0.1], dtype)
    a64 = [x.astype(np.float64) for x in (keys, alpha, memory0, read0, usage0)]
    c = 4 * T * (S + W + H)
    got = LC.lrua_forward(keys, alpha, memory0, read0, usage0, 0.9, write_rule="per_head")
    ref = RL.lrua_forward(*a64, 0.9, write_rule="per_head")
    np.testing.assert_array_equal(got[4], ref[4])
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got, ref):
        lassert(name, a, r, dtype, c)
    got = LC.lrua_backward(dreads, keys, alpha, memory0, read0, usage0, 0.9,
                           write_rule="per_head")
    ref = RL.lrua_backward(dreads.astype(np.float64), *a64, 0.9, write_rule="per_head")
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"), got, ref):
        lassert(name, a, r, dtype, c)
    step = [keys[0], alpha[0], memory0, read0, usage0]
    s64 = [x.astype(np.float64) for x in step]
    grads = [dreads[0], memory0[::-1].copy(), read0[:, ::-1].copy()]
    g64 = [x.astype(np.float64) for x in grads]
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"),
                          LC.lrua_step_forward(*step, 0.9, write_rule="per_head"),
                          RL.lrua_step_forward(*s64, 0.9, write_rule="per_head")):
        lassert(name, a, r, dtype, c)
    for name, a, r in zip(("dkey", "dalpha", "dmemory_prev", "dw_r_prev"),
                          LC.lrua_step_backward(*grads, *step, 0.9, write_rule="per_head"),
                          RL.lrua_step_backward(*g64, *s64, 0.9, write_rule="per_head")):
        lassert(name, a, r, dtype, c)


def test_lrua_add_vector_is_refused_on_the_device():
    from metacore.kernels import lrua as KL
    args = ldata((2, 1, 2, 4, 3), np.float64, 25, False)
    dev = [cuda.to_device(a) for a in args[:5]]
    with pytest.raises(NotImplementedError, match="does not support a separate add vector"):
        KL.lrua_forward(*dev, 0.9, adds=cuda.to_device(args[0]))


def test_lrua_device_arrays_stay_on_the_device():
    args = ldata((2, 2, 2, 5, 3), np.float64, 23, False)
    dev = [cuda.to_device(x) for x in args]
    out = LC.lrua_forward(*dev[:5], 0.5)
    assert all(_dispatch.array_kind(a) == "numba-cuda" for a in out)
    host = LC.lrua_forward(*args[:5], 0.5)
    for a, b in zip(out, host):
        np.testing.assert_array_equal(a.copy_to_host(), b)
    grads = LC.lrua_backward(dev[5], *dev[:5], 0.5)
    assert all(_dispatch.array_kind(a) == "numba-cuda" for a in grads)
    from metacore.kernels import lrua as K
    assert K._backend("t", "auto", *dev[:5]) is LC


# ---------------------------------------------------------------- public entry points
def test_public_entry_points_route_device_arrays():
    """metacore.kernels.distance / lrua with device arrays: 'auto' runs numba-cuda, the
    results stay on the device, and a host backend refuses them."""
    from metacore.kernels import distance as K
    from metacore.kernels import lrua as KL
    q, s, _ = ddata((1, 5, 6, 3), np.float64, seed=41)
    y = np.random.default_rng(42).integers(0, 6, (1, 5))
    dq_, ds_, dy_ = (cuda.to_device(x) for x in (q, s, y))
    out = K.pairwise_sqeuclidean(dq_, ds_)
    assert _dispatch.array_kind(out) == "numba-cuda"
    np.testing.assert_array_equal(out.copy_to_host(), DC.pairwise_sqeuclidean(q, s))
    res = K.protonet_loss(dq_, ds_, dy_)
    assert all(_dispatch.array_kind(r) == "numba-cuda" for r in res)
    with pytest.raises(TypeError, match="runs on the host"):
        K.pairwise_l1(dq_, ds_, backend="numba")
    args = ldata((2, 1, 1, 4, 3), np.float64, 43, False)[:5]
    outs = KL.lrua_forward(*(cuda.to_device(a) for a in args), 0.9)
    assert all(_dispatch.array_kind(r) == "numba-cuda" for r in outs)
    np.testing.assert_array_equal(outs[0].copy_to_host(), LC.lrua_forward(*args, 0.9)[0])
    with pytest.raises(TypeError, match="runs on the host"):
        KL.lrua_forward(*(cuda.to_device(a) for a in args), 0.9, backend="reference")
    # the step pair runs on the device too: 'auto' picks numba-cuda, results stay there
    step = [cuda.to_device(a[0]) if a.ndim == 4 else cuda.to_device(a) for a in args]
    outs = KL.lrua_step_forward(*step, 0.9)
    assert all(_dispatch.array_kind(r) == "numba-cuda" for r in outs)
    host = [a[0] if a.ndim == 4 else a for a in args]
    for a, b in zip(outs, LC.lrua_step_forward(*host, 0.9)):
        np.testing.assert_array_equal(a.copy_to_host(), b)
    with pytest.raises(TypeError, match="lrua_step_forward: backend 'numba' runs on the host"):
        KL.lrua_step_forward(*step, 0.9, backend="numba")


# ---------------------------------------------------------------- LRUA step pair
# (B, H, S, W): 9 slots, 3 heads and W = 11 cross the 8-thread strides; B = 1; H = S;
# W = 1; S = 1
STEP_SHAPES = [(2, 3, 9, 11), (1, 1, 1, 1), (3, 2, 2, 3), (1, 2, 5, 1), (4, 1, 17, 2)]


def step_args(shape, dtype, seed, per_episode):
    """-> key, alpha, memory_prev, w_r_prev, w_u_prev, dread, dmemory, dw_r (dtype)."""
    B, H, S, W = shape
    keys, alpha, memory0, read0, usage0, dreads = ldata((1, B, H, S, W), dtype, seed,
                                                        per_episode)
    rng = np.random.default_rng(seed + 1)
    return [keys[0], alpha[0] if per_episode else alpha, memory0, read0, usage0, dreads[0],
            rng.standard_normal((B, S, W)).astype(dtype),
            rng.standard_normal((B, H, S)).astype(dtype)]


@pytest.mark.parametrize("per_episode", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", STEP_SHAPES)
def test_lrua_step_pair(shape, dtype, per_episode):
    """gates, step_forward, step_backward and sum_tb against the reference's step pair;
    bound eps(dtype) 4 (S + W + H) max|r| per array (tests/test_lrua.py's, T = 1)."""
    B, H, S, W = shape
    args = step_args(shape, dtype, 51, per_episode)
    a64 = [x.astype(np.float64) for x in args]
    c = 4 * (S + W + H)
    got = LC.lrua_step_forward(*args[:5], 0.9)
    ref = RL.lrua_step_forward(*a64[:5], 0.9)
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"), got, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        lassert(name, a, r, dtype, c)
    got = LC.lrua_step_backward(*args[5:], *args[:5], 0.9)
    ref = RL.lrua_step_backward(*a64[5:], *a64[:5], 0.9)
    for name, a, r in zip(("dkey", "dalpha", "dmemory_prev", "dw_r_prev"), got, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        lassert(name, a, r, dtype, c)


def test_lrua_step_ties_and_the_zeroed_slot():
    """Tied usages at the threshold are all marked and the first argmin is zeroed, in the
    step pair as in the reference (float64, to rounding)."""
    args = step_args((1, 2, 6, 3), np.float64, 52, False)
    args[4] = np.array([[0.5, 0.2, 0.2, 0.9, 0.2, 0.7]])      # three-way tie at the minimum
    got = LC.lrua_step_forward(*args[:5], 1.0)
    ref = RL.lrua_step_forward(*args[:5], 1.0)
    for a, r in zip(got, ref):
        np.testing.assert_allclose(a, r, rtol=1e-12, atol=1e-13)
    for a, r in zip(LC.lrua_step_backward(*args[5:], *args[:5], 1.0),
                    RL.lrua_step_backward(*args[5:], *args[:5], 1.0)):
        np.testing.assert_allclose(a, r, rtol=1e-11, atol=1e-12 * np.abs(r).max())


@pytest.mark.parametrize("per_step", [False, True])
def test_lrua_chained_steps_on_the_device(per_step):
    """T step calls with device arrays, the state (M_t, w_r_t, w_u_t) and the running
    dL/dM, dL/dw_r never leaving the device, equal the whole-episode kernels: the same
    device functions run in both, so float64 agrees to rounding (64 eps relative)."""
    T, B, H, S, W = 4, 2, 3, 9, 5
    keys, alpha, memory0, read0, usage0, dreads = ldata((T, B, H, S, W), np.float64, 53,
                                                        per_step)
    ref = LC.lrua_forward(keys, alpha, memory0, read0, usage0, 0.9)
    M, wr, wu = (cuda.to_device(x) for x in (memory0, read0, usage0))
    states, reads = [], []
    for t in range(T):
        states.append((M, wr, wu))
        r, M, wr, _, wu = LC.lrua_step_forward(keys[t], alpha[t] if per_step else alpha,
                                               M, wr, wu, 0.9)
        assert _dispatch.array_kind(M) == "numba-cuda"
        reads.append(r.copy_to_host())
    tol = 64 * np.finfo(np.float64).eps
    np.testing.assert_allclose(np.stack(reads), ref[0], rtol=0, atol=tol * np.abs(ref[0]).max())
    np.testing.assert_allclose(M.copy_to_host(), ref[5], rtol=0,
                               atol=tol * np.abs(ref[5]).max())
    gref = LC.lrua_backward(dreads, keys, alpha, memory0, read0, usage0, 0.9)
    dM = cuda.to_device(np.zeros_like(memory0))
    dwr = cuda.to_device(np.zeros_like(read0))
    dks, das = [None] * T, [None] * T
    for t in range(T - 1, -1, -1):
        dk, da, dM, dwr = LC.lrua_step_backward(dreads[t], dM, dwr, keys[t],
                                                alpha[t] if per_step else alpha, *states[t],
                                                0.9)
        dks[t], das[t] = dk.copy_to_host(), da.copy_to_host()
    da = np.stack(das) if per_step else np.sum(das, axis=0)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"),
                          (np.stack(dks), da, dM.copy_to_host(), dwr.copy_to_host()), gref):
        np.testing.assert_allclose(a, r, rtol=0, atol=tol * np.abs(r).max(), err_msg=name)


# ---------------------------------------------------------------- MANN on the device
@pytest.mark.parametrize("dtype", DTYPES)
def test_mann_gradient_with_the_device_step_pair(dtype):
    """MANN.loss_grad with backend='numba-cuda' (memory state on the device all episode)
    against the reference backend: float64 to rounding, float32 within 1e-4 relative (the
    float32 host kernels' own agreement with float64, tests/test_mann.py)."""
    from metacore.algorithms.mann import MANN
    from metacore import gradcheck
    model = MANN(d_in=6, n_way=3, hidden=4, heads=2, slots=9, width=3, gamma=0.9)
    rng = np.random.default_rng(61)
    theta = model.init_params(rng, np.float64)
    theta += 0.3 * rng.standard_normal(theta.shape)
    x = rng.standard_normal((6, 3, 6))                               # (T, B, D)
    y = rng.integers(0, 3, (6, 3))                                   # (T, B)
    ref = model.loss_grad(theta, x, y, "reference")
    got = model.loss_grad(theta.astype(dtype), x.astype(dtype), y, "numba-cuda")
    assert got[2].dtype == dtype
    tol = 1e-12 if dtype == np.float64 else 1e-4
    assert abs(got[0] - ref[0]) <= tol * abs(ref[0])
    assert gradcheck.rel_error(got[2], ref[2]) <= tol


def test_mann_trains_with_backend_numba_cuda(tmp_path):
    """`--set backend=numba-cuda` through make_config and the trainer: two iterations give
    the parameters of the same run on the reference backend (float64, to rounding)."""
    from metacore.training import Trainer, make_config
    sizes = dict(hidden=4, heads=2, slots=6, width=3, batch=2, eval_tasks=2, log_every=1,
                 eval_every=10, ckpt_every=10, iterations=2, dtype="float64")
    runs = {}
    for name in ("numba-cuda", "reference"):
        cfg = make_config("mann", "omniglot", str(tmp_path / name), backend=name, **sizes)
        runs[name] = Trainer(cfg, progress=False).train()
    np.testing.assert_allclose(runs["numba-cuda"], runs["reference"], rtol=1e-10,
                               atol=1e-12)


# ---------------------------------------------------------------- coverage (keep last)
def test_every_kernel_ran_in_both_dtypes(request):
    """Every kernel in the kernel dicts of distance_cuda and lrua_cuda (what the PTX test
    compiles, see tests/test_cuda_compile.py) was launched above in float32 and float64."""
    everything = {i.nodeid for i in request.node.parent.collect()}
    ran = {i.nodeid for i in request.session.items}
    if not everything <= ran:
        pytest.skip("part of this file was deselected; the coverage check needs all of it")
    want = {(m.__name__, name, np.dtype(dt).name) for m in (DC, LC) for dt in DTYPES
            for name in m.kernels(dt)}
    missing = sorted(want - LAUNCHED)
    assert not missing, f"kernels never launched under the simulator: {missing}"
