"""Sinusoid regression tasks exactly as Finn, Abbeel & Levine 2017, Section 5.1:
amplitude A ~ U[0.1, 5.0], phase p ~ U[0, pi], inputs x ~ U[-5.0, 5.0], y = A sin(x - p)
(the form of the authors' data generator).

Shape letters: T tasks, N points per task (inputs and targets carry one feature: (T, N, 1)).
"""
import numbers
from dataclasses import dataclass

import numpy as np

from metacore.validate import FLOAT_DTYPES

AMP_RANGE = (0.1, 5.0)
PHASE_RANGE = (0.0, np.pi)
INPUT_RANGE = (-5.0, 5.0)


@dataclass
class SinusoidTasks:
    """T tasks: amplitude (T,), phase (T,), and points x, y (T, N, 1) of the given dtype."""
    amplitude: np.ndarray
    phase: np.ndarray
    x: np.ndarray
    y: np.ndarray

    def split(self, n_support):
        """-> (support_x, support_y, query_x, query_y): the first n_support points of each
        task and the rest (views)."""
        n = self.x.shape[1]
        if not isinstance(n_support, numbers.Integral) or not 0 < n_support < n:
            raise ValueError(f"SinusoidTasks.split: n_support must be an int in [1, {n - 1}], "
                             f"got {n_support!r}")
        return (self.x[:, :n_support], self.y[:, :n_support], self.x[:, n_support:],
                self.y[:, n_support:])


def sinusoid_curve(amplitude, phase, x):
    """y = A sin(x - p), broadcast over a leading task axis: amplitude, phase (T,), x (T, N, 1)."""
    return amplitude[:, None, None] * np.sin(x - phase[:, None, None])


def sample_sinusoid(rng, n_tasks, n_points, dtype=np.float32):
    """Draw n_tasks tasks with n_points points each from rng (a numpy Generator).

    Draw order (part of the contract, for reproducible runs): amplitudes (T,), phases (T,),
    then inputs (T, N). The targets are computed in float64 and then cast to dtype."""
    op = "sample_sinusoid"
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{op}: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    for name, value in (("n_tasks", n_tasks), ("n_points", n_points)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: dtype must be float32 or float64, got {dtype}")
    amp = rng.uniform(*AMP_RANGE, size=n_tasks)                       # (T,)
    phase = rng.uniform(*PHASE_RANGE, size=n_tasks)                   # (T,)
    x = rng.uniform(*INPUT_RANGE, size=(n_tasks, n_points, 1))        # (T, N, 1)
    y = sinusoid_curve(amp, phase, x)                                 # (T, N, 1)
    return SinusoidTasks(amp, phase, x.astype(dtype), y.astype(dtype))
