"""Softmax cross-entropy per task: L_t = -(1/N) sum_n log softmax(z[t,n])[label[t,n]].

Shapes: T tasks, N points, K classes.  z: (T, N, K) logits, labels: (T, N) ints -> L: (T,)

With p = softmax(z):  dz = (p - onehot(label)) / N.
The R-operator of softmax is R{p} = p * (R{z} - sum_k p R{z}), so R{dz} = R{p} / N.
"""
import numpy as np

from metacore.validate import check_float_array, check_int_array


def softmax_ce_forward(z, labels):
    """-> loss (T,), cache = p (T, N, K) softmax probabilities and the labels."""
    check_float_array("softmax_ce", "z", z, ndim=3, finite=False)
    check_int_array("softmax_ce", "labels", labels, shape=z.shape[:2], low=0, high=z.shape[2])
    zmax = z.max(axis=-1, keepdims=True)
    e = np.exp(z - zmax)                                    # (T, N, K), shift for stability
    s = e.sum(axis=-1, keepdims=True)
    p = e / s
    # log softmax at the label, without forming log(p) of tiny probabilities
    z_label = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0]      # (T, N)
    logp_label = z_label - zmax[..., 0] - np.log(s[..., 0])
    loss = -logp_label.mean(axis=1)
    if not np.isfinite(loss).all():
        # logits are allowed to be -inf (masked classes), so the input check lets non-finite
        # values through; a loss that came out NaN or Inf is refused here instead
        bad = int(np.count_nonzero(~np.isfinite(loss)))
        raise FloatingPointError(f"softmax_ce: the loss of {bad} of {loss.size} task(s) is "
                                 f"non-finite (logits NaN, +inf, or out of the {z.dtype} "
                                 f"range)")
    return loss, (p, labels)


def softmax_ce_backward(cache):
    """dz = (p - onehot) / N."""
    p, labels = cache
    dz = p.copy()
    T, N, _ = p.shape
    np.put_along_axis(dz, labels[..., None],
                      np.take_along_axis(dz, labels[..., None], axis=-1) - 1.0, axis=-1)
    dz *= 1.0 / N
    return dz


def softmax_ce_rbackward(rz, cache):
    """R{dz} = p (R{z} - <p, R{z}>) / N."""
    p, _ = cache
    N = p.shape[1]
    return p * (rz - (p * rz).sum(axis=-1, keepdims=True)) * (1.0 / N)


def accuracy(z, labels):
    """Fraction of points whose largest logit is the label, per task: (T,)."""
    return (z.argmax(axis=-1) == labels).mean(axis=1)
