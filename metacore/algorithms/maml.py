"""MAML (Finn, Abbeel & Levine 2017) with its exact second-order meta-gradient, first-order MAML,
and Meta-SGD's learned per-parameter inner rate (Li, Zhou, Chen & Li 2017), for all tasks of a
meta-batch at once and without autodiff.

Shape letters (this module):
    T tasks in the meta-batch, N points (or images) per task, P parameters.

Inner loop (task t; step i uses support batch i, usually the same batch at every step):
    theta_0 = theta,   theta_{i+1} = theta_i - alpha * g_i,   g_i = grad L_i(theta_i)
alpha is a scalar (MAML) or a (P,) vector (Meta-SGD; `*` is then elementwise).
Meta-objective: F(theta, alpha) = mean_t L_query_t(theta_k^t).

Exact meta-gradient by reverse accumulation through the k inner steps. The Jacobian of one
step is d theta_{i+1} / d theta_i = I - diag(alpha) H_i with H_i = hess L_i(theta_i)
(symmetric), so with v_k = grad L_query(theta_k):
    for i = k-1 .. 0:
        dF/dalpha += -v_{i+1} * g_i          (d theta_{i+1} / d alpha = -g_i, elementwise)
        v_i = v_{i+1} - H_i (alpha * v_{i+1})
    dF/dtheta = mean_t v_0^t
H_i u comes from Model.hvp (Pearlmutter's R-operator), which also returns g_i, so the
backward sweep needs only theta_0 .. theta_{k-1}. For scalar alpha, dF/dalpha is the sum of
the elementwise term over the parameters.

Memory: besides the parameters, the sweep keeps the k iterates theta_0 .. theta_{k-1}
((T, P) each, i.e. k parameter vectors per task) and the activations of ONE forward pass at a
time; there is no graph. Extra memory therefore grows linearly in k by T*P numbers per step
(measured in bench/bench_maml.py).

First-order MAML drops the Hessian terms: v_i = v_{i+1}, so dF/dtheta = mean_t v_k^t
(and dF/dalpha = -v_k * sum_i g_i, the same approximation).

Relations (Nichol et al. 2018; notation of Weng 2018: g_j^(i) = grad L_j at theta_i,
H_j^(i) its Hessian), k = 1, support batch 0, query batch 1:
    g_FOMAML = g_1^(1),   g_MAML = g_1^(1) - alpha H_0^(0) g_1^(1).
"""
from dataclasses import dataclass

import numpy as np

from metacore.network import LOSSES, Model
from metacore.nonfinite import all_finite, report
from metacore.params import tile_tasks
from metacore.taskpool import check_workers, map_task_blocks
from metacore.validate import check_alpha as _check_alpha
from metacore.validate import check_float_array
from metacore.validate import check_steps as _check_steps


@dataclass
class MetaGradient:
    """Result of one meta-gradient evaluation over a meta-batch.

    query_loss  (T,)   L_query_t(theta_k^t), the post-update losses (their mean is F)
    support_loss (T,)  L_0,t(theta), the pre-update losses on the first support batch
    grad        (P,)   dF/dtheta
    alpha_grad  float or (P,): dF/dalpha, shaped like alpha
    query_accuracy (T,) post-update query accuracy for a classifier (softmax_ce), else None
    """
    query_loss: np.ndarray
    support_loss: np.ndarray
    grad: np.ndarray
    alpha_grad: object
    query_accuracy: object = None


# ----------------------------------------------------------------------- unchecked passes
# The public functions validate once; the inner loop then calls these, which skip Model's
# per-call checks (finiteness scans and contiguity copies cost more than the math at
# sinusoid sizes).

def _loss(model, theta, x, y):
    out, _ = model.forward(theta, x, _checked=True)
    return LOSSES[model.loss_name][0](out, y)[0]


def _loss_grad(model, theta, x, y, accuracy=False):
    """-> loss (T,), grad (T, P)[, accuracy (T,) or None]."""
    lfwd, lbwd, _ = LOSSES[model.loss_name]
    out, caches = model.forward(theta, x, _checked=True)
    loss, lcache = lfwd(out, y)
    grad = model.backward(lbwd(lcache), caches, theta.shape[0])
    if not accuracy:
        return loss, grad
    # out (T, N, K) logits, y (T, N) labels: a by-product of the pass, for the training log
    acc = (out.argmax(axis=-1) == y).mean(axis=1) if model.loss_name == "softmax_ce" else None
    return loss, grad, acc


def _hvp(model, theta, x, y, u):
    """-> loss (T,), grad (T, P), H u (T, P)."""
    lfwd, lbwd, lrbwd = LOSSES[model.loss_name]
    out, caches = model.forward(theta, x, _checked=True)
    loss, lcache = lfwd(out, y)
    dout = lbwd(lcache)
    rout, rcaches = model.rforward(u, caches)
    return (loss,) + model.backward_and_rbackward(dout, lrbwd(rout, lcache), caches, rcaches,
                                                  theta.shape[0])


# ----------------------------------------------------------------------- input checks
def _check_model(op, model):
    if not isinstance(model, Model):
        raise TypeError(f"{op}: model must be a metacore.network.Model, got "
                        f"{type(model).__name__}")
    if model.loss_name is None:
        raise ValueError(f"{op}: model {model.name} has no loss")


def _check_theta(op, model, theta):
    check_float_array(op, "theta", theta, shape=(model.num_params,))
    return theta


def _check_xy(op, model, name, x, y, T, dtype):
    """One (x, y) batch for T tasks, checked through the model's own rules."""
    model._check_data(T, dtype, x, y)
    if x.shape[1] == 0:
        raise ValueError(f"{op}: {name} has no points (x shape {x.shape})")


def _as_step_batches(op, model, xs, ys, steps, T, dtype):
    """support given once (used at every step) or as a list of `steps` batches."""
    if isinstance(xs, (list, tuple)) != isinstance(ys, (list, tuple)):
        raise TypeError(f"{op}: support x and y must both be arrays or both lists of batches")
    if isinstance(xs, (list, tuple)):
        if len(xs) != steps or len(ys) != steps:
            raise ValueError(f"{op}: got {len(xs)} support x and {len(ys)} support y batches "
                             f"for {steps} inner steps")
        for i, (x, y) in enumerate(zip(xs, ys)):
            _check_xy(op, model, f"support batch {i}", x, y, T, dtype)
        return list(xs), list(ys)
    _check_xy(op, model, "support", xs, ys, T, dtype)
    return [xs] * steps, [ys] * steps


def _tasks_of(op, x):
    if not isinstance(x, np.ndarray) or x.ndim < 2:
        raise ValueError(f"{op}: x arrays must be (T, N, ...) ndarrays, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.shape[0] < 1:
        raise ValueError(f"{op}: x has no tasks (shape {x.shape}); T must be >= 1")
    return x.shape[0]


# ----------------------------------------------------------------------- inner loop
def _inner_loop(model, theta_t, xs, ys, alpha, keep):
    """SGD from theta_t (T, P) over the step batches. Returns (theta_k, iterates, loss_0,
    gsum) with iterates = [theta_0 .. theta_{k-1}] if keep else [], and gsum = sum_i g_i
    (T, P) (first-order MAML's alpha gradient needs it)."""
    iterates, loss0, gsum, theta = [], None, None, theta_t
    for x, y in zip(xs, ys):
        if keep:
            iterates.append(theta)
        loss, g = _loss_grad(model, theta, x, y)
        if loss0 is None:
            loss0 = loss
        gsum = g if gsum is None else gsum + g
        theta = theta - alpha * g                # fresh array: the iterate stays intact
    return theta, iterates, loss0, gsum


def adapt(model, theta, x, y, alpha, steps):
    """Plain inner-loop SGD for every task: theta (P,) or (T, P) -> list of the iterates
    [theta_0, .., theta_steps], each (T, P) (theta_0 the tiled start). alpha: scalar or (P,)."""
    op = "adapt"
    _check_model(op, model)
    steps = _check_steps(op, steps, minimum=0)
    check_float_array(op, "theta", theta)
    T = _tasks_of(op, x)
    if theta.ndim == 1:
        _check_theta(op, model, theta)
        theta = tile_tasks(theta, T)
    elif theta.shape != (T, model.num_params):
        raise ValueError(f"{op}: theta must be ({model.num_params},) or ({T}, "
                         f"{model.num_params}), got {theta.shape}")
    alpha = _check_alpha(op, alpha, model.num_params, theta.dtype)
    _check_xy(op, model, "x", x, y, T, theta.dtype)
    out = [np.ascontiguousarray(theta)]
    for _ in range(steps):
        _, g = _loss_grad(model, out[-1], x, y)
        out.append(out[-1] - alpha * g)
    return out


def _query_scores(model, theta, qx, qy, transductive):
    """Per-task query loss (T,) and, for classifiers, accuracy (T,) at theta (T, P)."""
    T, M = qx.shape[:2]
    if transductive:
        out, _ = model.forward(theta, qx, _checked=True)              # (T, M, O)
        y = qy
    else:
        th = np.repeat(theta, M, axis=0)                              # (T*M, P)
        x = qx.reshape((T * M, 1) + qx.shape[2:])                     # (T*M, 1, ...)
        y = qy.reshape((T * M, 1) + qy.shape[2:])
        out, _ = model.forward(th, x, _checked=True)                  # (T*M, 1, O)
    loss = LOSSES[model.loss_name][0](out, y)[0].reshape(T, -1).mean(axis=1)
    if model.loss_name != "softmax_ce":
        return loss, None
    correct = (out.argmax(axis=-1) == y).reshape(T, M)
    return loss, correct.mean(axis=1)


def adapt_and_score(model, theta, alpha, batch, max_steps, transductive=True):
    """Meta-test scoring (metacore.evaluation; the MAML family's validation): inner SGD
    from theta on each task's support, the query scored after 0, 1, .., max_steps steps.
    theta (P,), alpha scalar or (P,) (a Meta-SGD run's learned rates, negative entries
    allowed), batch = (sx, sy, qx, qy) of T tasks; transductive:
    each task's queries in one batch (BN batch statistics over all of them), else one query
    at a time (metacore/evaluation.py's docstring).
    -> {"loss": [(T,)] * (max_steps + 1), "accuracy": likewise, for classifiers}."""
    op = "adapt_and_score"
    _check_model(op, model)
    _check_theta(op, model, theta)
    alpha = _check_alpha(op, alpha, model.num_params, theta.dtype, learned=True)
    if not isinstance(batch, (tuple, list)) or len(batch) != 4:
        raise TypeError(f"{op}: batch must be (support_x, support_y, query_x, query_y)")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(f"{op}: max_steps must be an int >= 0, got {max_steps!r}")
    sx, sy, qx, qy = batch
    T = sx.shape[0] if isinstance(sx, np.ndarray) and sx.ndim >= 2 else None
    if not T:
        raise ValueError(f"{op}: support_x must be a (T, N, ...) array with T >= 1 tasks, "
                         f"got {getattr(sx, 'shape', type(sx).__name__)}")
    _check_xy(op, model, "support", sx, sy, T, theta.dtype)
    _check_xy(op, model, "query", qx, qy, T, theta.dtype)
    th = np.repeat(theta[None, :], T, axis=0)                          # (T, P)
    out = {"loss": [], "accuracy": []}
    for step in range(max_steps + 1):
        loss, acc = _query_scores(model, th, qx, qy, transductive)
        out["loss"].append(loss)
        if acc is not None:
            out["accuracy"].append(acc)
        if step < max_steps:
            th = th - alpha * _loss_grad(model, th, sx, sy)[1]
    if not out["accuracy"]:
        del out["accuracy"]
    return out


# ----------------------------------------------------------------------- meta-gradients
def meta_objective(model, theta, support_x, support_y, query_x, query_y, alpha, steps):
    """F(theta, alpha) = mean_t L_query_t(theta_k^t) after `steps` inner SGD steps (float)."""
    op = "meta_objective"
    theta, alpha, xs, ys, T = _check_all(op, model, theta, support_x, support_y, query_x,
                                         query_y, alpha, steps)
    theta_k, _, _, _ = _inner_loop(model, tile_tasks(theta, T), xs, ys, alpha, keep=False)
    value = float(_loss(model, theta_k, query_x, query_y).mean())
    if not np.isfinite(value):
        report(op, theta.dtype, {"meta-objective": np.asarray(value)}, hint="alpha",
               context=f"steps={len(xs)}")
    return value


def _check_all(op, model, theta, support_x, support_y, query_x, query_y, alpha, steps):
    _check_model(op, model)
    steps = _check_steps(op, steps)
    _check_theta(op, model, theta)
    alpha = _check_alpha(op, alpha, model.num_params, theta.dtype)
    T = _tasks_of(op, query_x)
    xs, ys = _as_step_batches(op, model, support_x, support_y, steps, T, theta.dtype)
    _check_xy(op, model, "query", query_x, query_y, T, theta.dtype)
    return theta, alpha, xs, ys, T


def maml_gradient(model, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                  first_order=False, workers=1):
    """Meta-gradient of F(theta, alpha) = mean_t L_query_t(theta_k^t) (module docstring).

    model: a metacore.network.Model with a loss; theta: (P,) shared initialisation.
    support_x/support_y: (T, N, ...) batch used at every inner step, or a list of `steps`
        such batches (step i uses batch i); query_x/query_y: (T, M, ...).
    alpha: scalar inner rate (MAML) or (P,) per-parameter rates (Meta-SGD).
    first_order: True gives first-order MAML (no Hessian-vector products).
    workers: threads, each taking a contiguous block of the tasks (metacore.taskpool); the
        result equals the one-thread result up to the order of the final mean.
    Returns a MetaGradient (fresh arrays). Extra memory: `steps` (T, P) iterates, no graph.
    """
    op = "maml_gradient"
    workers = check_workers(op, workers)
    theta, alpha, xs, ys, T = _check_all(op, model, theta, support_x, support_y, query_x,
                                         query_y, alpha, steps)
    r = _maml_gradient(model, theta, xs, ys, query_x, query_y, alpha, first_order, workers)
    if not (all_finite(r.query_loss) and all_finite(r.grad) and all_finite(r.alpha_grad)):
        # the inputs were finite (checked): the inner loop or the query pass overflowed
        report("fomaml_gradient" if first_order else op, theta.dtype,
               {"query loss": r.query_loss, "meta-gradient": r.grad,
                "alpha gradient": np.asarray(r.alpha_grad)}, hint="alpha",
               context=f"steps={len(xs)}")
    return r


def _maml_gradient(model, theta, xs, ys, query_x, query_y, alpha, first_order, workers=1):
    """Unchecked core of maml_gradient; xs, ys lists of the k step batches."""
    T = query_x.shape[0]
    if workers > 1 and T > 1:
        return _maml_gradient_by_blocks(model, theta, xs, ys, query_x, query_y, alpha,
                                        first_order, workers)
    scalar_alpha = not isinstance(alpha, np.ndarray)
    theta_k, iterates, loss0, gsum = _inner_loop(model, tile_tasks(theta, T), xs, ys, alpha,
                                                 keep=not first_order)
    qloss, v, qacc = _loss_grad(model, theta_k, query_x, query_y, accuracy=True)  # v: (T, P)
    if first_order:
        dalpha = -v * gsum                                             # (T, P)
    else:
        dalpha = np.zeros_like(v)                                      # (T, P) elementwise
        for i in range(len(xs) - 1, -1, -1):
            _, g, hu = _hvp(model, iterates[i], xs[i], ys[i], alpha * v)
            dalpha -= v * g
            v = v - hu
    grad = v.mean(axis=0)                                              # (P,)
    dalpha_mean = dalpha.mean(axis=0)                                  # (P,)
    alpha_grad = float(dalpha_mean.sum()) if scalar_alpha else dalpha_mean
    return MetaGradient(qloss, loss0, grad, alpha_grad, qacc)


def _maml_gradient_by_blocks(model, theta, xs, ys, query_x, query_y, alpha, first_order,
                             workers):
    """_maml_gradient over contiguous task blocks, one thread each. Block b's means weigh
    n_b / T in the meta-batch mean; the losses are concatenated in task order."""
    T = query_x.shape[0]

    def block(lo, hi):
        return _maml_gradient(model, theta, [x[lo:hi] for x in xs], [y[lo:hi] for y in ys],
                              query_x[lo:hi], query_y[lo:hi], alpha, first_order)

    parts = map_task_blocks(block, T, workers)
    grad = sum(((hi - lo) / T) * r.grad for lo, hi, r in parts)
    alpha_grad = sum(((hi - lo) / T) * r.alpha_grad for lo, hi, r in parts)
    if not isinstance(alpha, np.ndarray):
        alpha_grad = float(alpha_grad)
    accs = [r.query_accuracy for _, _, r in parts]
    qacc = None if accs[0] is None else np.concatenate(accs)
    return MetaGradient(np.concatenate([r.query_loss for _, _, r in parts]),
                        np.concatenate([r.support_loss for _, _, r in parts]),
                        grad.astype(theta.dtype, copy=False), alpha_grad, qacc)


def fomaml_gradient(model, theta, support_x, support_y, query_x, query_y, alpha, steps=1,
                    workers=1):
    """First-order MAML: mean_t grad L_query_t(theta_k^t). Same arguments as maml_gradient."""
    return maml_gradient(model, theta, support_x, support_y, query_x, query_y, alpha, steps,
                         first_order=True, workers=workers)
