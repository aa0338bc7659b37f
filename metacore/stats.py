"""Summary statistics of evaluation results."""
import math

import numpy as np


def mean_ci(values):
    """-> (mean, 1.96 * std / sqrt(n)) of a 1-D array: the mean and the half-width of its
    normal-approximation 95% confidence interval, as the papers report them."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(1.96 * values.std() / math.sqrt(values.size))
