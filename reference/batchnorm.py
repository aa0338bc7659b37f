"""Batch normalization (Ioffe & Szegedy 2015) for one task, channels last: plain float64
NumPy ground truth in the paper's long form.

Shape letters (this module):
    C channels, M entries per channel (all leading axes: x is (..., C), e.g. (N, C) or
    (B, H, W, C), flattened here to (M, C)).

Batch mode (statistics of this batch, per channel, over the M entries):
    mu = (1/M) sum_m x_m            var = (1/M) sum_m (x_m - mu)^2          (biased)
    xhat = (x - mu) / sqrt(var + eps)        y = gamma xhat + beta
Backward, Ioffe & Szegedy 2015, section 3 (the chain rule through var and mu written out):
    dxhat = dy gamma
    dvar  = sum_m dxhat_m (x_m - mu) (-1/2) (var + eps)^(-3/2)
    dmean = sum_m dxhat_m (-1 / sqrt(var + eps)) + dvar (1/M) sum_m (-2 (x_m - mu))
    dx    = dxhat / sqrt(var + eps) + dvar 2 (x - mu) / M + dmean / M
    dgamma = sum_m dy_m xhat_m          dbeta = sum_m dy_m
R-forward (R{.} of each forward line, with v = var + eps, xc = x - mu):
    R{mu} = mean(rx)    R{xc} = rx - R{mu}    R{var} = (2/M) sum_m xc_m R{xc}_m
    R{v^(-1/2)} = -(1/2) v^(-3/2) R{var}      R{xhat} = R{xc} v^(-1/2) + xc R{v^(-1/2)}
    R{y} = R{gamma} xhat + gamma R{xhat} + R{beta}
R-backward: R{.} applied to each line of the long-form backward above (see the code, one line
per term); R{dgamma} = sum(R{dy} xhat + dy R{xhat}), R{dbeta} = sum R{dy}.

Running mode (fixed statistics rm, rv: constants, not parameters):
    xhat = (x - rm) / sqrt(rv + eps),  y = gamma xhat + beta,  dx = dy gamma / sqrt(rv + eps)
    R{y} = R{gamma} xhat + gamma rx / sqrt(rv + eps) + R{beta}
    R{dx} = (R{dy} gamma + dy R{gamma}) / sqrt(rv + eps)
Every function returns fresh float64 arrays shaped like its inputs.
"""
import numpy as np


def _rows(a):
    """a: (..., C) -> (M, C) float64 copy."""
    a = np.asarray(a, np.float64)
    return a.reshape(-1, a.shape[-1]).copy()


def _stats(x, eps):
    """x: (M, C) -> mu (C,), var (C,), xc (M, C), v^(-1/2) (C,)."""
    M = x.shape[0]
    mu = x.sum(axis=0) / M                                   # (C,)
    xc = x - mu                                              # (M, C)
    var = (xc * xc).sum(axis=0) / M                          # (C,)
    return mu, var, xc, 1.0 / np.sqrt(var + eps)


# ---------------------------------------------------------------- batch statistics

def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """x: (..., C), gamma, beta: (C,) -> y: (..., C)."""
    shape = np.shape(x)
    X = _rows(x)                                             # (M, C)
    _, _, xc, s = _stats(X, eps)
    y = np.asarray(gamma, np.float64) * (xc * s) + np.asarray(beta, np.float64)
    return y.reshape(shape)


def batchnorm_backward(dy, x, gamma, eps=1e-5):
    """dy: (..., C) -> dx (..., C), dgamma (C,), dbeta (C,)."""
    shape = np.shape(x)
    X, DY = _rows(x), _rows(dy)                              # (M, C)
    gamma = np.asarray(gamma, np.float64)
    M = X.shape[0]
    _, var, xc, s = _stats(X, eps)
    v = var + eps                                            # (C,)
    dxhat = DY * gamma                                       # (M, C)
    dvar = (dxhat * xc).sum(axis=0) * (-0.5) * v ** -1.5     # (C,)
    dmean = (dxhat * -s).sum(axis=0) + dvar * (-2.0 * xc).sum(axis=0) / M   # (C,)
    dx = dxhat * s + dvar * 2.0 * xc / M + dmean / M         # (M, C)
    dgamma = (DY * xc * s).sum(axis=0)                       # (C,)
    dbeta = DY.sum(axis=0)                                   # (C,)
    return dx.reshape(shape), dgamma, dbeta


def _r_stats(X, RX, eps):
    """R{.} of the statistics along rx. X, RX: (M, C) -> (xc, s, v, rxc, rvar, rs)."""
    M = X.shape[0]
    _, var, xc, s = _stats(X, eps)
    v = var + eps                                            # (C,)
    rmu = RX.sum(axis=0) / M                                 # (C,)
    rxc = RX - rmu                                           # (M, C)
    rvar = 2.0 * (xc * rxc).sum(axis=0) / M                  # (C,)
    rs = -0.5 * v ** -1.5 * rvar                             # (C,)  R{v^(-1/2)}
    return xc, s, v, rxc, rvar, rs


def batchnorm_rforward(x, gamma, rx, rgamma, rbeta, eps=1e-5):
    """rx: (..., C) (zeros for a data input), rgamma, rbeta: (C,) -> R{y}: (..., C)."""
    shape = np.shape(x)
    X, RX = _rows(x), _rows(rx)                              # (M, C)
    gamma, rgamma, rbeta = (np.asarray(a, np.float64) for a in (gamma, rgamma, rbeta))
    xc, s, _, rxc, _, rs = _r_stats(X, RX, eps)
    xhat = xc * s                                            # (M, C)
    rxhat = rxc * s + xc * rs                                # (M, C)
    return (rgamma * xhat + gamma * rxhat + rbeta).reshape(shape)


def batchnorm_rbackward(dy, rdy, x, gamma, rx, rgamma, eps=1e-5):
    """R-operator of batchnorm_backward along (rx, rgamma, rbeta) with R{dy} = rdy (rbeta
    does not enter). -> rdx (..., C), rdgamma (C,), rdbeta (C,)."""
    shape = np.shape(x)
    X, RX, DY, RDY = _rows(x), _rows(rx), _rows(dy), _rows(rdy)   # (M, C)
    gamma, rgamma = np.asarray(gamma, np.float64), np.asarray(rgamma, np.float64)
    M = X.shape[0]
    xc, s, v, rxc, rvar, rs = _r_stats(X, RX, eps)
    # the backward lines, then R{} of each
    dxhat = DY * gamma                                       # (M, C)
    rdxhat = RDY * gamma + DY * rgamma                       # (M, C)
    sum_dxhat_xc = (dxhat * xc).sum(axis=0)                  # (C,)
    dvar = sum_dxhat_xc * (-0.5) * v ** -1.5                 # (C,)
    rdvar = ((rdxhat * xc + dxhat * rxc).sum(axis=0) * (-0.5) * v ** -1.5
             + sum_dxhat_xc * 0.75 * v ** -2.5 * rvar)       # (C,)  d v^(-3/2) = -3/2 v^(-5/2)
    sum_m2xc = (-2.0 * xc).sum(axis=0)                       # (C,) zero up to rounding
    rsum_m2xc = (-2.0 * rxc).sum(axis=0)                     # (C,)
    rdmean = ((rdxhat * -s).sum(axis=0) + (dxhat * -rs).sum(axis=0)
              + rdvar * sum_m2xc / M + dvar * rsum_m2xc / M)  # (C,)
    rdx = (rdxhat * s + dxhat * rs
           + 2.0 * (rdvar * xc + dvar * rxc) / M
           + rdmean / M)                                     # (M, C)
    xhat = xc * s                                            # (M, C)
    rxhat = rxc * s + xc * rs                                # (M, C)
    rdgamma = (RDY * xhat + DY * rxhat).sum(axis=0)          # (C,)
    rdbeta = RDY.sum(axis=0)                                 # (C,)
    return rdx.reshape(shape), rdgamma, rdbeta


def batchnorm_running_update(running_mean, running_var, x, momentum=0.1):
    """New running statistics after seeing the batch x (..., C):
    (1 - momentum) old + momentum batch, with the biased batch variance. -> (C,), (C,)."""
    X = _rows(x)                                             # (M, C)
    mu = X.sum(axis=0) / X.shape[0]                          # (C,)
    var = ((X - mu) ** 2).sum(axis=0) / X.shape[0]           # (C,)
    rm, rv = np.asarray(running_mean, np.float64), np.asarray(running_var, np.float64)
    return (1.0 - momentum) * rm + momentum * mu, (1.0 - momentum) * rv + momentum * var


# ---------------------------------------------------------------- running statistics

def _running_scale(running_var, eps):
    return 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)      # (C,)


def batchnorm_running_forward(x, gamma, beta, running_mean, running_var, eps=1e-5):
    """x: (..., C); gamma, beta, running_mean, running_var: (C,) -> y: (..., C)."""
    x = np.asarray(x, np.float64)
    xhat = (x - np.asarray(running_mean, np.float64)) * _running_scale(running_var, eps)
    return np.asarray(gamma, np.float64) * xhat + np.asarray(beta, np.float64)


def batchnorm_running_backward(dy, x, gamma, running_mean, running_var, eps=1e-5):
    """dy: (..., C) -> dx (..., C), dgamma (C,), dbeta (C,)."""
    DY, X = _rows(dy), _rows(x)                              # (M, C)
    s = _running_scale(running_var, eps)                     # (C,)
    xhat = (X - np.asarray(running_mean, np.float64)) * s    # (M, C)
    dx = DY * np.asarray(gamma, np.float64) * s              # (M, C)
    return dx.reshape(np.shape(x)), (DY * xhat).sum(axis=0), DY.sum(axis=0)


def batchnorm_running_rforward(x, gamma, rx, rgamma, rbeta, running_mean, running_var,
                               eps=1e-5):
    """R{y} = R{gamma} xhat + gamma rx s + R{beta}, s = 1 / sqrt(rv + eps). -> (..., C)."""
    x, rx = np.asarray(x, np.float64), np.asarray(rx, np.float64)
    s = _running_scale(running_var, eps)
    xhat = (x - np.asarray(running_mean, np.float64)) * s
    return (np.asarray(rgamma, np.float64) * xhat + np.asarray(gamma, np.float64) * rx * s
            + np.asarray(rbeta, np.float64))


def batchnorm_running_rbackward(dy, rdy, x, gamma, rx, rgamma, running_mean, running_var,
                                eps=1e-5):
    """R{dx} = (R{dy} gamma + dy R{gamma}) s,  R{dgamma} = sum(R{dy} xhat + dy rx s),
    R{dbeta} = sum R{dy}. -> rdx (..., C), rdgamma (C,), rdbeta (C,)."""
    DY, RDY, X, RX = _rows(dy), _rows(rdy), _rows(x), _rows(rx)       # (M, C)
    gamma, rgamma = np.asarray(gamma, np.float64), np.asarray(rgamma, np.float64)
    s = _running_scale(running_var, eps)                     # (C,)
    xhat = (X - np.asarray(running_mean, np.float64)) * s    # (M, C)
    rdx = (RDY * gamma + DY * rgamma) * s                    # (M, C)
    rdgamma = (RDY * xhat + DY * RX * s).sum(axis=0)         # (C,)
    return rdx.reshape(np.shape(x)), rdgamma, RDY.sum(axis=0)
