"""Input checks shared by every op, host (NumPy) arrays: bad input raises an error naming the
op, the argument, and what was expected against what was received. Never a silent wrong
answer.

They live here, in kernels/, because the kernels need them and kernels/ imports nothing of
metacore (docs/ARCHITECTURE.md, "What imports what"); metacore.validate re-exports them under
their usual names for the rest of metacore. NumPy only.
"""
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_float_array(op, name, x, ndim=None, shape=None, dtype=None, finite=True):
    """Check that `x` is a float32/float64 ndarray of the given rank/shape/dtype.

    shape: a tuple whose entries are ints or None (None = any size on that axis).
    dtype: the required dtype (e.g. that of another argument), or None for float32/float64.
    finite: reject NaN/Inf, which would poison every result downstream.
    Returns x unchanged.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: {name} must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32 or float64, got dtype {x.dtype}")
    if dtype is not None and x.dtype != np.dtype(dtype):
        raise TypeError(f"{op}: {name} has dtype {x.dtype}, expected {np.dtype(dtype)} "
                        f"(all arrays of one call share a dtype)")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {x.shape}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {x.shape}")
    if finite and not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{op}: {name} contains {bad} non-finite value(s) (NaN or Inf)")
    return x


def check_int_array(op, name, x, shape=None, low=None, high=None):
    """Check an integer label array: integer dtype, shape, values in [low, high)."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{op}: {name} must be a numpy.ndarray, got {type(x).__name__}")
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{op}: {name} must have an integer dtype, got {x.dtype}")
    if shape is not None:
        if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} must have shape {want}, got {x.shape}")
    if x.size and low is not None and x.min() < low:
        raise ValueError(f"{op}: {name} has value {x.min()} below the allowed minimum {low}")
    if x.size and high is not None and x.max() >= high:
        raise ValueError(f"{op}: {name} has value {x.max()}, must be < {high}")
    return x


def check_steps(op, steps, minimum=1):
    """A number of inner steps: an int >= minimum (bool refused). -> int(steps)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < minimum:
        raise ValueError(f"{op}: steps must be an int >= {minimum}, got {steps!r}")
    return int(steps)


def check_alpha(op, alpha, P, dtype, learned=False):
    """An inner learning rate: a finite scalar >= 0 (returned as float) or a (P,) finite
    array of theta's dtype (Meta-SGD's per-parameter rates, returned unchanged), >= 0 too
    unless `learned`: Meta-SGD learns direction and rate together (Li et al. 2017), so the
    rates of a trained run may be negative, and evaluation accepts them; as an input to the
    meta-gradient or adaptation a negative rate ascends the support loss."""
    if isinstance(alpha, np.ndarray) and alpha.ndim > 0:
        check_float_array(op, "alpha", alpha, shape=(P,), dtype=dtype)
        neg = int(np.count_nonzero(alpha < 0))
        if neg and not learned:
            raise ValueError(f"{op}: alpha has {neg} negative rate(s) (min {alpha.min():g}); "
                             f"the per-parameter rates must be >= 0")
        return alpha
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, (numbers.Real, np.ndarray)):
        raise TypeError(f"{op}: alpha must be a real scalar or a ({P},) array, got "
                        f"{type(alpha).__name__}")
    alpha = float(alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{op}: alpha must be finite and >= 0, got {alpha}")
    return alpha
