"""The switch between the Numba kernels of the Conv-4 layers and their NumPy code.

The layers in `metacore.layers` (conv2d, batchnorm, relu, maxpool) keep their signatures,
input checks and cache formats; when `numba_kernels()` returns a module they hand the
arithmetic to it (`metacore.kernels.convnet_numba`), otherwise they run their own NumPy code,
which stays the fallback and the ground truth the kernels are tested against.

Why kernels: a Conv-4 episode is dominated by memory-bound elementwise passes (batch norm
statistics and normalisation, the max-pool argmax and scatter, im2col / col2im copies of
(M, 9 C) matrices), each a separate NumPy pass over arrays of tens of MB. The kernels do each
op in one or two passes, and the convolution im2col's a few images at a time into a buffer
that stays in cache, so the GEMM reads it from L2 instead of memory.

numba is imported lazily, on the first call that could use it; an ImportError switches this
process to NumPy for good. Force NumPy with the environment variable METACORE_NO_NUMBA=1 (read
at import) or, in a test or a benchmark, with `use_numba(False)` / `with numpy_only(): ...`.
"""
import contextlib
import os

_FLOAT = ("float32", "float64")
_state = {"enabled": os.environ.get("METACORE_NO_NUMBA", "").strip().lower()
          not in ("1", "true", "yes"),
          "module": None, "failed": False}


def use_numba(flag):
    """Turn the Numba kernels on (True) or off (False) for this process; returns the old flag."""
    old = _state["enabled"]
    _state["enabled"] = bool(flag)
    return old


@contextlib.contextmanager
def numpy_only():
    """Run the block on the NumPy code of the layers (for comparisons and benchmarks)."""
    old = use_numba(False)
    try:
        yield
    finally:
        use_numba(old)


def numba_kernels():
    """The kernel module metacore.kernels.convnet_numba, or None (switched off, or numba
    cannot be imported)."""
    if not _state["enabled"] or _state["failed"]:
        return None
    if _state["module"] is None:
        try:
            from . import convnet_numba
        except ImportError:
            _state["failed"] = True
            return None
        _state["module"] = convnet_numba
    return _state["module"]


def kernels_for(*arrays):
    """numba_kernels() when every array is float32 or float64 of one dtype, else None."""
    k = numba_kernels()
    if k is None:
        return None
    dt = arrays[0].dtype
    if dt.name not in _FLOAT or any(a.dtype != dt for a in arrays[1:]):
        return None
    return k
