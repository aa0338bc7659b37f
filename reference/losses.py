"""Losses for one task: plain float64 NumPy ground truth. Each loss is the mean over the
task's entries, and comes with its gradient and the R-operator of that gradient
(R{dz} = d/dr dz(z + r rz) at r = 0; a loss has no parameters, so that is all the R-pass needs).

Shape letters (this module):
    N points, O outputs per point, K classes.

mse          L = (1/(N O)) sum_{n,o} (y - t)^2
             dy = 2 (y - t) / (N O)                 R{dy} = 2 ry / (N O)
softmax_ce   L = (1/N) sum_n [ logsumexp_k z[n, k] - z[n, label_n] ]
             dz = (p - onehot(label)) / N,   p = softmax(z) row-wise
             R{p_k} = p_k (rz_k - sum_j p_j rz_j)    R{dz} = R{p} / N
bce_logits   L = (1/n) sum [ softplus(z) - t z ],   softplus(z) = log(1 + e^z), n = N O
             (equals -t log s - (1 - t) log(1 - s) with s = sigmoid(z))
             dz = (s - t) / n                        R{dz} = s (1 - s) rz / n
Every function returns a Python float (the loss) or a fresh float64 array.
"""
import numpy as np


def _f64(*arrays):
    return [np.asarray(a, np.float64) for a in arrays]


# ---------------------------------------------------------------- mean squared error

def mse_forward(y, target):
    """y, target: (N, O) -> L."""
    y, target = _f64(y, target)
    return float(((y - target) ** 2).sum() / y.size)


def mse_backward(y, target):
    """-> dy: (N, O)."""
    y, target = _f64(y, target)
    return 2.0 * (y - target) / y.size


def mse_rbackward(ry, y, target):
    """ry: (N, O) -> R{dy}: (N, O)."""
    (ry,) = _f64(ry)
    return 2.0 * ry / ry.size


# ---------------------------------------------------------------- softmax cross-entropy

def _softmax(z):
    """z: (N, K) -> p: (N, K), each row shifted by its maximum before exp (no overflow)."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def softmax_ce_forward(z, labels):
    """z: (N, K) logits, labels: (N,) ints in [0, K) -> L."""
    (z,) = _f64(z)
    labels = np.asarray(labels)
    N = z.shape[0]
    total = 0.0
    for n in range(N):
        m = z[n].max()
        logsumexp = m + np.log(np.exp(z[n] - m).sum())
        total += logsumexp - z[n, labels[n]]
    return float(total / N)


def softmax_ce_backward(z, labels):
    """-> dz: (N, K)."""
    (z,) = _f64(z)
    labels = np.asarray(labels)
    N, K = z.shape
    onehot = np.zeros((N, K))
    onehot[np.arange(N), labels] = 1.0
    return (_softmax(z) - onehot) / N


def softmax_ce_rbackward(rz, z, labels):
    """rz: (N, K) -> R{dz}: (N, K)."""
    rz, z = _f64(rz, z)
    p = _softmax(z)                                           # (N, K)
    rp = p * (rz - (p * rz).sum(axis=1, keepdims=True))       # (N, K)
    return rp / z.shape[0]


# ---------------------------------------------------------------- binary cross-entropy

def _sigmoid(z):
    """sigmoid(z) = exp(-softplus(-z)): exp of a non-positive number, no overflow."""
    return np.exp(-np.logaddexp(0.0, -z))


def bce_logits_forward(z, target):
    """z, target: (N, O), target in [0, 1] -> L."""
    z, target = _f64(z, target)
    return float((np.logaddexp(0.0, z) - target * z).sum() / z.size)


def bce_logits_backward(z, target):
    """-> dz: (N, O)."""
    z, target = _f64(z, target)
    return (_sigmoid(z) - target) / z.size


def bce_logits_rbackward(rz, z, target):
    """rz: (N, O) -> R{dz}: (N, O)."""
    rz, z = _f64(rz, z)
    s = _sigmoid(z)
    return s * (1.0 - s) * rz / z.size


LOSSES = {
    "mse": (mse_forward, mse_backward, mse_rbackward),
    "softmax_ce": (softmax_ce_forward, softmax_ce_backward, softmax_ce_rbackward),
    "bce_logits": (bce_logits_forward, bce_logits_backward, bce_logits_rbackward),
}
