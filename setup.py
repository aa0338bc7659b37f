"""metacore: hand-derived meta-learning, no autograd.

Install layout. The source tree keeps the fast kernels (`kernels/`) and the plain NumPy
ground truth (`reference/`) beside the core (`metacore/`), so that each is easy to find.
Installed, they become `metacore.kernels` and `metacore.reference` (package_dir below):
generic top-level names such as `kernels` never land in site-packages.
"""
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# import name -> folder in the source tree
ROOTS = {
    "metacore": "metacore",
    "metacore.kernels": "kernels",
    "metacore.reference": "reference",
}


def find_packages_under(import_root, folder):
    """Every folder with an __init__.py under `folder`, named from `import_root`."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(HERE, folder)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        if "__init__.py" not in filenames:
            dirnames[:] = []
            continue
        rel = os.path.relpath(dirpath, os.path.join(HERE, folder))
        name = import_root if rel == "." else import_root + "." + rel.replace(os.sep, ".")
        found[name] = os.path.relpath(dirpath, HERE).replace(os.sep, "/")
    return found


package_dir = {}
for import_root, folder in ROOTS.items():
    package_dir.update(find_packages_under(import_root, folder))

setup(
    name="metacore",
    version="0.1.0",
    description="Hand-written, autograd-free meta-learning with exact gradients and Hessian-vector products",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=sorted(package_dir),
    package_dir=package_dir,
    package_data={
        "metacore.data": ["*.npz", "*.txt", "*.json"],
        "metacore.kernels": ["*.cu"],
        "metacore.zoo": ["*.npz", "*.json"],
    },
    # scipy: Numba's np.dot / np.matmul call BLAS through scipy.linalg.cython_blas (the
    # distance kernels' GEMM route); without it those calls fail to compile
    install_requires=["numpy>=1.24", "numba>=0.59", "scipy>=1.10"],
    extras_require={
        # pytest-xdist: the suite runs on every core (pytest.ini: -n auto --dist loadfile)
        "test": ["pytest>=7", "pytest-benchmark>=4", "pytest-xdist>=3.6"],
        "cuda": ["numba-cuda[cu13]", "cupy-cuda13x"],
        "plot": ["matplotlib"],
        # mpi4py needs an MPI library from the system: apt-get install openmpi-bin libopenmpi-dev
        "mpi": ["mpi4py>=4"],
        # bench/peers (python -m bench): the frameworks metacore is measured against
        "peers": ["torch==2.13.0", "jax"],
    },
    entry_points={"console_scripts": ["metacore=metacore.cli:main"]},
)
