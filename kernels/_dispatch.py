"""The backend registry shared by every kernel module (kernels/distance.py, kernels/lrua.py).

A kernel module declares {backend name: (module implementing its ops, package it needs or
None)} and the order `auto` tries; `Backends.get(op, name)` imports the module on first use,
so an optional package (numba, cupy) is only needed by whoever asks for its backend.

Device backends. DEVICE_BACKENDS below adds 'numba-cuda' (Numba CUDA kernels) and 'cupy'
(CUDA C raw kernels) to the kernel family whose reference module it names, so a kernel
module gets them without listing them. A device backend module defines `unavailable()`,
returning None when it can run or a sentence saying what is missing (no GPU, no driver);
`get` turns that into BackendUnavailable (an ImportError, so the host fallbacks that catch
ImportError keep working). Device backends never join a module's AUTO_ORDER: for NumPy
arrays 'auto' stays on the host. `get(op, 'auto', *arrays)` looks at the arrays it is
given: CuPy arrays choose 'cupy', other CUDA device arrays (Numba's, anything with
__cuda_array_interface__) 'numba-cuda', so device arrays stay on the device; and a host
backend handed device arrays raises instead of copying them back silently.
"""
import importlib

import numpy as np

from ._validate import FLOAT_DTYPES
from ._validate import check_float_array as _host_float_check
from ._validate import check_int_array as _host_int_check

# reference module of a kernel family -> {device backend name: (module, pip package)}
DEVICE_BACKENDS = {
    "metacore.reference.distance": {
        "numba-cuda": ("metacore.kernels.distance_cuda", "numba-cuda"),
        "cupy": ("metacore.kernels.distance_cupy", "cupy-cuda13x"),
    },
    "metacore.reference.lrua": {
        "numba-cuda": ("metacore.kernels.lrua_cuda", "numba-cuda"),
        "cupy": ("metacore.kernels.lrua_cupy", "cupy-cuda13x"),
    },
}


class BackendUnavailable(ImportError):
    """A backend whose package imports but which cannot run here (no GPU, no driver)."""


def array_kind(x):
    """'host' for NumPy arrays (and anything that is not a device array), 'cupy' for CuPy
    arrays, 'numba-cuda' for other CUDA device arrays. Never imports cupy or numba."""
    if isinstance(x, np.ndarray) or x is None:
        return "host"
    mod = type(x).__module__ or ""
    if mod.startswith("cupy"):
        return "cupy"
    if hasattr(x, "__cuda_array_interface__"):
        return "numba-cuda"
    if mod.startswith("numba.cuda.simulator"):        # the simulator's fake device arrays
        return "numba-cuda"
    return "host"


def device_kind(arrays):
    """The device kind of a call's arrays ('host' if none is on a device); mixing CuPy
    and other device arrays counts as 'cupy' (CuPy takes the others zero-copy)."""
    if all(type(a) is np.ndarray or a is None for a in arrays):    # the host fast path
        return "host"
    kinds = {array_kind(a) for a in arrays}
    if "cupy" in kinds:
        return "cupy"
    if "numba-cuda" in kinds:
        return "numba-cuda"
    return "host"


class Backends:
    def __init__(self, registry, auto_order):
        registry = dict(registry)
        ref = registry.get("reference", (None, None))[0]
        self.device = tuple(DEVICE_BACKENDS.get(ref, {}))
        for name, entry in DEVICE_BACKENDS.get(ref, {}).items():
            registry.setdefault(name, entry)
        self.registry, self.auto_order = registry, tuple(auto_order)
        self._loaded = {}

    def get(self, op, name, *arrays):
        """The module for backend `name` ('auto': by the arrays given, see the module
        docstring; for host arrays the first importable of auto_order); a clear ImportError
        names the missing package, BackendUnavailable (an ImportError) what a device
        backend lacks here, a ValueError an unknown name, a TypeError device arrays handed
        to a host backend."""
        kind = device_kind(arrays)
        if name == "auto":
            if kind != "host":
                return self.get(op, kind, *arrays)
            for cand in self.auto_order:
                try:
                    return self.get(op, cand)
                except ImportError:
                    continue
            raise ImportError(f"{op}: no backend importable among {self.auto_order}")
        if name not in self.registry:
            raise ValueError(f"{op}: unknown backend {name!r}; choose 'auto' or one of "
                             f"{sorted(self.registry)}")
        if kind != "host" and name not in self.device:
            raise TypeError(f"{op}: backend {name!r} runs on the host and was given "
                            f"{kind} device arrays; use backend='auto' or one of "
                            f"{list(self.device)}, or copy the arrays to the host yourself")
        if name not in self._loaded:
            module, needs = self.registry[name]
            try:
                self._loaded[name] = importlib.import_module(module)
            except ImportError as err:
                if needs is None:
                    raise
                raise ImportError(f"{op}: backend {name!r} needs the package {needs!r}, which "
                                  f"could not be imported ({err}); install it (pip install "
                                  f"{needs}) or use backend='reference'") from err
        mod = self._loaded[name]
        if name in self.device:
            why = mod.unavailable()
            if why is not None:
                raise BackendUnavailable(f"{op}: backend {name!r} cannot run on this machine: "
                                         f"{why}; use backend='numba' or 'reference' with "
                                         f"NumPy arrays")
        return mod

    def available(self):
        """Names of the backends that import, and for device backends can run, here."""
        names = []
        for name in self.registry:
            try:
                self.get("available_backends", name)
                names.append(name)
            except ImportError:
                pass
        return names


# ---------------------------------------------------------------- input checks
def check_float_array(op, name, x, ndim=None, shape=None, dtype=None, finite=True):
    """_validate.check_float_array for NumPy arrays; for device arrays the same
    type, rank, shape and dtype checks, but no finiteness scan (that would be a device
    reduction and a synchronisation on every call: the device kernels propagate NaN)."""
    if array_kind(x) == "host":
        return _host_float_check(op, name, x, ndim=ndim, shape=shape, dtype=dtype,
                                 finite=finite)
    dt = np.dtype(x.dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {dt}")
    if dtype is not None and dt != np.dtype(dtype):
        raise TypeError(f"{op}: {name} has dtype {dt}, expected {np.dtype(dtype)} "
                        f"(all arrays of one call share a dtype)")
    shp = tuple(x.shape)
    if ndim is not None and len(shp) != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {shp}")
    if shape is not None:
        if len(shp) != len(shape) or any(s is not None and s != d for s, d in zip(shape, shp)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {shp}")
    return x


def check_int_array(op, name, x, shape=None, low=None, high=None):
    """_validate.check_int_array for NumPy arrays; for device arrays the dtype and
    shape only (the range is guarded inside the kernels: out-of-range labels give NaN)."""
    if array_kind(x) == "host":
        return _host_int_check(op, name, x, shape=shape, low=low, high=high)
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise TypeError(f"{op}: {name} must have an integer dtype, got {x.dtype}")
    shp = tuple(x.shape)
    if shape is not None:
        if len(shp) != len(shape) or any(s is not None and s != d for s, d in zip(shape, shp)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {shp}")
    return x

