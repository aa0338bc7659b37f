"""metacore: hand-written, autograd-free meta-learning.

Every forward pass, backward pass and Hessian-vector product (Pearlmutter's R-operator) is
written out by hand in `metacore.layers` and `metacore.losses`, checked against float64 finite
differences and against the plain NumPy ground truth in `metacore.reference`.

`metacore.kernels` and `metacore.reference` are the folders kernels/ and reference/ of the
source tree (setup.py's package_dir installs them under these names; an editable install maps
them the same way). Run from a checkout, where Python finds this folder before any install
(`python -m metacore` puts the working directory first on sys.path), the checkout root is added
to this package's search path below, so that the same two names find the same two folders.
"""
import os as _os

__version__ = "0.1.0"

# A checkout: kernels/ beside this folder and no metacore/kernels inside it (an installed copy
# has that folder). Only then does the package search the checkout root as well.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if (_os.path.isfile(_os.path.join(_root, "kernels", "__init__.py"))
        and _os.path.isfile(_os.path.join(_root, "setup.py"))
        and not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels"))):
    __path__.append(_root)

