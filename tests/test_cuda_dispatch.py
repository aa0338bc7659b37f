"""The backend dispatch with the device backends: registration, 'auto' by array kind, clear
errors for a backend that is missing or cannot run, host backends refusing device arrays,
and the device-aware input checks. No GPU needed (fake device arrays stand in)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
from metacore.kernels import _dispatch
from metacore.kernels import distance as KD
from metacore.kernels import lrua as KL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = (KD, KL)


class FakeDeviceArray:
    """Stands in for a Numba device array: shape, dtype, __cuda_array_interface__."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.shape, "typestr": self.dtype.str, "data": (0, False),
                "version": 3}


FakeCupyArray = type("ndarray", (FakeDeviceArray,), {"__module__": "cupy._core.core"})


def _gpu_usable(mod):
    try:
        return mod._backend("t", "numba-cuda") is not None
    except ImportError:
        return False


@pytest.mark.parametrize("K", FAMILIES)
def test_device_backends_are_registered(K):
    reg = K._BACKENDS.registry
    fam = K.__name__.rsplit(".", 1)[1]
    assert reg["numba-cuda"] == (f"metacore.kernels.{fam}_cuda", "numba-cuda")
    assert reg["cupy"] == (f"metacore.kernels.{fam}_cupy", "cupy-cuda13x")
    assert set(K.BACKENDS) <= set(reg) and K._BACKENDS.device == ("numba-cuda", "cupy")
    # the host order is untouched: device backends never join auto for NumPy arrays
    assert K._BACKENDS.auto_order == K.AUTO_ORDER
    assert "numba-cuda" not in K.AUTO_ORDER and "cupy" not in K.AUTO_ORDER


def test_auto_with_numpy_arrays_stays_on_the_host():
    q = np.zeros((1, 2, 3))
    assert KD._backend("t", "auto", q, q) is KD._backend("t", "auto")
    assert KD._backend("t", "auto").__name__ in ("metacore.kernels.distance_numba",
                                                 "metacore.reference.distance")


@pytest.mark.parametrize("K", FAMILIES)
def test_unusable_device_backend_says_what_is_missing(K):
    """Without a GPU (or without the package) each device backend raises an ImportError
    naming the op, the backend and what is missing, and available_backends omits it."""
    for name in ("numba-cuda", "cupy"):
        try:
            K._backend("myop", name)
        except _dispatch.BackendUnavailable as err:
            msg = str(err)
            assert msg.startswith(f"myop: backend {name!r} cannot run on this machine: ")
            assert "CUDA" in msg and "backend='numba' or 'reference'" in msg
            assert name not in K.available_backends()
        except ImportError as err:
            assert f"backend {name!r} needs the package" in str(err)
            assert name not in K.available_backends()
        else:
            assert name in K.available_backends()     # a machine with a GPU


def test_public_op_refuses_unavailable_backend_clearly():
    if _gpu_usable(KD):
        pytest.skip("a GPU is usable here: numba-cuda does not refuse")
    q = np.ones((1, 2, 3))
    with pytest.raises(ImportError, match=r"pairwise_l1: backend 'numba-cuda' (cannot run on "
                                          r"this machine|needs the package)"):
        KD.pairwise_l1(q, q, backend="numba-cuda")
    with pytest.raises(ImportError, match=r"lrua_forward: backend 'cupy' (cannot run on this "
                                          r"machine|needs the package)"):
        KL.lrua_forward(np.ones((1, 1, 1, 2)), np.zeros(1), np.ones((1, 2, 2)),
                        np.full((1, 1, 2), 0.5), np.zeros((1, 2)), 0.9, backend="cupy")


def test_missing_packages_are_named():
    """With cupy and numba.cuda blocked, asking for their backends names the pip package,
    and the host backends still work."""
    code = (
        "import sys; sys.modules['cupy'] = None; sys.modules['numba.cuda'] = None\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import numpy as np\n"
        "import metacore.kernels.distance as K\n"
        "assert 'numba-cuda' not in K.available_backends()\n"
        "assert 'cupy' not in K.available_backends()\n"
        "q = np.ones((1, 2, 3)); s = np.zeros((1, 4, 3))\n"
        "assert (K.pairwise_sqeuclidean(q, s) == 3).all()\n"
        "for name in ('cupy', 'numba-cuda'):\n"
        "    try:\n"
        "        K.pairwise_l1(q, s, backend=name)\n"
        "    except ImportError as err:\n"
        "        print('ERR', err)\n"
        "    else:\n"
        "        raise SystemExit(name + ' did not fail')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "ERR pairwise_l1: backend 'cupy' needs the package 'cupy-cuda13x'" in res.stdout
    assert "ERR pairwise_l1: backend 'numba-cuda' needs the package 'numba-cuda'" in res.stdout
    assert "pip install" in res.stdout


def test_array_kinds():
    assert _dispatch.array_kind(np.zeros(3)) == "host"
    assert _dispatch.array_kind(None) == "host"
    assert _dispatch.array_kind([1.0, 2.0]) == "host"
    assert _dispatch.array_kind(FakeDeviceArray((2,), np.float32)) == "numba-cuda"
    assert _dispatch.array_kind(FakeCupyArray((2,), np.float32)) == "cupy"
    dev, cp_ = FakeDeviceArray((2,), np.float32), FakeCupyArray((2,), np.float32)
    assert _dispatch.device_kind([np.zeros(2), dev]) == "numba-cuda"
    assert _dispatch.device_kind([dev, cp_]) == "cupy"
    assert _dispatch.device_kind([np.zeros(2), None]) == "host"


@pytest.mark.parametrize("fake, backend", [(FakeDeviceArray, "numba-cuda"),
                                           (FakeCupyArray, "cupy")])
def test_auto_follows_device_arrays(fake, backend):
    """'auto' with device arrays goes to the matching device backend (here that backend
    cannot run, so the error names it: the arrays are never copied to the host)."""
    x = fake((1, 2, 3), np.float32)
    try:
        mod = KD._backend("myop", "auto", x, np.zeros(1))
    except ImportError as err:
        assert f"myop: backend {backend!r}" in str(err)
    else:
        assert mod.__name__ == "metacore.kernels.distance_" + \
            ("cuda" if backend == "numba-cuda" else "cupy")


@pytest.mark.parametrize("name", ["numba", "reference"])
def test_host_backends_refuse_device_arrays(name):
    x = FakeCupyArray((1, 2, 3), np.float64)
    with pytest.raises(TypeError, match=rf"myop: backend '{name}' runs on the host and was "
                                        rf"given cupy device arrays"):
        KD._backend("myop", name, x)


def test_unknown_backend_lists_every_name():
    with pytest.raises(ValueError, match=r"unknown backend 'cuda'.*'cupy'.*'numba-cuda'"):
        KD._backend("myop", "cuda")


def test_device_aware_checks():
    chk, ichk = _dispatch.check_float_array, _dispatch.check_int_array
    x = FakeDeviceArray((2, 3, 4), np.float32)
    assert chk("op", "q", x, ndim=3, dtype=np.float32) is x
    assert chk("op", "q", x, shape=(2, None, 4)) is x
    with pytest.raises(TypeError, match="op: q has dtype float32, expected float64"):
        chk("op", "q", x, dtype=np.float64)
    with pytest.raises(ValueError, match=r"op: q must have 2 dimensions, got shape \(2, 3, 4\)"):
        chk("op", "q", x, ndim=2)
    with pytest.raises(ValueError, match=r"op: q must have shape \(2, \*, 5\)"):
        chk("op", "q", x, shape=(2, None, 5))
    with pytest.raises(TypeError, match="float32 or float64"):
        chk("op", "q", FakeDeviceArray((2,), np.int32))
    y = FakeDeviceArray((2, 3), np.int64)
    assert ichk("op", "y", y, shape=(2, 3), low=0, high=5) is y
    with pytest.raises(TypeError, match="integer dtype"):
        ichk("op", "y", FakeDeviceArray((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"op: y must have shape \(2, 4\)"):
        ichk("op", "y", y, shape=(2, 4))
    # NumPy arrays go through metacore.validate unchanged, finiteness included
    with pytest.raises(ValueError, match="non-finite"):
        chk("op", "q", np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="below the allowed minimum"):
        ichk("op", "y", np.array([-1, 0]), low=0)


def _usable(K, name):
    try:
        K._backend("t", name)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("fake, backend", [(FakeDeviceArray, "numba-cuda"),
                                           (FakeCupyArray, "cupy")])
def test_public_entry_points_route_device_arrays(fake, backend):
    """The public ops check device arrays with the device-aware checks and hand them to the
    dispatch: a host backend refuses them, a bad shape is reported as for NumPy arrays, and
    'auto' goes to the device backend of the arrays (here it cannot run, so the error names
    it; nothing is copied to the host). The simulator runs the real thing
    (tests/cuda_sim_cases.py::test_public_entry_points_route_device_arrays)."""
    q, s = fake((1, 5, 3), np.float32), fake((1, 4, 3), np.float32)
    y, g = fake((1, 5), np.int64), fake((1, 5, 4), np.float32)
    with pytest.raises(TypeError, match=r"pairwise_l1: backend 'numba' runs on the host and "
                                        rf"was given {backend} device arrays"):
        KD.pairwise_l1(q, s, backend="numba")
    with pytest.raises(TypeError, match="protonet_loss: backend 'reference' runs on the host"):
        KD.protonet_loss(q, s, y, backend="reference")
    with pytest.raises(ValueError, match=r"pairwise_l1_backward: g must have shape \(1, 5, 4\)"):
        KD.pairwise_l1_backward(fake((1, 4, 5), np.float32), q, s)
    with pytest.raises(TypeError, match="s has dtype float64, expected float32"):
        KD.pairwise_cosine(q, fake((1, 4, 3), np.float64))
    T, B, H, S, W = 2, 1, 1, 4, 3
    largs = [fake(shp, np.float32) for shp in ((T, B, H, W), (H,), (B, S, W), (B, H, S),
                                               (B, S))]
    with pytest.raises(TypeError, match="lrua_forward: backend 'numba' runs on the host"):
        KL.lrua_forward(*largs, 0.9, backend="numba")
    with pytest.raises(ValueError, match=r"read0 must have shape \(1, 1, 4\)"):
        KL.lrua_forward(*largs[:3], fake((B, H, S + 1), np.float32), largs[4], 0.9)
    step = [fake((B, H, W), np.float32)] + largs[1:]
    with pytest.raises(TypeError, match="lrua_step_forward: backend 'numba' runs on the host"):
        KL.lrua_step_forward(*step, 0.9, backend="numba")
    with pytest.raises(TypeError, match="lrua_forward_tape: backend 'numba' runs on the host"):
        KL.lrua_forward_tape(*largs, 0.9, backend="numba")
    if _usable(KD, backend):
        return                            # a GPU here: the fakes must not reach the kernels
    for call, op in ((lambda: KD.pairwise_sqeuclidean(q, s), "pairwise_sqeuclidean"),
                     (lambda: KD.protonet_loss(q, s, y), "protonet_loss"),
                     (lambda: KD.pairwise_l1_backward(g, q, s), "pairwise_l1_backward"),
                     (lambda: KL.lrua_forward(*largs, 0.9), "lrua_forward"),
                     (lambda: KL.lrua_step_forward(*step, 0.9), "lrua_step_forward"),
                     (lambda: KL.lrua_forward_tape(*largs, 0.9), "lrua_forward_tape")):
        with pytest.raises(ImportError, match=rf"^{op}: backend {backend!r} "):
            call()
