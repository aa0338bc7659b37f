"""Binary cross-entropy with logits per task:
  L_t = (1/n) sum_i [softplus(z_i) - t_i z_i],   softplus(z) = log(1 + e^z)
which equals -t log s - (1 - t) log(1 - s) with s = sigmoid(z), without overflow.

Shapes: T tasks, then any shape (T, ...) shared by z and the targets t in [0, 1]; n is the
number of entries per task.
  dz = (sigmoid(z) - t) / n,   R{dz} = sigmoid(z) (1 - sigmoid(z)) R{z} / n.
"""
import numpy as np

from metacore.validate import check_float_array


def _sigmoid(z):
    # exp of a non-positive number only: no overflow for large |z|
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e)).astype(z.dtype, copy=False)


def bce_logits_forward(z, target):
    """-> loss (T,), cache = (sigmoid(z), target, 1/n)."""
    check_float_array("bce_logits", "z", z, finite=False)
    check_float_array("bce_logits", "target", target, shape=z.shape, dtype=z.dtype)
    T = z.shape[0]
    softplus = np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))
    per = (softplus - target * z).reshape(T, -1)
    return per.mean(axis=1), (_sigmoid(z), target, 1.0 / per.shape[1])


def bce_logits_backward(cache):
    """dz = (sigmoid(z) - t) / n."""
    s, target, inv_n = cache
    return (s - target) * inv_n


def bce_logits_rbackward(rz, cache):
    """R{dz} = s (1 - s) R{z} / n."""
    s, _, inv_n = cache
    return s * (1.0 - s) * rz * inv_n
