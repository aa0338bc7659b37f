"""Every CUDA kernel compiled for compute capabilities 8.0 and 9.0 without a GPU.

* Numba CUDA kernels (kernels/*_cuda.py): lowered once per kernel and dtype, then turned
  into PTX by NVVM for sm_80 and sm_90 (what numba.cuda.compile_ptx does for one cc; the
  lowering is shared because it is the slow, cc-independent part). One kernel also goes
  through the public numba.cuda.compile_ptx for both ccs, so the shortcut is checked
  against the documented API.
* CuPy raw kernels (kernels/*.cu): compiled by NVRTC (cuda-bindings' nvrtc module and the
  nvidia-cuda-nvrtc wheel; no device or driver needed) for compute_80 and compute_90 with
  the wrapper's own options; the PTX's entry points must be exactly the wrapper's
  ENTRY_POINTS in both dtypes (a kernel in the source but not in ENTRY_POINTS fails, so it
  cannot escape the wrapper's list and the tests built on it).
* kernel_signatures (what the PTX test compiles) must list every kernel of the module's
  kernel dict and every @cuda.jit in its source (device functions, @cuda.jit(device=True),
  are compiled inside the kernels that call them); tests/cuda_sim_cases.py checks that every
  kernel of that dict runs under the simulator in both dtypes.
Skips with the reason when the `cuda` extra (numba-cuda, cupy, cuda-bindings) is missing.
Without the numba-cuda package, `import numba.cuda` still succeeds: it is numba's own
deprecated CUDA target, which asks the driver for the device's compute capability while
compiling a kernel's device functions, and so cannot compile PTX on a machine without a GPU.
These tests need the numba-cuda distribution itself.
"""
import contextlib
import importlib
import importlib.metadata
import os
import re

import numpy as np
import pytest

import metacore  # noqa: F401  (aliases kernels/ and reference/ from a checkout)

CCS = ((8, 0), (9, 0))
DTYPES = (np.float32, np.float64)
NUMBA_MODULES = ("metacore.kernels.distance_cuda", "metacore.kernels.lrua_cuda")
CUPY_MODULES = ("metacore.kernels.distance_cupy", "metacore.kernels.lrua_cupy")


def _import(name, why):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        pytest.skip(f"{why} ({err}); install the cuda extra: pip install -e '.[cuda]'")


def _need_numba_cuda():
    try:
        importlib.metadata.version("numba-cuda")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("numba-cuda is not installed (numba's bundled CUDA target needs a driver "
                    "to compile device functions); install the cuda extra: "
                    "pip install -e '.[cuda]'")
    return _import("numba.cuda", "numba-cuda is installed but numba.cuda does not import")


class _NoDevice:
    """Stands in for numba.cuda's current device while a kernel is lowered: numba-cuda
    types a kernel's call to a device function (@cuda.jit(device=True)) by compiling that
    function for the current device's compute capability, which needs a driver; here that
    capability is the one being compiled for."""

    def __init__(self, cc):
        self.compute_capability = cc


@contextlib.contextmanager
def _device_functions_for(cc):
    from numba.cuda import dispatcher
    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: _NoDevice(cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


def _numba_ptx(disp, sig):
    """{cc: ptx} for one kernel; one lowering, NVVM once per cc."""
    with _device_functions_for(CCS[0]):
        return _numba_ptx_lowered(disp, sig)


def _numba_ptx_lowered(disp, sig):
    from numba.cuda import compiler
    lower = getattr(compiler, "_compile_pyfunc_with_fixup", None)
    if lower is None:           # internals moved: the public API, one full compile per cc
        from numba import cuda
        return {cc: cuda.compile_ptx(disp.py_func, sig, cc=cc)[0] for cc in CCS}
    lib, _ = lower(disp.py_func, sig, debug=None, lineinfo=False, device=False,
                   fastmath=False, cc=CCS[0], opt=None, abi="numba", abi_info=None,
                   forceinline=False, launch_bounds=None, lto=False)
    out = {}
    for cc in CCS:
        codes = lib.get_asm_strs(cc=cc)
        assert len(codes) == 1
        out[cc] = codes[0]
    return out


def _check_ptx(ptx, cc, what):
    assert f".target sm_{cc[0]}{cc[1]}" in ptx, f"{what}: no .target sm_{cc[0]}{cc[1]}"
    assert re.search(r"\.entry\s+\S+", ptx), f"{what}: no kernel entry in the PTX"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("modname", NUMBA_MODULES)
def test_numba_cuda_kernels_compile_to_ptx(modname, dtype):
    _need_numba_cuda()
    mod = _import(modname, "the Numba CUDA backend does not import")
    if getattr(mod, "_SIM", False) or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1 in this process: the simulator compiles nothing")
    sigs = mod.kernel_signatures(dtype)
    assert sigs, "no kernels listed"
    for name, disp, sig in sigs:
        ptx = _numba_ptx(disp, sig)
        for cc in CCS:
            _check_ptx(ptx[cc], cc, f"{modname}.{name} {np.dtype(dtype)}")
            if name in ("pair_fwd", "pair_grad"):
                assert ".shared" in ptx[cc], f"{name}: the tiles are not in shared memory"


@pytest.mark.parametrize("modname", NUMBA_MODULES)
def test_kernel_signatures_list_every_kernel(modname):
    """No kernel escapes the PTX test: the signature list, the kernel dict and the
    @cuda.jit decorators in the source name the same kernels, for both dtypes."""
    _need_numba_cuda()
    mod = _import(modname, "the Numba CUDA backend does not import")
    with open(mod.__file__, encoding="utf-8") as f:
        source = f.read()
    # kernels: every @cuda.jit but the device functions (@cuda.jit(device=True)), which
    # are compiled into the kernels that call them
    kernel = r"^\s*@cuda\.jit\b(?![^\n]*device=True)"
    jitted = set(re.findall(kernel + r"[^\n]*\n\s*def\s+(\w+)", source, re.M))
    assert len(jitted) == len(re.findall(kernel, source, re.M)), \
        f"{modname}: a @cuda.jit this test cannot pair with its def"
    for dtype in DTYPES:
        listed = [name for name, _, _ in mod.kernel_signatures(dtype)]
        assert len(listed) == len(set(listed)), f"{modname}: duplicates in {listed}"
        assert set(listed) == set(mod.kernels(dtype)) == jitted, \
            (f"{modname} {np.dtype(dtype)}: signatures {sorted(listed)}, kernel dict "
             f"{sorted(mod.kernels(dtype))}, @cuda.jit in the source {sorted(jitted)}")


def test_public_compile_ptx_agrees():
    """numba.cuda.compile_ptx itself, for both ccs, on the tiled forward kernel."""
    cuda = _need_numba_cuda()
    mod = _import("metacore.kernels.distance_cuda", "the Numba CUDA backend does not import")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("NUMBA_ENABLE_CUDASIM=1 in this process")
    name, disp, sig = mod.kernel_signatures(np.float32)[0]
    for cc in CCS:
        ptx, _ = cuda.compile_ptx(disp.py_func, sig, cc=cc)
        _check_ptx(ptx, cc, name)


def _nvrtc_compile(source, name, options, arch):
    from cuda.bindings import nvrtc
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, err
    try:
        opts = [o.encode() for o in options] + [f"--gpu-architecture={arch}".encode()]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        _, n = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * n
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS, \
            f"{name} for {arch}: {err}\n{log.decode(errors='replace')}"
        _, n = nvrtc.nvrtcGetPTXSize(prog)
        ptx = b" " * n
        nvrtc.nvrtcGetPTX(prog, ptx)
        return ptx.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


@pytest.mark.parametrize("modname", CUPY_MODULES)
def test_cu_sources_compile_with_nvrtc(modname):
    _import("cuda.bindings.nvrtc", "cuda-bindings (NVRTC's Python binding) is not installed")
    mod = _import(modname, "cupy is not installed")
    with open(mod.SOURCE, encoding="utf-8") as f:
        source = f.read()
    for arch in ("compute_80", "compute_90"):
        ptx = _nvrtc_compile(source, os.path.basename(mod.SOURCE), mod.OPTIONS, arch)
        entries = set(re.findall(r"\.entry\s+(\w+)", ptx))
        want = {f"{e}_{sfx}" for e in mod.ENTRY_POINTS for sfx in ("f32", "f64")}
        assert want <= entries, f"{modname} {arch}: missing entry points {want - entries}"
        assert entries <= want, (f"{modname} {arch}: entry points {entries - want} are in "
                                 f"{os.path.basename(mod.SOURCE)} but not in ENTRY_POINTS")
        assert f".target sm_{arch[-2:]}" in ptx


def test_every_cu_file_is_compiled_here():
    """A new .cu file must get a wrapper listed in CUPY_MODULES (and so the test above)."""
    kdir = os.path.dirname(importlib.util.find_spec("metacore.kernels").origin)
    sources = sorted(f for f in os.listdir(kdir) if f.endswith(".cu"))
    listed = sorted(m.rsplit(".", 1)[1].replace("_cupy", ".cu") for m in CUPY_MODULES)
    assert sources == listed, f".cu files {sources} vs wrappers tested {listed}"
