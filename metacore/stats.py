"""Summary statistics of evaluation results."""
import math

import numpy as np


def mean_ci(values):
    """-> (mean, 1.96 * std / sqrt(n)) of a 1-D array: the mean and the half-width of its
    normal-approximation 95% confidence interval, as the papers report them.

    Refused: anything but one dimension, and no values (ValueError: a mean of nothing is
    NaN); NaN or Inf values (FloatingPointError: the interval would be NaN, and a result
    that diverged must not print as a number)."""
    values = np.asarray(values, np.float64)
    if values.ndim != 1:
        raise ValueError(f"mean_ci: values must be 1-D, got shape {values.shape}")
    if values.size == 0:
        raise ValueError("mean_ci: values is empty; a mean needs at least one value")
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise FloatingPointError(f"mean_ci: {bad} of {values.size} values are non-finite "
                                 f"(NaN or Inf)")
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(values.size))
