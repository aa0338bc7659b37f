"""The Numba kernels of the Conv-4 layers (metacore.kernels.convnet_numba) against the layers'
NumPy code (the same public functions under `numpy_only()`) and against `reference/`.

Tolerances (rel_error: max|a - b| / (max|a| + max|b|), normwise, see metacore.gradcheck):
float64 1e-12 (both paths compute the same formulas; only the order of sums differs), float32
TOL32 = 1e-5 (about 80 float32 eps: the NumPy path sums float32 data in float32 and the
kernels in float64, so the two differ by the NumPy path's rounding). Integer outputs (the
max-pool argmax) and the ReLU mask must be identical. Shapes are ugly on purpose: size 1,
odd sizes, T > 1.
"""
import subprocess
import sys
import os

import numpy as np
import pytest

from metacore.gradcheck import rel_error
from metacore.kernels import convnet
from metacore.layers import batchnorm as bn
from metacore import reference as _ref  # noqa: F401  (metacore.reference is importable)
from metacore.reference import batchnorm as rbn

pytestmark = pytest.mark.skipif(convnet.numba_kernels() is None,
                                reason="numba not importable (or METACORE_NO_NUMBA set)")
TOL = {np.float64: 1e-12, np.float32: 1e-5}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def both(fn):
    """fn() on the Numba path and on the NumPy path -> (fast outputs, numpy outputs)."""
    fast = fn()
    with convnet.numpy_only():
        slow = fn()
    return fast, slow


def assert_close(fast, slow, dtype, what):
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a.shape == b.shape and a.dtype == b.dtype, (what, i, a.shape, b.shape,
                                                           a.dtype, b.dtype)
        if a.dtype.kind in "biu":
            np.testing.assert_array_equal(a, b, err_msg=f"{what} output {i}")
            continue
        err = rel_error(a, b)
        assert err <= TOL[dtype], f"{what} output {i}: rel_error {err:.2e} > {TOL[dtype]}"


# ---------------------------------------------------------------- batch norm
BN_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 4), (1, 1, 3, 3, 1), (3, 2, 1, 5, 6), (2, 7, 3),
             (1, 4, 2, 2, 64)]


def _bn_inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    T, C = shape[0], shape[-1]
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    x = (3 * f(*shape) + 1.5).astype(dtype)
    return dict(x=x, g=f(T, C), b=f(T, C), dy=f(*shape), rx=f(*shape), rdy=f(*shape),
                rg=f(T, C), rb=f(T, C))


def _bn_all(a):
    y, c = bn.batchnorm_forward(a["x"], a["g"], a["b"])
    dx, dg, db = bn.batchnorm_backward(a["dy"], c)
    ry, rc = bn.batchnorm_rforward(a["rx"], a["rg"], a["rb"], c)
    rdx, rdg, rdb = bn.batchnorm_rbackward(a["dy"], a["rdy"], c, rc)
    xhat, rstd, _, mu, var = c
    rxhat, rrstd, _ = rc
    return [y, xhat, rstd, mu, var, dx, dg, db, ry, rxhat, rrstd, rdx, rdg, rdb]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_batchnorm_numba_matches_numpy(shape, dtype):
    a = _bn_inputs(shape, dtype)
    assert_close(*both(lambda: _bn_all(a)), dtype, f"batchnorm {shape}")


@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 4), (2, 1, 3, 3, 1)], ids=str)
def test_batchnorm_numba_matches_reference(shape):
    a = _bn_inputs(shape, np.float64, seed=1)
    y, dx, dg, db, ry, rdx, rdg, rdb = (_bn_all(a)[i] for i in (0, 5, 6, 7, 8, 11, 12, 13))
    for t in range(shape[0]):
        g, b, rg, rb = a["g"][t], a["b"][t], a["rg"][t], a["rb"][t]
        x, dy, rx, rdy = a["x"][t], a["dy"][t], a["rx"][t], a["rdy"][t]
        ref = [rbn.batchnorm_forward(x, g, b), *rbn.batchnorm_backward(dy, x, g),
               rbn.batchnorm_rforward(x, g, rx, rg, rb),
               *rbn.batchnorm_rbackward(dy, rdy, x, g, rx, rg)]
        for out, r in zip([y[t], dx[t], dg[t], db[t], ry[t], rdx[t], rdg[t], rdb[t]], ref):
            assert rel_error(out, r) <= 1e-11


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batchnorm_variance_when_the_shift_cancels(dtype):
    """The one-pass variance shifts by each channel's first entry; an outlier there (channel
    0) or a large common offset (channel 1) takes the exact second pass."""
    a = _bn_inputs((2, 3, 5, 7, 3), dtype, seed=3)
    x = a["x"].astype(np.float64)
    x[:, 0, 0, 0, 0] = 1e7
    x[..., 1] = 1e4 + 1e-2 * x[..., 1]
    a["x"] = x.astype(dtype)
    # the NumPy path's own mean is off by ~1e-11 here (its sum of 1e4's), so both paths are
    # measured against long double arithmetic instead of each other
    xl = a["x"].astype(np.longdouble)
    mu = xl.mean(axis=(1, 2, 3), keepdims=True)
    xhat = (xl - mu) / np.sqrt(((xl - mu) ** 2).mean(axis=(1, 2, 3), keepdims=True) + 1e-5)
    fast, slow = both(lambda: bn.batchnorm_forward(a["x"], a["g"], a["b"])[1][0:1])
    err_fast = rel_error(fast[0], xhat.astype(np.float64))
    err_slow = rel_error(slow[0], xhat.astype(np.float64))
    assert err_fast <= TOL[dtype] and err_fast <= max(err_slow, TOL[dtype]), (err_fast, err_slow)


def test_batchnorm_nan_stays_in_its_channel():
    a = _bn_inputs((1, 2, 3, 3, 4), np.float64, seed=4)
    a["x"][0, 1, 2, 0, 2] = np.nan
    fast, slow = both(lambda: bn.batchnorm_forward(a["x"], a["g"], a["b"])[:1])
    np.testing.assert_array_equal(np.isnan(fast[0]), np.isnan(slow[0]))
    assert np.isnan(fast[0][..., 2]).all() and not np.isnan(fast[0][..., [0, 1, 3]]).any()
    ok = ~np.isnan(slow[0])
    assert rel_error(fast[0][ok], slow[0][ok]) <= 1e-12


def test_batchnorm_numba_takes_strided_params():
    """gamma / beta are views into a flat (T, P) theta in the models: not contiguous."""
    a = _bn_inputs((3, 4, 5, 5, 6), np.float64)
    theta = np.random.default_rng(2).standard_normal((3, 20))
    g, b = theta[:, 2:8], theta[:, 10:16]
    assert not g.flags.c_contiguous
    fast, slow = both(lambda: bn.batchnorm_forward(a["x"], g, b)[0:1])
    assert_close(fast, slow, np.float64, "strided gamma")


def test_switch_and_env_var():
    assert convnet.numba_kernels() is not None
    with convnet.numpy_only():
        assert convnet.numba_kernels() is None
    assert convnet.numba_kernels() is not None
    code = ("from metacore.kernels import convnet; import sys; "
            "sys.exit(0 if convnet.numba_kernels() is None else 1)")
    env = dict(os.environ, METACORE_NO_NUMBA="1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_conv4_models_without_numba():
    """The layers fall back to NumPy when numba cannot be imported at all."""
    code = (
        "import sys; sys.modules['numba'] = None\n"
        "import numpy as np\n"
        "from metacore.models import conv4_protonet, conv4_maml\n"
        "from metacore.params import tile_tasks\n"
        "from metacore.kernels import convnet\n"
        "rng = np.random.default_rng(0)\n"
        "m = conv4_maml(n_way=3, image_shape=(9, 9, 1), channels=4)\n"
        "th = tile_tasks(m.init_params(rng), 2); x = rng.standard_normal((2, 3, 9, 9, 1))\n"
        "loss, g, hv = m.hvp(th, x, np.zeros((2, 3), np.int64), th)\n"
        "p = conv4_protonet(image_shape=(16, 16, 1), channels=4, depth=3)\n"
        "out, _ = p.forward(tile_tasks(p.init_params(rng), 1), rng.standard_normal((1, 3, 16, 16, 1)))\n"
        "assert np.isfinite(hv).all() and np.isfinite(out).all()\n"
        "assert convnet.numba_kernels() is None\n"
        "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---------------------------------------------------------------- ReLU and max-pool
from metacore.layers import maxpool as mp  # noqa: E402
from metacore.layers import relu as rl  # noqa: E402
from metacore.reference import maxpool as rmp  # noqa: E402

POOL_SHAPES = [(1, 1, 2, 2, 1), (2, 3, 5, 7, 4), (1, 2, 7, 7, 3), (3, 1, 4, 3, 1),
               (1, 2, 6, 8, 64)]


def _tied(shape, dtype, seed):
    """Small integers: most windows hold ties, and there are exact zeros (ReLU's kink)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-2, 3, shape).astype(dtype)


def _pool_all(x, dy, rx, rdy):
    y, c = mp.maxpool_forward(x)
    dx = mp.maxpool_backward(dy, c)
    ry, rc = mp.maxpool_rforward(rx, c)
    rdx = mp.maxpool_rbackward(dy, rdy, c, rc)
    return [y, c[0].astype(np.int64), dx, ry, rdx]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", POOL_SHAPES, ids=str)
def test_maxpool_numba_matches_numpy_with_ties(shape, dtype):
    x = _tied(shape, dtype, 0)
    T, B, H, W, C = shape
    rng = np.random.default_rng(1)
    dy, rdy = (rng.standard_normal((T, B, H // 2, W // 2, C)).astype(dtype) for _ in range(2))
    rx = rng.standard_normal(shape).astype(dtype)
    fast, slow = both(lambda: _pool_all(x, dy, rx, rdy))
    for a, b in zip(fast, slow):                 # routing only: bit-identical
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_maxpool_numba_matches_reference():
    x = _tied((2, 3, 7, 5, 4), np.float64, 3)
    rng = np.random.default_rng(4)
    dy, rdy = rng.standard_normal((2, 2, 3, 3, 2, 4))
    rx = rng.standard_normal(x.shape)
    y, _, dx, ry, rdx = _pool_all(x, dy, rx, rdy)
    for t in range(2):
        np.testing.assert_array_equal(y[t], rmp.maxpool_forward(x[t]))
        np.testing.assert_array_equal(dx[t], rmp.maxpool_backward(dy[t], x[t]))
        np.testing.assert_array_equal(ry[t], rmp.maxpool_rforward(x[t], rx[t]))
        np.testing.assert_array_equal(rdx[t], rmp.maxpool_rbackward(dy[t], rdy[t], x[t]))


def test_maxpool_nan_and_signed_zero_like_numpy():
    """np.argmax lets a NaN win its window; the one-hot product spreads a NaN in dy over its
    window and gives -0.0 for negative dy: the kernels do the same."""
    x = np.zeros((1, 1, 4, 4, 2))
    x[0, 0, 1, 1, 0] = np.nan
    x[0, 0, 0, 0, 0] = 5.0
    x[0, 0, 2, 3, 1] = -0.0
    dy = -np.ones((1, 1, 2, 2, 2))
    dy[0, 0, 1, 1, 1] = np.nan
    fast, slow = both(lambda: _pool_all(x, dy, x, dy))
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.signbit(a), np.signbit(b))


def test_maxpool_bad_upstream_shape():
    _, c = mp.maxpool_forward(np.zeros((1, 2, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"maxpool2d backward: dy must have shape"):
        mp.maxpool_backward(np.zeros((1, 2, 2, 3, 3)), c)
    with pytest.raises(ValueError, match=r"maxpool2d rforward: rx must have shape"):
        mp.maxpool_rforward(np.zeros((1, 2, 4, 5, 3)), c)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(1,), (2, 3, 5, 7, 4), (3, 1, 1, 1, 1), (2, 9, 64)], ids=str)
def test_relu_numba_matches_numpy(shape, dtype):
    rng = np.random.default_rng(5)
    x = _tied(shape, dtype, 6)
    x.reshape(-1)[:1] = np.nan if x.size > 3 else x.reshape(-1)[:1]
    dy, rx, rdy = (rng.standard_normal(shape).astype(dtype) for _ in range(3))

    def run():
        y, mask = rl.relu_forward(x)
        ry, rc = rl.relu_rforward(rx, mask)
        return [y, mask, rl.relu_backward(dy, mask), ry, rl.relu_rbackward(dy, rdy, mask, rc)]
    fast, slow = both(run)
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(np.signbit(a), np.signbit(b))
        assert a.dtype == b.dtype


def test_relu_noncontiguous_input():
    x = np.random.default_rng(7).standard_normal((2, 6, 5, 4)).transpose(0, 2, 1, 3)
    fast, slow = both(lambda: list(rl.relu_forward(x)))
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- conv2d
from metacore.layers import conv2d as cv  # noqa: E402
from metacore.reference import conv2d as rcv  # noqa: E402

CONV_CASES = [  # (T, B, H, W, C, F)
    (1, 1, 3, 3, 1, 1), (2, 5, 7, 6, 3, 4), (1, 3, 5, 9, 1, 8), (3, 2, 4, 4, 2, 5),
    (1, 4, 8, 7, 16, 3)]


def _conv_inputs(case, stride, padding, dtype, seed=0):
    T, B, H, W, C, F = case
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(dtype)  # noqa: E731
    Ho, Wo, _, _ = cv.conv2d_geometry(H, W, stride, padding)
    return dict(x=f(T, B, H, W, C), w=f(T, 3, 3, C, F), b=f(T, F), rx=f(T, B, H, W, C),
                rw=f(T, 3, 3, C, F), rb=f(T, F), dy=f(T, B, Ho, Wo, F), rdy=f(T, B, Ho, Wo, F))


def _conv_all(a, stride, padding):
    y, c = cv.conv2d_forward(a["x"], a["w"], a["b"], stride, padding)
    out = [y, *cv.conv2d_backward(a["dy"], c)]
    out.append(cv.conv2d_backward(a["dy"], c, need_dx=False)[1])
    for rx in (a["rx"], None):                   # hidden layer, and the data input (R{x} = 0)
        ry, rc = cv.conv2d_rforward(rx, a["rw"], a["rb"], c)
        out += [ry, *cv.conv2d_rbackward(a["dy"], a["rdy"], c, rc)]
        out.append(cv.conv2d_rbackward(a["dy"], a["rdy"], c, rc, need_dx=False)[1])
    return out


@pytest.mark.parametrize("chunk", [1, 200, 1 << 17], ids=["1img", "some", "default"])
@pytest.mark.parametrize("geom", [(1, "same"), (2, "same"), (1, "valid"), (2, "valid")],
                         ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv2d_numba_matches_numpy(geom, dtype, chunk, monkeypatch):
    """Every case, with chunks of one image, of a few images (a short last chunk) and one
    chunk for the whole batch; the kernels take every C here (MIN_FAST_KKC = 0), the layer
    alone would keep the NumPy code for C < 8."""
    monkeypatch.setattr(cv, "CHUNK_ELEMS", chunk)
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 0)
    stride, padding = geom
    for case in CONV_CASES:
        a = _conv_inputs(case, stride, padding, dtype)
        assert_close(*both(lambda: _conv_all(a, stride, padding)), dtype,
                     f"conv2d {case} {geom} chunk {chunk}")


@pytest.mark.parametrize("geom", [(1, "same"), (2, "same"), (2, "valid")], ids=str)
def test_conv2d_numba_matches_reference(geom, monkeypatch):
    monkeypatch.setattr(cv, "CHUNK_ELEMS", 200)
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 0)
    stride, padding = geom
    a = _conv_inputs((2, 3, 7, 6, 3, 4), stride, padding, np.float64, seed=1)
    y, dx, dw, db, _, ry, rdx, rdw, rdb = _conv_all(a, stride, padding)[:9]
    for t in range(2):
        x, w, rx, rw, dy, rdy = (a[k][t] for k in ("x", "w", "rx", "rw", "dy", "rdy"))
        ref = [rcv.conv2d_forward(x, w, a["b"][t], stride, padding),
               *rcv.conv2d_backward(dy, x, w, stride, padding),
               rcv.conv2d_rforward(x, w, rx, rw, a["rb"][t], stride, padding),
               *rcv.conv2d_rbackward(dy, rdy, x, w, rx, rw, stride, padding)]
        for out, r in zip([y[t], dx[t], dw[t], db[t], ry[t], rdx[t], rdw[t], rdb[t]], ref):
            assert rel_error(out, r) <= 1e-12


def test_conv2d_numba_takes_strided_inputs(monkeypatch):
    """w and b are views into a flat theta; x may be a non-contiguous view."""
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 0)
    rng = np.random.default_rng(3)
    theta = rng.standard_normal((2, 3 * 3 * 3 * 4 + 4 + 5))
    w = theta[:, 5:5 + 108].reshape(2, 3, 3, 3, 4)
    b = theta[:, 113:117]
    x = rng.standard_normal((2, 4, 6, 7, 3)).transpose(0, 1, 3, 2, 4)   # (2, 4, 7, 6, 3)
    fast, slow = both(lambda: [cv.conv2d_forward(x, w, b, 2, "same")[0]])
    assert_close(fast, slow, np.float64, "strided conv2d")


def test_conv2d_default_threshold_uses_kernels_from_8_channels(monkeypatch):
    calls = []
    k = convnet.numba_kernels()
    monkeypatch.setattr(k, "im2col", lambda *a, _f=k.im2col: calls.append(1) or _f(*a))
    for C, used in ((1, False), (7, False), (8, True)):
        calls.clear()
        a = _conv_inputs((1, 2, 5, 5, C, 3), 1, "same", np.float64)
        cv.conv2d_forward(a["x"], a["w"], a["b"])
        assert bool(calls) == used, C


def test_conv2d_kernels_pass_the_finite_difference_check(monkeypatch):
    """`metacore check conv2d` (float64 gradient, HVP, symmetry rows) on the kernels: its
    C = 3 cases would otherwise take the NumPy code."""
    from metacore import check
    calls = []
    k = convnet.numba_kernels()
    monkeypatch.setattr(k, "col2im", lambda *a, _f=k.col2im: calls.append(1) or _f(*a))
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 0)
    monkeypatch.setattr(cv, "CHUNK_ELEMS", 100)
    lines = []
    assert check.run(["conv2d"], ("float64",), out=lines.append) == 0, "\n".join(lines)
    assert calls


# ---------------------------------------------------------------- conv2d, direct kernels (few C)
def _spy(monkeypatch, k, name):
    """Count the calls of kernel `name` of module k."""
    calls = []
    monkeypatch.setattr(k, name, lambda *a, _f=getattr(k, name): calls.append(1) or _f(*a))
    return calls


@pytest.mark.parametrize("geom", [(1, "same"), (2, "same"), (1, "valid"), (2, "valid")],
                         ids=str)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv2d_direct_matches_numpy(geom, dtype, monkeypatch):
    """Every case on the direct kernels (MIN_FAST_KKC above every K*K*C here): forward,
    backward with and without dx, R-forward with R{x} and without, R-backward."""
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 1 << 30)
    k = convnet.numba_kernels()
    fwd, dw = _spy(monkeypatch, k, "conv_direct_forward"), _spy(monkeypatch, k, "conv_direct_dw")
    stride, padding = geom
    for case in CONV_CASES:
        a = _conv_inputs(case, stride, padding, dtype)
        assert_close(*both(lambda: _conv_all(a, stride, padding)), dtype,
                     f"direct conv2d {case} {geom}")
    assert fwd and dw


DIRECT_CASES = [(2, 3, 7, 6, 1, 4), (1, 2, 5, 8, 3, 64), (2, 1, 1, 1, 2, 3)]
# every case with every geometry, except 'valid' padding on an input under 3x3 (no output)
DIRECT_GEOMS = [(case, geom) for case in DIRECT_CASES
                for geom in [(1, "same"), (2, "same"), (2, "valid")]
                if geom[1] == "same" or min(case[2:4]) >= 3]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("case,geom", DIRECT_GEOMS, ids=str)
def test_conv2d_direct_matches_reference(case, geom, dtype, monkeypatch):
    """Against reference/conv2d.py (float64 loops), per task: float64 to 1e-12, float32 to
    its tolerance; the data-input R-passes (R{x} = 0) too."""
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 1 << 30)
    stride, padding = geom
    a = _conv_inputs(case, stride, padding, dtype, seed=2)
    out = _conv_all(a, stride, padding)
    y, dx, dw, db, _, ry, rdx, rdw, rdb, _, ry0, rdx0, rdw0, rdb0 = out[:14]
    tol = TOL[dtype]
    for t in range(case[0]):
        x, w, rx, rw, dy, rdy = (a[k][t].astype(np.float64)
                                 for k in ("x", "w", "rx", "rw", "dy", "rdy"))
        b, rb = a["b"][t].astype(np.float64), a["rb"][t].astype(np.float64)
        ref = [rcv.conv2d_forward(x, w, b, stride, padding),
               *rcv.conv2d_backward(dy, x, w, stride, padding),
               rcv.conv2d_rforward(x, w, rx, rw, rb, stride, padding),
               *rcv.conv2d_rbackward(dy, rdy, x, w, rx, rw, stride, padding),
               rcv.conv2d_rforward(x, w, 0 * rx, rw, rb, stride, padding),
               *rcv.conv2d_rbackward(dy, rdy, x, w, 0 * rx, rw, stride, padding)]
        got = [y, dx, dw, db, ry, rdx, rdw, rdb, ry0, rdx0, rdw0, rdb0]
        for i, (o, r) in enumerate(zip(got, ref)):
            assert o.dtype == dtype
            err = rel_error(o[t].astype(np.float64), r)
            assert err <= tol, f"output {i} task {t}: rel_error {err:.2e} > {tol}"


def test_conv2d_direct_nonfinite_weights_like_the_gemm(monkeypatch):
    """An inf weight makes NaN where its tap reads the zero padding, as 0 * inf in the
    GEMM on zero-padded columns; a NaN in x stays in the windows that read it."""
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 1 << 30)
    a = _conv_inputs((1, 2, 5, 4, 1, 3), 2, "same", np.float64, seed=4)
    a["w"][0, 2, 2, 0, 1] = np.inf
    a["x"][0, 1, 0, 0, 0] = np.nan
    with np.errstate(invalid="ignore"):
        fast, slow = both(lambda: _conv_all(a, 2, "same"))
    for i, (f, s) in enumerate(zip(fast, slow)):
        np.testing.assert_array_equal(np.isnan(f), np.isnan(s), err_msg=f"output {i}")
        ok = np.isfinite(s)
        assert rel_error(f[ok], s[ok]) <= 1e-12, i


def test_conv2d_image_layer_takes_the_direct_kernels():
    """At the default threshold the 1-channel layer (conv4_maml's first) runs on the direct
    kernels, forward and backward, and 8 channels on im2col."""
    k = convnet.numba_kernels()
    import unittest.mock as um
    for C, used in ((1, True), (7, True), (8, False)):
        a = _conv_inputs((1, 2, 5, 5, C, 3), 2, "same", np.float32)
        with um.patch.object(k, "conv_direct_forward", wraps=k.conv_direct_forward) as f, \
                um.patch.object(k, "conv_direct_dw", wraps=k.conv_direct_dw) as d:
            y, c = cv.conv2d_forward(a["x"], a["w"], a["b"], 2, "same")
            cv.conv2d_backward(a["dy"], c, need_dx=False)
        assert f.called == used and d.called == used, C


def test_conv2d_direct_passes_the_finite_difference_check(monkeypatch):
    """`metacore check conv2d` (float64 gradient, HVP, symmetry rows) on the direct kernels."""
    from metacore import check
    monkeypatch.setattr(cv, "MIN_FAST_KKC", 1 << 30)
    calls = _spy(monkeypatch, convnet.numba_kernels(), "conv_direct_dw")
    lines = []
    assert check.run(["conv2d"], ("float64",), out=lines.append) == 0, "\n".join(lines)
    assert calls


# ---------------------------------------------------------------- batch norm + ReLU, fused
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
def test_bn_relu_fused_equals_the_two_layers(shape, dtype):
    """batchnorm_relu_forward / _backward give the bits of batchnorm then relu (and back),
    on the kernels and on the NumPy code; a NaN and ReLU's x = 0 boundary included."""
    a = _bn_inputs(shape, dtype)
    x, gamma, beta, dy = a["x"], a["g"], a["b"], a["dy"]
    x.reshape(-1)[0] = np.nan
    beta = beta.copy()
    beta[:, 0] = 0.0                        # gamma * xhat + 0: some y exactly 0 for M = 1

    def run():
        y, c, mask = bn.batchnorm_relu_forward(x, gamma, beta)
        z, c2 = bn.batchnorm_forward(x, gamma, beta)
        y2, mask2 = rl.relu_forward(z)
        back = bn.batchnorm_relu_backward(dy, mask, c)
        back2 = bn.batchnorm_backward(rl.relu_backward(dy, mask2), c2)
        return [y, mask, *c[:2], *c[3:], *back], [y2, mask2, *c2[:2], *c2[3:], *back2]

    for fused, apart in both(run):
        for i, (a, b) in enumerate(zip(fused, apart)):
            assert a.dtype == b.dtype and a.shape == b.shape, i
            np.testing.assert_array_equal(a, b, err_msg=f"output {i}")


def test_bn_relu_fused_takes_strided_input():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 5, 3)).transpose(0, 2, 1, 3)          # (2, 5, 6, 3) view
    g, b = rng.standard_normal((2, 3)), rng.standard_normal((2, 3))
    dy = rng.standard_normal((2, 5, 6, 3))
    y, c, mask = bn.batchnorm_relu_forward(x, g, b)
    with convnet.numpy_only():
        y2, c2, mask2 = bn.batchnorm_relu_forward(x, g, b)
        back2 = bn.batchnorm_relu_backward(dy, mask2, c2)
    assert_close([y, *bn.batchnorm_relu_backward(dy, mask, c)], [y2, *back2], np.float64,
                 "strided bn+relu")
    np.testing.assert_array_equal(mask, mask2)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("build", ["conv4_maml", "conv4_protonet", "bn_mlp"])
def test_model_fuses_bn_relu_with_the_same_bits(build, dtype, monkeypatch):
    """Model.forward / backward run BatchNorm + ReLU pairs fused: the output, caches and
    gradient equal the layer-by-layer passes bit for bit, and the HVP sweep (per layer) takes
    the fused forward's caches."""
    from metacore import models
    from metacore.network import Model
    kw = dict(channels=8, depth=2) if build != "bn_mlp" else dict(hidden=(16, 8))
    if build == "conv4_protonet":
        kw["image_shape"] = (12, 12, 1)
    elif build == "conv4_maml":
        kw["image_shape"] = (12, 12, 1)
    else:
        kw["in_features"] = 10
    model = getattr(models, build)(**kw)
    assert model._bn_relu_pairs()
    rng = np.random.default_rng(0)
    T = 2
    theta = np.stack([model.init_params(rng, dtype) for _ in range(T)])
    x = rng.standard_normal((T, 5) + model.in_shape).astype(dtype)
    dout_shape = (T, 5) + model.out_shape
    dout = rng.standard_normal(dout_shape).astype(dtype)

    def passes():
        out, caches = model.forward(theta, x)
        grad, dx = model.backward(dout, caches, T, return_dx=True)
        return out, caches, grad, dx

    fused = passes()
    monkeypatch.setattr(Model, "_bn_relu_pairs", lambda self: set())
    apart = passes()
    for a, b in [(fused[0], apart[0]), (fused[2], apart[2]), (fused[3], apart[3])]:
        np.testing.assert_array_equal(a, b)
    for ca, cb in zip(fused[1], apart[1]):
        for a, b in zip(ca if isinstance(ca, tuple) else (ca,),
                        cb if isinstance(cb, tuple) else (cb,)):
            if isinstance(a, np.ndarray):
                np.testing.assert_array_equal(a, b)
    if model.loss_name is not None:
        v = rng.standard_normal(theta.shape).astype(dtype)
        rout, rc = model.rforward(v, fused[1])
        rout2, _ = model.rforward(v, apart[1])
        np.testing.assert_array_equal(rout, rout2)
