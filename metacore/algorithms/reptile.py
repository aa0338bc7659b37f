"""Reptile (Nichol, Achiam & Schulman 2018), serial and batched over tasks.

Shape letters (this module):
    T tasks in the meta-batch, N points per task, P parameters.

Each task t runs k inner SGD steps from the shared theta (step i on batch i, or the same
batch at every step):  theta_{i+1} = theta_i - alpha * grad L_i(theta_i).  The outer update
    theta <- theta + eps * mean_t (theta_k^t - theta)
is an outer optimizer step with the "direction"
    d = mean_t (theta - theta_k^t) = alpha * mean_t sum_i g_i^(i)
(for outer SGD with lr = eps, theta - eps * d is exactly the update above; Adam can use d as
its gradient, as in the paper's Omniglot runs). With g_j^(i) = grad L_j at theta_i (Weng
2018), d / alpha = g_0^(0) + g_1^(1) + ... , i.e. for two steps g_Reptile = g_0^(0) + g_1^(1).

reptile_direction runs all T tasks together with theta (T, P); reptile_direction_serial runs
them one at a time (T = 1 each): the two must agree, which the tests check.
"""
import numpy as np

from metacore.algorithms.maml import (_as_step_batches, _check_alpha, _check_model,
                                      _check_steps, _check_theta, _loss_grad, _tasks_of)
from metacore.nonfinite import all_finite, report
from metacore.params import tile_tasks


def _check(op, model, theta, xs, ys, alpha, steps):
    _check_model(op, model)
    steps = _check_steps(op, steps)
    _check_theta(op, model, theta)
    alpha = _check_alpha(op, alpha, model.num_params, theta.dtype)
    x0 = xs[0] if isinstance(xs, (list, tuple)) and xs else xs
    T = _tasks_of(op, x0)
    xs, ys = _as_step_batches(op, model, xs, ys, steps, T, theta.dtype)
    return alpha, xs, ys, T


def _reptile(model, theta, xs, ys, alpha, T):
    """Unchecked core -> (loss_0 (T,), d (P,))."""
    th, loss0 = tile_tasks(theta, T), None                 # (T, P)
    for x, y in zip(xs, ys):
        loss, g = _loss_grad(model, th, x, y)
        if loss0 is None:
            loss0 = loss
        th = th - alpha * g
    return loss0, theta - th.mean(axis=0)


def reptile_direction(model, theta, support_x, support_y, alpha, steps):
    """d = mean_t (theta - theta_k^t) over all tasks at once.

    theta: (P,); support_x/support_y: (T, N, ...) used at every step, or a list of `steps`
    batches; alpha: scalar or (P,). Returns (loss_0 (T,) pre-update losses on batch 0,
    d (P,)), fresh arrays. The Reptile update is theta <- theta - eps * d."""
    op = "reptile_direction"
    alpha, xs, ys, T = _check(op, model, theta, support_x, support_y, alpha, steps)
    loss0, d = _reptile(model, theta, xs, ys, alpha, T)
    if not (all_finite(loss0) and all_finite(d)):
        report(op, theta.dtype, {"support loss": loss0, "Reptile direction": d},
               hint="alpha", context=f"steps={len(xs)}")
    return loss0, d


def reptile_direction_serial(model, theta, support_x, support_y, alpha, steps):
    """The same as reptile_direction, one task at a time (the serial algorithm of the paper)."""
    op = "reptile_direction_serial"
    alpha, xs, ys, T = _check(op, model, theta, support_x, support_y, alpha, steps)
    losses, total = np.empty(T, theta.dtype), np.zeros_like(theta)
    for t in range(T):
        loss, d = _reptile(model, theta, [x[t:t + 1] for x in xs], [y[t:t + 1] for y in ys],
                           alpha, 1)
        losses[t] = loss[0]
        total += d
    return losses, total / T
