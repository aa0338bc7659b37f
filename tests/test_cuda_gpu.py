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
