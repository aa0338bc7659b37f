"""Task distributions for meta-learning (sinusoid regression; Omniglot lives in
metacore.data.omniglot)."""
from metacore.tasks.sinusoid import SinusoidTasks, sample_sinusoid

__all__ = ["SinusoidTasks", "sample_sinusoid"]
