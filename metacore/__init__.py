"""metacore: hand-written, autograd-free meta-learning.

Every forward pass, backward pass and Hessian-vector product (Pearlmutter's R-operator) is
written out by hand in `metacore.layers` and `metacore.losses`, checked against float64 finite
differences and against the plain NumPy ground truth in `metacore.reference`.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def set_nonfinite_policy(policy):
    """'raise' (default) or 'warn': what a public entry point does when its loss or gradient
    is NaN or Inf (metacore.nonfinite). -> the previous policy."""
    from metacore.nonfinite import set_policy
    return set_policy(policy)


def get_nonfinite_policy():
    from metacore.nonfinite import get_policy
    return get_policy()


def _alias_source_folders():
    """Run from a source checkout (not installed), `kernels/` and `reference/` sit beside this
    package. setup.py installs them as `metacore.kernels` / `metacore.reference`; here we give
    them the same names, so a checkout and an install import identically."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for name in ("kernels", "reference"):
        full = __name__ + "." + name
        if full in _sys.modules:
            continue
        if _os.path.isfile(_os.path.join(_os.path.dirname(__file__), name, "__init__.py")):
            continue
        try:
            if _ilu.find_spec(full) is not None:      # installed (regular or editable)
                continue
        except (ImportError, ValueError):
            pass
        init = _os.path.join(root, name, "__init__.py")
        if not _os.path.isfile(init):
            continue
        spec = _ilu.spec_from_file_location(full, init,
                                            submodule_search_locations=[_os.path.dirname(init)])
        module = _ilu.module_from_spec(spec)
        _sys.modules[full] = module
        spec.loader.exec_module(module)


_alias_source_folders()
