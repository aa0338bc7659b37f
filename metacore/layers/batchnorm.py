"""Batch normalization (Ioffe & Szegedy 2015), channels last, batched over tasks.

Shapes:
  T tasks, C channels; x is (T, ..., C) with any number of middle axes, e.g. (T, N, C) after a
  linear layer or (T, B, H, W, C) after a convolution. Statistics are per task and channel,
  over the M = prod(middle axes) entries: every task is normalised with its own batch, as MAML
  does (Finn et al. 2017 use batch statistics in the inner loop and at test time).

Two modes, chosen explicitly by calling one function pair or the other:
  batch:   xhat = (x - mean(x)) / sqrt(var(x) + eps)       statistics of this batch
  running: xhat = (x - running_mean) / sqrt(running_var + eps)   fixed statistics (a buffer,
           not a parameter: it gets no gradient)
  y = gamma * xhat + beta.

Batch mode, with g = dy * gamma and mean() over the M entries of one (task, channel):
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
The Jacobian d xhat / d x = rstd * (I - 1 1^T / M - xhat xhat^T / M) is symmetric, so the
R-forward has the same form:  R{xhat} = rstd * (rx - mean(rx) - xhat * mean(xhat * rx)),
and R{rstd} = -rstd^2 * mean(xhat * rx). See docs/DERIVATIONS.md for R{dx}.

Batch mode runs on the Numba kernels of metacore.kernels.convnet_numba when numba is
available (two or three passes per call instead of a dozen NumPy passes; sums in float64);
the NumPy code below is the fallback and the ground truth (METACORE_NO_NUMBA=1 forces it).
"""
import numpy as np

from metacore.kernels.convnet import kernels_for
from metacore.layers import relu as rl
from metacore.validate import check_float_array, check_same


def _middle_axes(x):
    return tuple(range(1, x.ndim - 1))


def _bc(p, ndim):
    """(T, C) -> (T, 1, ..., 1, C) broadcastable against x of rank ndim."""
    return p.reshape((p.shape[0],) + (1,) * (ndim - 2) + (p.shape[-1],))


def _check_params(op, x, gamma, beta):
    check_float_array(op, "x", x, finite=False)
    if x.ndim < 3:
        raise ValueError(f"{op}: x must be (T, ..., C) with at least 3 dimensions, got {x.shape}")
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_float_array(op, name, p, shape=(x.shape[0], x.shape[-1]), dtype=x.dtype,
                          finite=False)


def _mean(a, axes):
    return a.mean(axis=axes, keepdims=True)


def _kernels(*arrays):
    """The Numba kernel module when it can take these arrays (float32/64, not empty)."""
    return kernels_for(*arrays) if arrays[0].size else None


def _rows(a):
    """(T, ..., C) -> a C-contiguous (T, M, C) view (a copy only if a is not contiguous)."""
    return np.ascontiguousarray(a).reshape(a.shape[0], -1, a.shape[-1])


def _tc(p):
    """(T, 1.., C) or (T, C) -> a C-contiguous (T, C) array."""
    return np.ascontiguousarray(p).reshape(p.shape[0], p.shape[-1])


# ---------------------------------------------------------------- batch statistics


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """x: (T, ..., C), gamma, beta: (T, C) -> y like x; cache = (xhat, rstd, gamma, mean, var)."""
    _check_params("batchnorm", x, gamma, beta)
    k = _kernels(x, gamma, beta)
    if k is not None:
        T, C = x.shape[0], x.shape[-1]
        xhat, y = np.empty_like(x, order="C"), np.empty_like(x, order="C")
        mu, var, rstd = np.empty((3, T, C), x.dtype)
        k.bn_forward(_rows(x), _tc(gamma), _tc(beta), float(eps), _rows(xhat), _rows(y),
                     mu, var, rstd)
        bc = (T,) + (1,) * (x.ndim - 2) + (C,)
        return y, (xhat, rstd.reshape(bc), gamma, mu.reshape(bc), var.reshape(bc))
    axes = _middle_axes(x)
    mu = _mean(x, axes)                       # (T, 1.., C)
    xc = x - mu                               # (T, ..., C)
    var = _mean(xc * xc, axes)                # (T, 1.., C), biased (divides by M)
    rstd = 1.0 / np.sqrt(var + eps)           # (T, 1.., C)
    xhat = xc * rstd                          # (T, ..., C)
    y = _bc(gamma, x.ndim) * xhat + _bc(beta, x.ndim)
    return y, (xhat, rstd, gamma, mu, var)


def batchnorm_backward(dy, cache):
    """dy: (T, ..., C) -> dx (T, ..., C), dgamma (T, C), dbeta (T, C)."""
    xhat, rstd, gamma, _, _ = cache
    check_same("batchnorm backward", "dy", dy, "x", xhat)
    k = _kernels(dy, xhat, rstd, gamma)
    if k is not None:
        T, C = dy.shape[0], dy.shape[-1]
        dx = np.empty_like(dy, order="C")
        dgamma, dbeta = np.empty((2, T, C), dy.dtype)
        k.bn_backward(_rows(dy), _rows(xhat), _tc(rstd), _tc(gamma), _rows(dx), dgamma, dbeta)
        return dx, dgamma, dbeta
    axes = _middle_axes(dy)
    g = dy * _bc(gamma, dy.ndim)              # d loss / d xhat
    dx = rstd * (g - _mean(g, axes) - xhat * _mean(g * xhat, axes))
    dgamma = (dy * xhat).sum(axis=axes)       # (T, C)
    dbeta = dy.sum(axis=axes)                 # (T, C)
    return dx, dgamma, dbeta


def batchnorm_relu_forward(x, gamma, beta, eps=1e-5):
    """Batch norm (batch statistics) then ReLU: -> y like x, the batchnorm cache, the ReLU
    mask; the same values and caches as batchnorm_forward then relu_forward (which it is,
    without the kernels), so the backward and R-passes can run layer by layer. On the kernels
    one pass writes xhat, y and the mask: no intermediate array, and one read and one write
    of the activations less (the image layer's 15 MB per pass in a Conv-4 query batch)."""
    _check_params("batchnorm", x, gamma, beta)
    k = _kernels(x, gamma, beta)
    if k is None:
        z, cache = batchnorm_forward(x, gamma, beta, eps)
        y, mask = rl.relu_forward(z)
        return y, cache, mask
    T, C = x.shape[0], x.shape[-1]
    xhat, y = np.empty_like(x, order="C"), np.empty_like(x, order="C")
    mask = np.empty(x.shape, np.bool_)
    mu, var, rstd = np.empty((3, T, C), x.dtype)
    k.bn_relu_forward(_rows(x), _tc(gamma), _tc(beta), float(eps), _rows(xhat), _rows(y),
                      mu, var, rstd, _rows(mask))
    bc = (T,) + (1,) * (x.ndim - 2) + (C,)
    return y, (xhat, rstd.reshape(bc), gamma, mu.reshape(bc), var.reshape(bc)), mask


def batchnorm_relu_backward(dy, mask, cache):
    """relu_backward(dy, mask) then batchnorm_backward, without the gated array on the
    kernels (the same bits): dy: (T, ..., C), mask: the ReLU's bool mask like dy, cache:
    batchnorm_forward's -> dx (T, ..., C), dgamma (T, C), dbeta (T, C)."""
    xhat, rstd, gamma, _, _ = cache
    check_same("batchnorm backward", "dy", dy, "x", xhat)
    k = _kernels(dy, xhat, rstd, gamma)
    if (k is None or not isinstance(mask, np.ndarray) or mask.dtype != np.bool_
            or mask.shape != dy.shape):
        return batchnorm_backward(rl.relu_backward(dy, mask), cache)
    T, C = dy.shape[0], dy.shape[-1]
    dx = np.empty_like(dy, order="C")
    dgamma, dbeta = np.empty((2, T, C), dy.dtype)
    k.bn_relu_backward(_rows(dy), _rows(mask), _rows(xhat), _tc(rstd), _tc(gamma), _rows(dx),
                       dgamma, dbeta)
    return dx, dgamma, dbeta


def batchnorm_rforward(rx, rgamma, rbeta, cache):
    """R{y} = R{gamma} xhat + gamma R{xhat} + R{beta}; rx None means R{x} = 0.
    -> ry (T, ..., C); rcache = (rxhat, rrstd, rgamma)."""
    xhat, rstd, gamma, _, _ = cache
    check_same("batchnorm rforward", "rgamma", rgamma, "gamma", gamma)
    nd = xhat.ndim
    k = None if rx is None else _kernels(rx, xhat, rstd, gamma, rgamma, rbeta)
    if k is not None:
        check_same("batchnorm rforward", "rx", rx, "x", xhat)
        T, C = xhat.shape[0], xhat.shape[-1]
        rxhat, ry = np.empty_like(xhat, order="C"), np.empty_like(xhat, order="C")
        rrstd = np.empty((T, C), xhat.dtype)
        k.bn_rforward(_rows(rx), _rows(xhat), _tc(rstd), _tc(gamma), _tc(rgamma), _tc(rbeta),
                      _rows(rxhat), _rows(ry), rrstd)
        return ry, (rxhat, rrstd.reshape(rstd.shape), rgamma)
    if rx is None:
        rxhat, rrstd = np.zeros_like(xhat), np.zeros_like(rstd)
    else:
        axes = _middle_axes(rx)
        a = _mean(xhat * rx, axes)            # (T, 1.., C)
        rxhat = rstd * (rx - _mean(rx, axes) - xhat * a)
        rrstd = -rstd * rstd * a
    ry = _bc(rgamma, nd) * xhat + _bc(gamma, nd) * rxhat + _bc(rbeta, nd)
    return ry, (rxhat, rrstd, rgamma)


def batchnorm_rbackward(dy, rdy, cache, rcache):
    """R-operator of batchnorm_backward. With g = dy gamma, R{g} = R{dy} gamma + dy R{gamma},
    S1 = mean(g), S2 = mean(g xhat):
      R{dx} = R{rstd} (g - S1 - xhat S2)
            + rstd (R{g} - mean(R{g}) - R{xhat} S2 - xhat mean(R{g} xhat + g R{xhat}))
      R{dgamma} = sum(R{dy} xhat + dy R{xhat}),   R{dbeta} = sum(R{dy})
    -> rdx (T, ..., C), rdgamma (T, C), rdbeta (T, C)."""
    xhat, rstd, gamma, _, _ = cache
    rxhat, rrstd, rgamma = rcache
    k = _kernels(dy, rdy, xhat, rxhat, rstd, rrstd, gamma, rgamma)
    if k is not None:
        check_same("batchnorm rbackward", "dy", dy, "x", xhat)
        check_same("batchnorm rbackward", "rdy", rdy, "x", xhat)
        T, C = dy.shape[0], dy.shape[-1]
        rdx = np.empty_like(dy, order="C")
        rdgamma, rdbeta = np.empty((2, T, C), dy.dtype)
        k.bn_rbackward(_rows(dy), _rows(rdy), _rows(xhat), _rows(rxhat), _tc(rstd), _tc(rrstd),
                       _tc(gamma), _tc(rgamma), _rows(rdx), rdgamma, rdbeta)
        return rdx, rdgamma, rdbeta
    axes = _middle_axes(dy)
    nd = dy.ndim
    g = dy * _bc(gamma, nd)
    rg = rdy * _bc(gamma, nd) + dy * _bc(rgamma, nd)
    s2 = _mean(g * xhat, axes)
    rdx = rrstd * (g - _mean(g, axes) - xhat * s2)
    rdx += rstd * (rg - _mean(rg, axes) - rxhat * s2
                   - xhat * _mean(rg * xhat + g * rxhat, axes))
    rdgamma = (rdy * xhat + dy * rxhat).sum(axis=axes)
    rdbeta = rdy.sum(axis=axes)
    return rdx, rdgamma, rdbeta


def batchnorm_running_update(running_mean, running_var, cache, momentum=0.1):
    """New running statistics after a batch-mode forward: (1 - m) * old + m * batch, per
    task and channel, the batch variance biased (divided by M). Returns fresh (T, C) arrays."""
    _, _, _, mu, var = cache
    T, C = mu.shape[0], mu.shape[-1]
    new_mean = (1.0 - momentum) * running_mean + momentum * mu.reshape(T, C)
    new_var = (1.0 - momentum) * running_var + momentum * var.reshape(T, C)
    return new_mean, new_var


# ---------------------------------------------------------------- running statistics


def batchnorm_running_forward(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """Fixed statistics: an affine map of x. running_mean, running_var: (T, C).
    -> y like x; cache = (xhat, rstd, gamma)."""
    _check_params("batchnorm (running)", x, gamma, beta)
    for name, s in (("running_mean", running_mean), ("running_var", running_var)):
        check_float_array("batchnorm (running)", name, s, shape=gamma.shape, finite=True)
    if running_var.min() < 0:
        raise ValueError(f"batchnorm (running): running_var has a negative entry "
                         f"{running_var.min()}")
    nd = x.ndim
    rstd = 1.0 / np.sqrt(_bc(running_var, nd) + eps)          # (T, 1.., C)
    xhat = (x - _bc(running_mean, nd)) * rstd
    y = _bc(gamma, nd) * xhat + _bc(beta, nd)
    return y, (xhat, rstd, gamma)


def batchnorm_running_backward(dy, cache):
    """dx = dy gamma rstd, dgamma = sum(dy xhat), dbeta = sum(dy)."""
    xhat, rstd, gamma = cache
    axes = _middle_axes(dy)
    dx = dy * (_bc(gamma, dy.ndim) * rstd)
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def batchnorm_running_rforward(rx, rgamma, rbeta, cache):
    """R{xhat} = R{x} rstd (the statistics are constants); R{y} = R{gamma} xhat + gamma R{xhat}
    + R{beta}. -> ry, rcache = (rxhat, rgamma)."""
    xhat, rstd, gamma = cache
    nd = xhat.ndim
    rxhat = np.zeros_like(xhat) if rx is None else rx * rstd
    ry = _bc(rgamma, nd) * xhat + _bc(gamma, nd) * rxhat + _bc(rbeta, nd)
    return ry, (rxhat, rgamma)


def batchnorm_running_rbackward(dy, rdy, cache, rcache):
    """R{dx} = (R{dy} gamma + dy R{gamma}) rstd, R{dgamma} = sum(R{dy} xhat + dy R{xhat}),
    R{dbeta} = sum(R{dy})."""
    xhat, rstd, gamma = cache
    rxhat, rgamma = rcache
    axes = _middle_axes(dy)
    nd = dy.ndim
    rdx = (rdy * _bc(gamma, nd) + dy * _bc(rgamma, nd)) * rstd
    return rdx, (rdy * xhat + dy * rxhat).sum(axis=axes), rdy.sum(axis=axes)
