"""GPU runtime tests of both device backends ('numba-cuda', 'cupy') against reference/:
real compiled kernels with the real tile sizes, shapes that cross the 16-wide tiles, both
dtypes, host and device arrays, 'auto' by array kind. They run where a CUDA GPU is usable
and skip elsewhere with the reason (the simulator and compile tests cover every kernel on
machines without one)."""
import importlib

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
from metacore.kernels import _dispatch
from metacore.kernels import distance as KD
from metacore.kernels import lrua as KL
from metacore.reference import distance as RD
from metacore.reference import lrua as RL

OPS = ("sqeuclidean", "l1", "cosine")
DTYPES = (np.float32, np.float64)
BACKENDS = ("numba-cuda", "cupy")


def _backend_or_skip(K, name):
    try:
        return K._backend("gpu test", name)
    except ImportError as err:
        pytest.skip(f"no usable GPU backend {name!r} here: {err}")


def _to_device(name, x):
    if name == "cupy":
        return importlib.import_module("cupy").asarray(x)
    return importlib.import_module("numba.cuda").to_device(np.ascontiguousarray(x))


def _to_host(x):
    if _dispatch.array_kind(x) == "cupy":
        return x.get()
    return x.copy_to_host()


def _close(name, a, ref, dtype, c):
    """|a - ref| <= eps(dtype) * c * max|ref| (normwise, as tests/test_lrua.py)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    assert a.shape == ref.shape, f"{name}: {a.shape} vs {ref.shape}"
    if a.size:
        err = np.abs(a - ref).max()
        bound = np.finfo(dtype).eps * c * max(np.abs(ref).max(), 1e-30)
        assert err <= bound, f"{name}: max error {err:.3g} above {bound:.3g}"


# (T, Q, N, D): across the 16-wide tiles, size-1 axes
SHAPES = [(3, 37, 41, 67), (1, 1, 1, 1), (2, 1, 17, 1), (2, 16, 16, 16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_distances_on_gpu(backend, dtype, shape):
    mod = _backend_or_skip(KD, backend)
    T, Q, N, D = shape
    rng = np.random.default_rng(1)
    q = rng.standard_normal((T, Q, D)).astype(dtype)
    s = rng.standard_normal((T, N, D)).astype(dtype)
    g = rng.standard_normal((T, Q, N)).astype(dtype)
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    c = 4 * (Q + N + D + 8)
    dq_, ds_, dg_ = (_to_device(backend, x) for x in (q, s, g))
    for op in OPS:
        ref = getattr(RD, "pairwise_" + op)(q64, s64)
        _close(op, getattr(mod, "pairwise_" + op)(q, s), ref, dtype, c)
        out = getattr(mod, "pairwise_" + op)(dq_, ds_)          # device in, device out
        assert _dispatch.array_kind(out) != "host"
        _close(op + " device", _to_host(out), ref, dtype, c)
        rdq, rds = getattr(RD, "pairwise_" + op + "_backward")(g64, q64, s64)
        dq, ds = getattr(mod, "pairwise_" + op + "_backward")(dg_, dq_, ds_)
        _close(op + " dq", _to_host(dq), rdq, dtype, c)
        _close(op + " ds", _to_host(ds), rds, dtype, c)
    y = rng.integers(0, N, size=(T, Q))
    for metric in OPS:
        got = mod.protonet_loss(q, s, y, metric=metric, scale=0.5)
        ref = RD.protonet_loss(q64, s64, y, metric=metric, scale=0.5)
        for name, a, r in zip(("loss", "dq", "ds"), got[:3], ref[:3]):
            _close(f"protonet {metric} {name}", a, r, dtype, c)
        if dtype == np.float64:
            np.testing.assert_array_equal(got[3], ref[3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, per_step", [((5, 3, 4, 130, 20), False),
                                             ((3, 2, 1, 1, 1), True),
                                             ((4, 2, 4, 4, 129), True)])
def test_lrua_on_gpu(backend, dtype, shape, per_step):
    mod = _backend_or_skip(KL, backend)
    T, B, H, S, W = shape
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((T, B, H, W)).astype(dtype)
    alpha = rng.standard_normal((T, B, H) if per_step else (H,)).astype(dtype)
    memory0 = rng.standard_normal((B, S, W)).astype(dtype)
    e = np.exp(rng.standard_normal((B, H, S)))
    read0 = (e / e.sum(-1, keepdims=True)).astype(dtype)
    usage0 = (0.3 * np.stack([rng.permutation(S) for _ in range(B)])).astype(dtype)
    dreads = rng.standard_normal((T, B, H, W)).astype(dtype)
    args64 = [x.astype(np.float64) for x in (keys, alpha, memory0, read0, usage0)]
    c = 4 * T * (S + W + H)
    dev = [_to_device(backend, x) for x in (keys, alpha, memory0, read0, usage0)]
    got = mod.lrua_forward(*dev, 0.9)
    assert all(_dispatch.array_kind(a) != "host" for a in got)
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got,
                          RL.lrua_forward(*args64, 0.9)):
        _close(name, _to_host(a), r, dtype, c)
    got = mod.lrua_backward(_to_device(backend, dreads), *dev, 0.9)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"), got,
                          RL.lrua_backward(dreads.astype(np.float64), *args64, 0.9)):
        _close(name, _to_host(a), r, dtype, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_auto_picks_the_device_backend_of_the_arrays(backend):
    mod = _backend_or_skip(KD, backend)
    x = _to_device(backend, np.zeros((1, 2, 3)))
    assert KD._backend("t", "auto", x, x) is mod


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_entry_points_with_device_arrays_on_gpu(backend):
    """metacore.kernels.distance / lrua with device arrays and backend='auto': the results
    stay on the device and equal the backend module's own."""
    mod = _backend_or_skip(KD, backend)
    lmod = _backend_or_skip(KL, backend)
    rng = np.random.default_rng(3)
    q, s = rng.standard_normal((2, 19, 33)), rng.standard_normal((2, 7, 33))
    y = rng.integers(0, 7, (2, 19))
    dq_, ds_, dy_ = (_to_device(backend, x) for x in (q, s, y))
    out = KD.pairwise_l1(dq_, ds_)
    assert _dispatch.array_kind(out) != "host"
    np.testing.assert_array_equal(_to_host(out), mod.pairwise_l1(q, s))
    res = KD.protonet_loss(dq_, ds_, dy_, metric="cosine")
    assert all(_dispatch.array_kind(r) != "host" for r in res)
    for a, b in zip(res, mod.protonet_loss(q, s, y, metric="cosine")):
        np.testing.assert_array_equal(_to_host(a), b)
    T, B, H, S, W = 3, 2, 2, 5, 4
    e = np.exp(rng.standard_normal((B, H, S)))
    args = [rng.standard_normal((T, B, H, W)), rng.standard_normal(H),
            rng.standard_normal((B, S, W)), e / e.sum(-1, keepdims=True),
            0.3 * np.stack([rng.permutation(S) for _ in range(B)])]
    outs = KL.lrua_forward(*(_to_device(backend, a) for a in args), 0.9)
    assert all(_dispatch.array_kind(r) != "host" for r in outs)
    for a, b in zip(outs, lmod.lrua_forward(*args, 0.9)):
        np.testing.assert_array_equal(_to_host(a), b)


# (B, H, S, W): S = 130 and W = 129 cross the 128-thread stride; size-1 axes; H = S
STEP_SHAPES = [((16, 4, 130, 40), False), ((1, 1, 1, 1), True), ((3, 2, 2, 129), True),
               ((5, 3, 17, 1), False)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, per_episode", STEP_SHAPES)
def test_lrua_step_pair_on_gpu(backend, dtype, shape, per_episode):
    """The step pair with device arrays (results stay there) and with NumPy arrays, against
    the reference; bound eps(dtype) 4 (S + W + H) max|r| per array (T = 1)."""
    mod = _backend_or_skip(KL, backend)
    B, H, S, W = shape
    rng = np.random.default_rng(4)
    key = rng.standard_normal((B, H, W)).astype(dtype)
    alpha = rng.standard_normal((B, H) if per_episode else (H,)).astype(dtype)
    memory_prev = rng.standard_normal((B, S, W)).astype(dtype)
    e = np.exp(rng.standard_normal((B, H, S)))
    w_r_prev = (e / e.sum(-1, keepdims=True)).astype(dtype)
    w_u_prev = (0.3 * np.stack([rng.permutation(S) for _ in range(B)])).astype(dtype)
    grads = [rng.standard_normal(shp).astype(dtype) for shp in ((B, H, W), (B, S, W),
                                                               (B, H, S))]
    args = [key, alpha, memory_prev, w_r_prev, w_u_prev]
    a64 = [x.astype(np.float64) for x in args]
    g64 = [x.astype(np.float64) for x in grads]
    c = 4 * (S + W + H)
    fref = RL.lrua_step_forward(*a64, 0.9)
    bref = RL.lrua_step_backward(*g64, *a64, 0.9)
    dev = [_to_device(backend, x) for x in args]
    ddev = [_to_device(backend, x) for x in grads]
    got = KL.lrua_step_forward(*dev, 0.9)                  # 'auto' by the arrays
    assert all(_dispatch.array_kind(a) != "host" for a in got)
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"), got, fref):
        _close(name, _to_host(a), r, dtype, c)
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"),
                          mod.lrua_step_forward(*args, 0.9), fref):
        assert isinstance(a, np.ndarray) and a.dtype == dtype, name
        _close(name + " host", a, r, dtype, c)
    got = KL.lrua_step_backward(*ddev, *dev, 0.9)
    assert all(_dispatch.array_kind(a) != "host" for a in got)
    for name, a, r in zip(("dkey", "dalpha", "dmemory_prev", "dw_r_prev"), got, bref):
        _close(name, _to_host(a), r, dtype, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mann_gradient_with_the_device_step_pair_on_gpu(backend):
    """MANN.loss_grad with the step pair on the GPU (memory state on the device all
    episode) equals the reference backend's, float64 to 1e-12 relative."""
    _backend_or_skip(KL, backend)
    from metacore import gradcheck
    from metacore.algorithms.mann import MANN
    model = MANN(d_in=20, n_way=5, hidden=16, heads=4, slots=37, width=9, gamma=0.95)
    rng = np.random.default_rng(5)
    theta = model.init_params(rng, np.float64)
    theta += 0.3 * rng.standard_normal(theta.shape)
    x = rng.standard_normal((12, 3, 20))                             # (T, B, D)
    y = rng.integers(0, 5, (12, 3))                                  # (T, B)
    ref = model.loss_grad(theta, x, y, "reference")
    got = model.loss_grad(theta, x, y, backend)
    assert abs(got[0] - ref[0]) <= 1e-12 * abs(ref[0])
    assert gradcheck.rel_error(got[2], ref[2]) <= 1e-12
