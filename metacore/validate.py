"""Input checks shared by every op: bad input raises an error naming the op, the argument,
and what was expected against what was received. Never a silent wrong answer.

The array, step and rate checks are defined in metacore.kernels._validate (kernels/_validate.py),
because the kernels use them too and kernels/ imports nothing of metacore
(docs/ARCHITECTURE.md); they are re-exported here under the names metacore uses."""
import numpy as np

from metacore.kernels._validate import (FLOAT_DTYPES, check_alpha,  # noqa: F401  (re-exported)
                                        check_float_array, check_int_array, check_steps)


def check_same(op, name, a, ref_name, ref):
    """An R-operator or gradient argument must match the array it perturbs."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"{op}: {name} must be a numpy.ndarray, got {type(a).__name__}")
    if a.shape != ref.shape:
        raise ValueError(f"{op}: {name} must have the shape of {ref_name}, {ref.shape}, "
                         f"got {a.shape}")
    if a.dtype != ref.dtype:
        raise TypeError(f"{op}: {name} has dtype {a.dtype}, expected {ref.dtype} "
                        f"(the dtype of {ref_name})")
    return a
