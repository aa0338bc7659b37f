"""Mean squared error per task: L_t = (1 / (N O)) sum_{n,o} (y - target)^2.

Shapes: T tasks, N points, O outputs per point.  y, target: (T, N, O) -> L: (T,)
The loss is quadratic in y, so R{dy} = (2 / (N O)) R{y} exactly.
"""
from metacore.validate import check_float_array


def mse_forward(y, target):
    """-> loss (T,), cache = (diff, scale) with diff = y - target, scale = 2 / (N O)."""
    check_float_array("mse", "y", y, finite=False)
    check_float_array("mse", "target", target, shape=y.shape, dtype=y.dtype)
    if y.ndim < 2 or y.shape[0] < 1 or y[0].size < 1:
        raise ValueError(f"mse: y must be (T, N, ...) with T >= 1 tasks and N >= 1 points, "
                         f"got shape {y.shape}")
    diff = y - target                                      # (T, N, O)
    count = diff[0].size
    loss = (diff * diff).reshape(diff.shape[0], -1).mean(axis=1)   # (T,)
    return loss, (diff, 2.0 / count)


def mse_backward(cache):
    """dy = 2 (y - target) / (N O)."""
    diff, scale = cache
    return diff * scale


def mse_rbackward(ry, cache):
    """R{dy} = 2 R{y} / (N O)."""
    _, scale = cache
    return ry * scale
