"""Control of the BLAS thread count that NumPy's matmul uses.

Why: meta-learning runs many small GEMMs (one per task: a few hundred rows). A multithreaded
OpenBLAS wakes its threads for each of them, and when the other cores are busy (other
processes, or metacore's own Numba kernels) every call waits on a descheduled thread.
Measured here on a 2-core machine under load: a batch of 32 (490 x 576) @ (576 x 64) float32
GEMMs ran at 4.6 GFLOP/s with 2 OpenBLAS threads and 56 GFLOP/s with 1.

The OpenBLAS that NumPy loaded is found in this process's memory map and its
`*set_num_threads*` entry point is called through ctypes (the same mechanism as
threadpoolctl, without the dependency). Other BLAS libraries are left alone: the functions
then return None and change nothing.
"""
import contextlib
import ctypes
import os

_SETTERS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads",
            "openblas_get_num_threads64_", "openblas_get_num_threads")
_lib = None


def _openblas():
    """The ctypes handle of the OpenBLAS NumPy loaded, or None."""
    global _lib
    if _lib is not None:
        return _lib or None
    import numpy  # noqa: F401  (make sure its BLAS is loaded)
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if "openblas" in os.path.basename(path).lower() and path not in paths:
                    paths.append(path)
    except OSError:
        pass
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if any(hasattr(lib, s) for s in _SETTERS):
            _lib = lib
            return lib
    _lib = False
    return None


def get_blas_threads():
    """The OpenBLAS thread count, or None when it cannot be read."""
    lib = _openblas()
    if lib is None:
        return None
    for name in _GETTERS:
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_int
            return int(fn())
    return None


def set_blas_threads(n):
    """Set the OpenBLAS thread count to n >= 1. Returns the previous count, or None when no
    OpenBLAS was found (nothing changed)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"set_blas_threads: n must be an int >= 1, got {n!r}")
    lib = _openblas()
    if lib is None:
        return None
    previous = get_blas_threads()
    for name in _SETTERS:
        if hasattr(lib, name):
            fn = getattr(lib, name)
            fn.argtypes = [ctypes.c_int]
            fn.restype = None
            fn(n)
            return previous
    return None


@contextlib.contextmanager
def blas_threads(n):
    """with blas_threads(1): ... runs the block with n OpenBLAS threads, then restores."""
    previous = set_blas_threads(n)
    try:
        yield
    finally:
        if previous is not None:
            set_blas_threads(previous)
