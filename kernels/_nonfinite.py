"""What happens when a public entry point is about to return a non-finite loss or gradient.

A NaN or Inf result is never returned silently: under the policy 'raise' (the default) the
entry point raises FloatingPointError, under 'warn' it warns (NonFiniteWarning, a
RuntimeWarning) and returns the values. The message names the op, the dtype, what is
non-finite and a likely cause, e.g. "float32 overflow: try float64 or a smaller alpha".

Policy: set_policy('raise' | 'warn') (also metacore.nonfinite.set_policy), the context
manager policy(...), or the environment variable METACORE_NONFINITE read at the first check.

Cost: all_finite is one pass per array over memory already in cache (np.sum, which is
non-finite whenever an entry is, and an exact count only when it is), no temporaries: about a
microsecond for a (P,) gradient of a few thousand entries. NumPy only: kernels/ imports
nothing from metacore.
"""
import contextlib
import os
import warnings

import numpy as np

POLICIES = ("raise", "warn")
ENV = "METACORE_NONFINITE"
_state = {"policy": None}


class NonFiniteWarning(RuntimeWarning):
    """A non-finite loss or gradient returned under the policy 'warn'."""


def get_policy():
    p = _state["policy"]
    if p is None:
        p = os.environ.get(ENV, "raise").strip().lower() or "raise"
        if p not in POLICIES:
            raise ValueError(f"{ENV}={os.environ.get(ENV)!r}: must be one of {POLICIES}")
        _state["policy"] = p
    return p


def set_policy(policy):
    """'raise' (default): FloatingPointError; 'warn': NonFiniteWarning and return the values.
    -> the previous policy."""
    if policy not in POLICIES:
        raise ValueError(f"nonfinite.set_policy: policy must be one of {POLICIES}, got "
                         f"{policy!r}")
    old = get_policy()
    _state["policy"] = policy
    return old


@contextlib.contextmanager
def policy(p):
    """with policy('warn'): ... -- the policy inside the block, restored after."""
    old = set_policy(p)
    try:
        yield
    finally:
        _state["policy"] = old


def all_finite(a):
    """True if the float array a (any shape) holds no NaN or Inf: one summation pass."""
    if type(a) is not np.ndarray:
        a = np.asarray(a)
    s = a.sum()
    if s - s == 0:                 # finite sum: every entry finite (NaN / Inf propagate)
        return True
    return bool(np.isfinite(a).all())   # an overflowing sum of finite values lands here


def _describe(name, a):
    a = np.asarray(a)
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    kinds = []
    if np.isnan(a).any():
        kinds.append("NaN")
    if np.isinf(a).any():
        kinds.append("Inf")
    return f"{name} ({bad} of {a.size} entries {'/'.join(kinds)})"


def likely_cause(dtype, hint=None):
    """A likely cause for a non-finite result in `dtype`; hint: what to make smaller
    ('alpha', 'learning rate', ...)."""
    smaller = f"a smaller {hint}" if hint else "smaller steps or inputs"
    if np.dtype(dtype) == np.float32:
        return f"float32 overflow: try float64 or {smaller}"
    return f"overflow or divergence: try {smaller}"


def report(op, dtype, outputs, hint=None, context=""):
    """Raise or warn (per the policy) about the non-finite entries of `outputs`, a dict
    name -> array (only the non-finite ones are named). Returns None under 'warn'."""
    names = [_describe(k, v) for k, v in outputs.items() if not all_finite(np.asarray(v))]
    ctx = f" ({context})" if context else ""
    msg = (f"{op}: non-finite {' and '.join(names) or 'result'} in {np.dtype(dtype).name}"
           f"{ctx}; likely cause: {likely_cause(dtype, hint)}. (policy "
           f"'{get_policy()}'; metacore.nonfinite.set_policy('warn') or {ENV}=warn "
           f"to warn instead)")
    if get_policy() == "raise":
        raise FloatingPointError(msg)
    warnings.warn(msg, NonFiniteWarning, stacklevel=3)


def check_outputs(op, dtype, outputs, hint=None, context=""):
    """The boundary check: nothing happens when every array of `outputs` (dict name ->
    array) is finite; otherwise report(...)."""
    for v in outputs.values():
        if not all_finite(np.asarray(v)):
            report(op, dtype, outputs, hint, context)
            return
