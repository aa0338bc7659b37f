"""The backend registry shared by every kernel module (kernels/distance.py, kernels/lrua.py).

A kernel module declares {backend name: (module implementing its ops, package it needs or
None)} and the order `auto` tries; `Backends.get(op, name)` imports the module on first use,
so an optional package (numba, cupy) is only needed by whoever asks for its backend.
"""
import importlib


class Backends:
    def __init__(self, registry, auto_order):
        self.registry, self.auto_order = dict(registry), tuple(auto_order)
        self._loaded = {}

    def get(self, op, name):
        """The module for backend `name` ('auto': the first importable of auto_order);
        a clear ImportError names the missing package, a ValueError an unknown name."""
        if name == "auto":
            for cand in self.auto_order:
                try:
                    return self.get(op, cand)
                except ImportError:
                    continue
            raise ImportError(f"{op}: no backend importable among {self.auto_order}")
        if name not in self.registry:
            raise ValueError(f"{op}: unknown backend {name!r}; choose 'auto' or one of "
                             f"{sorted(self.registry)}")
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
        return self._loaded[name]

    def available(self):
        """Names of the backends that import on this machine."""
        names = []
        for name in self.registry:
            try:
                self.get("available_backends", name)
                names.append(name)
            except ImportError:
                pass
        return names
