"""Optimization-based meta-learning: MAML (exact second order), first-order MAML, Meta-SGD
and Reptile, each over a whole meta-batch of tasks at once (theta (T, P))."""
from metacore.algorithms.maml import (MetaGradient, adapt, fomaml_gradient, maml_gradient,
                                      meta_objective)
from metacore.algorithms.reptile import reptile_direction, reptile_direction_serial

__all__ = ["MetaGradient", "adapt", "fomaml_gradient", "maml_gradient", "meta_objective",
           "reptile_direction", "reptile_direction_serial"]
