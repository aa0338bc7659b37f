"""The CuPy backends' CUDA C (kernels/*.cu) and their wrappers, run on the CPU against
reference/: the closest a machine without a GPU gets to running them.

How: the .cu source is compiled by the host C++ compiler with a small shim (below) that
maps the CUDA built-ins onto plain C++: threadIdx / blockIdx are thread_local, __shared__
is a function-level static (blocks run one after another, so a block's threads share it),
and __syncthreads is a std::barrier over the block's threads. A launch runs every block in
turn with one OS thread per CUDA thread (Python threads calling into the library through
ctypes, which releases the GIL, so the barrier works). The wrapper modules
(kernels/distance_cupy.py, kernels/lrua_cupy.py) are loaded as fresh copies whose `cupy` is
NumPy and whose kernel lookup `_fn` is that launcher, so the wrappers' argument order,
scalar casts, grids and allocations are exercised end to end with the real TILE = 16.

What this does not show: GPU memory-model behaviour (a missing __syncthreads could still
pass here) and NVRTC-specific compilation (tests/test_cuda_compile.py covers that).
Skips with the reason when no C++20 compiler (g++ or c++) is on the PATH.
"""
import ctypes
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import types

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)
from metacore.reference import distance as RD
from metacore.reference import lrua as RL
from _cuda_helpers import assert_close, check_protonet, ddata, lassert, ldata, magnitudes, steps

KDIR = os.path.dirname(importlib.util.find_spec("metacore.kernels").origin)
CXX = shutil.which("g++") or shutil.which("c++")

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
struct emu_uint3 { unsigned x, y, z; };
thread_local emu_uint3 threadIdx, blockIdx;
emu_uint3 blockDim, gridDim;
static std::barrier<>* emu_bar = nullptr;
static inline void __syncthreads() { emu_bar->arrive_and_wait(); }
#define __global__
#define __device__
#define __shared__ static
using std::min; using std::max; using std::sqrt; using std::exp; using std::log;
using std::fabs; using std::tanh;
extern "C" void emu_config(unsigned gx, unsigned gy, unsigned gz,
                           unsigned bx, unsigned by, unsigned bz) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    delete emu_bar;
    emu_bar = new std::barrier<>(bx * by * bz);
}
extern "C" void emu_ids(unsigned tx, unsigned ty, unsigned tz,
                        unsigned bx, unsigned by, unsigned bz) {
    threadIdx = {tx, ty, tz};
    blockIdx = {bx, by, bz};
}
#include "SOURCE"
"""

_libs = {}


def _library(cu_name, options):
    """Compile kernels/<cu_name> with the shim into a shared library (cached by content)."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++ or c++) on the PATH to run the .cu sources on the CPU")
    src = os.path.join(KDIR, cu_name)
    with open(src, "rb") as f:
        key = hashlib.sha256(f.read() + SHIM.encode() + " ".join(options).encode()).hexdigest()
    if key in _libs:
        return _libs[key]
    tmp = tempfile.mkdtemp(prefix="metacore_cu_emu_")
    shim = os.path.join(tmp, "shim.cpp")
    with open(shim, "w") as f:
        f.write(SHIM.replace("SOURCE", src))
    out = os.path.join(tmp, "emu.so")
    defines = [o for o in options if o.startswith("-D")]
    cmd = [CXX, "-std=c++20", "-O0", "-shared", "-fPIC", "-pthread", *defines, shim, "-o", out]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and "barrier" in res.stderr:
        pytest.skip(f"the C++ compiler has no std::barrier (C++20): {res.stderr[:300]}")
    assert res.returncode == 0, f"{cu_name} does not compile as C++:\n{res.stderr[:4000]}"
    _libs[key] = ctypes.CDLL(out)
    shutil.rmtree(tmp, ignore_errors=True)        # loaded: the file is no longer needed
    return _libs[key]


def _cargs(args):
    conv = []
    for a in args:
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous, "a kernel got a non-contiguous array"
            conv.append(ctypes.c_void_p(a.ctypes.data))
        elif isinstance(a, np.int32):
            conv.append(ctypes.c_int(int(a)))
        elif isinstance(a, np.int64):
            conv.append(ctypes.c_longlong(int(a)))
        elif isinstance(a, np.float32):
            conv.append(ctypes.c_float(float(a)))
        elif isinstance(a, np.float64):
            conv.append(ctypes.c_double(float(a)))
        else:
            raise TypeError(f"kernel argument of type {type(a).__name__}: the wrapper must "
                            f"cast every scalar (np.int32, np.float32, ...)")
    return conv


def _launcher(lib):
    """The emulated `_fn(name, dtype)`: returns kernel(grid, block, args)."""
    def fn(name, dtype):
        sfx = {np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}[np.dtype(dtype)]
        kern = getattr(lib, f"{name}_{sfx}")
        kern.restype = None

        def launch(grid, block, args):
            grid = tuple(grid) + (1,) * (3 - len(grid))
            block = tuple(block) + (1,) * (3 - len(block))
            cargs = _cargs(args)
            lib.emu_config(*(ctypes.c_uint(v) for v in grid + block))
            errors = []

            def run(ids):
                try:
                    lib.emu_ids(*(ctypes.c_uint(v) for v in ids))
                    kern(*cargs)
                except Exception as err:          # surfaces in the main thread
                    errors.append(err)

            for bz in range(grid[2]):
                for by in range(grid[1]):
                    for bx in range(grid[0]):
                        ths = [threading.Thread(target=run, args=((tx, ty, tz, bx, by, bz),))
                               for tz in range(block[2]) for ty in range(block[1])
                               for tx in range(block[0])]
                        for t in ths:
                            t.start()
                        for t in ths:
                            t.join()
            assert not errors, errors
        return launch
    return fn


def _fake_cupy():
    """NumPy dressed as the few cupy names the wrappers use."""
    m = types.ModuleType("cupy")
    for name in ("empty", "empty_like", "ones", "asarray", "ascontiguousarray", "int64",
                 "ndarray"):
        setattr(m, name, getattr(np, name))
    m.asnumpy = np.asarray
    return m


def _emulated(modname, cu_name):
    """A fresh copy of kernels/<modname>.py with cupy = NumPy and _fn = the CPU launcher."""
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = _fake_cupy()
    try:
        spec = importlib.util.spec_from_file_location("emu_" + modname,
                                                      os.path.join(KDIR, modname + ".py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            del sys.modules["cupy"]
        else:
            sys.modules["cupy"] = saved
    mod._fn = _launcher(_library(cu_name, mod.OPTIONS))
    if hasattr(mod, "ROWS"):
        mod.ROWS = 8        # one-thread-per-row kernels: any block size; fewer OS threads
    return mod


@pytest.fixture(scope="module")
def dcu():
    return _emulated("distance_cupy", "distance.cu")


@pytest.fixture(scope="module")
def lcu():
    return _emulated("lrua_cupy", "lrua.cu")


OPS = ("sqeuclidean", "l1", "cosine")
# (T, Q, N, D): 17, 18, 19 cross the 16-wide tiles; size-1 axes; no queries
DSHAPES = [(1, 17, 18, 19), (1, 1, 1, 1), (2, 1, 5, 1), (1, 3, 1, 20), (2, 0, 3, 2)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", DSHAPES)
def test_distance_cu(dcu, shape, dtype):
    """Every kernel of distance.cu through the wrapper: pair_fwd, row_norms, cos_div
    (forward), pair_grad both ways, cos_prep, cos_fix (backward), softmax_ce, row_mean."""
    T, Q, N, D = shape
    q, s, g = ddata(shape, dtype, seed=31)
    q64, s64, g64 = (x.astype(np.float64) for x in (q, s, g))
    for op in OPS:
        c_out, c_dq, c_ds = steps(op, shape)
        m_out, m_dq, m_ds = magnitudes(op, g, q, s)
        out = getattr(dcu, "pairwise_" + op)(q, s)
        assert out.dtype == dtype
        assert_close(op, out, getattr(RD, "pairwise_" + op)(q64, s64), m_out, dtype, c_out)
        dq, ds = getattr(dcu, "pairwise_" + op + "_backward")(g, q, s)
        rdq, rds = getattr(RD, "pairwise_" + op + "_backward")(g64, q64, s64)
        assert_close(op + " dq", dq, rdq, m_dq, dtype, c_dq)
        assert_close(op + " ds", ds, rds, m_ds, dtype, c_ds)
    if Q and N:
        rng = np.random.default_rng(33)
        y = rng.integers(0, N, size=(T, Q))
        gloss = rng.standard_normal(T).astype(dtype)
        # every metric on the small shapes; on the tile-crossing one (slow here: one OS
        # thread per CUDA thread) the metric only changes kernels tested above
        for metric in OPS if Q * N * D < 200 else OPS[:1]:
            got = dcu.protonet_loss(q, s, y, gloss=gloss, metric=metric, scale=0.7)
            ref = RD.protonet_loss(q64, s64, y, gloss=gloss.astype(np.float64),
                                   metric=metric, scale=0.7)
            check_protonet(got, ref, q, s, gloss, 0.7, dtype)


def test_distance_cu_label_guard(dcu):
    """A label outside [0, N) that reaches the kernel gives NaN and pred -1, not a read
    out of bounds (the public entry point rejects it before that)."""
    q = np.ones((1, 2, 3))
    s = np.zeros((1, 4, 3))
    loss, dq, _, pred = dcu.protonet_loss(q, s, np.array([[0, 7]]))
    assert np.isnan(loss[0]) and np.isnan(dq[0, 1]).all() and pred[0, 1] == -1


# (T, B, H, S, W): S = 130 and W = 129 cross the 128-thread stride; H = S; W = 1
LSHAPES = [((3, 2, 3, 130, 5), False), ((2, 1, 1, 1, 1), True), ((2, 2, 2, 2, 129), True),
           ((4, 1, 2, 5, 1), False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, per_step", LSHAPES)
def test_lrua_cu(lcu, shape, per_step, dtype):
    """Every kernel of lrua.cu through the wrapper: gates, forward (two and T + 1
    memories), backward, sum_tb."""
    T, B, H, S, W = shape
    *args, dreads = ldata(shape, dtype, 32, per_step)
    c = 4 * T * (S + W + H)
    args64 = [x.astype(np.float64) for x in args]         # the reference sees the same values
    got = lcu.lrua_forward(*args, 0.9)
    ref = RL.lrua_forward(*args64, 0.9)
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got, ref):
        assert a.dtype == dtype, name
        if name == "w_lu":
            np.testing.assert_array_equal(a, r)
        else:
            lassert(name, a, r, dtype, c)
    got = lcu.lrua_backward(dreads, *args, 0.9)
    ref = RL.lrua_backward(dreads.astype(np.float64), *args64, 0.9)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"), got, ref):
        assert a.dtype == dtype and a.shape == r.shape, name
        lassert(name, a, r, dtype, c)


def test_lrua_cu_per_head_rule_with_ties(lcu):
    """write_rule='per_head' through lrua.cu: the rank of each slot in the (usage, index)
    order, a three-way tie at the minimum going to the lower indices, as the reference's
    stable sort; whole episode and step pair, float64."""
    T, B, H, S, W = 3, 2, 3, 9, 5
    *args, dreads = ldata((T, B, H, S, W), np.float64, 36, True)
    args[4][0] = [0.5, 0.2, 0.2, 0.9, 0.2, 0.7, 0.3, 0.8, 0.1]
    c = 4 * T * (S + W + H)
    got = lcu.lrua_forward(*args, 0.9, write_rule="per_head")
    ref = RL.lrua_forward(*args, 0.9, write_rule="per_head")
    np.testing.assert_array_equal(got[4], ref[4])
    for name, a, r in zip(("reads", "w_r", "w_w", "w_u", "w_lu", "memory"), got, ref):
        lassert(name, a, r, np.float64, c)
    for name, a, r in zip(("dkeys", "dalpha", "dmemory0", "dread0"),
                          lcu.lrua_backward(dreads, *args, 0.9, write_rule="per_head"),
                          RL.lrua_backward(dreads, *args, 0.9, write_rule="per_head")):
        lassert(name, a, r, np.float64, c)
    step = [args[0][0], args[1][0], args[2], args[3], args[4]]
    grads = [dreads[0], args[2][::-1].copy(), args[3][:, ::-1].copy()]
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"),
                          lcu.lrua_step_forward(*step, 0.9, write_rule="per_head"),
                          RL.lrua_step_forward(*step, 0.9, write_rule="per_head")):
        lassert(name, a, r, np.float64, c)
    for name, a, r in zip(("dkey", "dalpha", "dmemory_prev", "dw_r_prev"),
                          lcu.lrua_step_backward(*grads, *step, 0.9, write_rule="per_head"),
                          RL.lrua_step_backward(*grads, *step, 0.9, write_rule="per_head")):
        lassert(name, a, r, np.float64, c)


# (B, H, S, W): S = 130 and W = 129 cross the 128-thread stride; H = S; S = W = 1
STEP_SHAPES = [((2, 3, 130, 5), False), ((1, 1, 1, 1), True), ((2, 2, 2, 129), True),
               ((3, 2, 5, 1), False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape, per_episode", STEP_SHAPES)
def test_lrua_step_cu(lcu, shape, per_episode, dtype):
    """The step pair of lrua.cu through the wrapper: gates, lrua_step_forward,
    lrua_step_backward (forward rerun and reverse in one kernel), sum_tb; bound
    eps(dtype) 4 (S + W + H) max|r| per array (T = 1)."""
    B, H, S, W = shape
    keys, alpha, memory0, read0, usage0, dreads = ldata((1, B, H, S, W), dtype, 34,
                                                        per_episode)
    rng = np.random.default_rng(35)
    args = [keys[0], alpha[0] if per_episode else alpha, memory0, read0, usage0]
    grads = [dreads[0], rng.standard_normal((B, S, W)).astype(dtype),
             rng.standard_normal((B, H, S)).astype(dtype)]
    a64 = [x.astype(np.float64) for x in args]
    g64 = [x.astype(np.float64) for x in grads]
    c = 4 * (S + W + H)
    got = lcu.lrua_step_forward(*args, 0.9)
    for name, a, r in zip(("read", "memory", "w_r", "w_w", "w_u"), got,
                          RL.lrua_step_forward(*a64, 0.9)):
        assert a.dtype == dtype and a.shape == r.shape, name
        lassert(name, a, r, dtype, c)
    got = lcu.lrua_step_backward(*grads, *args, 0.9)
    for name, a, r in zip(("dkey", "dalpha", "dmemory_prev", "dw_r_prev"), got,
                          RL.lrua_step_backward(*g64, *a64, 0.9)):
        assert a.dtype == dtype and a.shape == r.shape, name
        lassert(name, a, r, dtype, c)


def test_lrua_step_cu_wrapper_checks(lcu):
    """CuPy checks nothing at launch, so the wrapper does: shapes the kernels index by."""
    keys, alpha, memory0, read0, usage0, _ = ldata((1, 2, 2, 5, 3), np.float64, 36, False)
    with pytest.raises(ValueError, match=r"lrua_step_forward: w_r_prev must have shape "
                                         r"\(2, 2, 5\)"):
        lcu.lrua_step_forward(keys[0], alpha, memory0, read0[:, :, :4], usage0, 0.9)
    with pytest.raises(ValueError, match=r"lrua_step_forward: alpha must have shape"):
        lcu.lrua_step_forward(keys[0], alpha[:1], memory0, read0, usage0, 0.9)
