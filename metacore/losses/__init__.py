"""Losses, each with its gradient and R-operator. Every loss returns one value per task,
(T,), the mean over that task's points; gradients are those of the sum over tasks, so task t's
gradient is that of its own loss (tasks never mix)."""
