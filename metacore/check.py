"""`metacore check`: every derivation of the core, measured against float64 central finite
differences.

One row per (derivation, quantity, dtype), quantity one of
  gradient   analytic backward vs finite differences of the objective, coordinate by
             coordinate (all coordinates at these sizes; for the full-size models a fixed
             random PER_BLOCK coordinates of every parameter block of every task);
  hvp        R-operator Hessian-vector product vs finite differences of the analytic
             gradient along the same direction v;
  symmetry   |u.(Hv) - v.(Hu)| / max(|u.(Hv)|, |v.(Hu)|), float64 only;
  backend:B  kernels only: rel_error of backend B's outputs (values and gradients) against
             the reference backend's on the same inputs, per dtype: numba (CPU) when
             installed, numba-cuda under the CUDA simulator (`metacore check --cuda-sim`) or
             on a GPU.
Derivations without an HVP or R-op in the project (the LSTM layers, meta-gradients, kernels,
algorithms; metacore/check_more.py) have gradient rows only.
Groups (`metacore check GROUP`): layers, losses, models, meta-gradients, kernels, algorithms.
`metacore check --json FILE` writes every row as {name, group, dtype, quantity, error,
tolerance, pass}.
float64 rows compare float64 results; float32 rows run the same derivation in float32 and
compare it with the float64 finite differences, against the looser float32 tolerance.
Errors are metacore.gradcheck.rel_error (normwise: max|a - b| / (max|a| + max|b|)).

Objectives. A layer y = f(x, params) is checked through the probe loss
  L = sum(c * y) + 0.5 * sum(q * y^2)   (c, q fixed random arrays, q > 0)
so that dy = c + q y and R{dy} = q R{y}: the Hessian then involves both the layer's own
second derivative (contracted with dy) and its Jacobian (through q), with respect to the input
and the parameters jointly. A loss is checked as L = sum over tasks of its per-task values,
with respect to its prediction argument. A model is checked as the sum over tasks of its
per-task losses, with respect to the (T, P) parameters (the ProtoNet backbone, which has no
loss of its own, through the probe loss on its embedding).
"""
import functools
import time

import numpy as np

from metacore import models
from metacore.errors import UserError
from metacore.gradcheck import numerical_gradient_at, rel_error
from metacore.layers import batchnorm as bn
from metacore.layers import conv2d as cv
from metacore.layers import linear as ln
from metacore.layers import maxpool as mp
from metacore.layers import relu as rl
from metacore.layers import reshape as rs
from metacore.losses import bce_logits, mse, softmax_ce
from metacore.network import MaxPool2d, ReLU

from metacore.check_case import (GROUPS, H_GRAD, H_HVP, KIND_GROUP, TOL,  # noqa: F401
                                 Case)

PER_BLOCK = 4          # coordinates checked per parameter block for the full-size models


def _tuple(r):
    return r if isinstance(r, tuple) else (r,)


# ------------------------------------------------------------------- layer cases
def _layer_case(name, fwd, bwd, rfwd, rbwd, make_inputs):
    """make_inputs(rng) -> dict with 'x' first and then the parameters, in call order."""
    def probe(inputs):
        y, cache = _tuple(fwd(*inputs.values()))
        rng = np.random.default_rng(12345)        # the probe loss is a fixed function
        c = rng.standard_normal(y.shape).astype(y.dtype)
        q = rng.uniform(0.5, 1.5, y.shape).astype(y.dtype)
        return float(np.sum(c * y) + 0.5 * np.sum(q * y * y)), y, cache, c, q

    def grad_hvp(inputs, v=None):
        names = list(inputs)
        value, y, cache, c, q = probe(inputs)
        dy = c + q * y
        grads = dict(zip(names, _tuple(bwd(dy, cache))))
        if v is None:
            return value, grads, None
        ry, rcache = rfwd(*[v[k] for k in names], cache)
        hv = dict(zip(names, _tuple(rbwd(dy, q * ry, cache, rcache))))
        return value, grads, hv

    return Case(name, "layer", make_inputs, lambda inputs: probe(inputs)[0], grad_hvp)


def _away_from_zero(a, margin=0.05):
    """Push entries off the kink at 0 so that finite differences do not straddle it."""
    return np.where(np.abs(a) < margin, np.sign(a + 1e-300) * margin + a, a)


def _layer_cases():
    cases = []
    cases.append(_layer_case(
        "linear", ln.linear_forward, ln.linear_backward, ln.linear_rforward, ln.linear_rbackward,
        lambda r: {"x": r.standard_normal((2, 3, 4)), "w": r.standard_normal((2, 4, 5)),
                   "b": r.standard_normal((2, 5))}))
    cases.append(_layer_case(
        "relu", rl.relu_forward, rl.relu_backward, rl.relu_rforward, rl.relu_rbackward,
        lambda r: {"x": _away_from_zero(r.standard_normal((2, 3, 7)))}))
    for stride, padding, hw in [(1, "same", (5, 6)), (2, "same", (7, 6)), (1, "valid", (5, 7)),
                                (2, "valid", (7, 8))]:
        cases.append(_layer_case(
            f"conv2d[stride={stride},{padding}]",
            functools.partial(cv.conv2d_forward, stride=stride, padding=padding),
            cv.conv2d_backward, cv.conv2d_rforward, cv.conv2d_rbackward,
            lambda r, hw=hw: {"x": r.standard_normal((2, 2) + hw + (3,)),
                              "w": r.standard_normal((2, 3, 3, 3, 4)) * 0.5,
                              "b": r.standard_normal((2, 4))}))
    for shape in [(2, 5, 4), (2, 3, 3, 4, 3)]:
        cases.append(_layer_case(
            f"batchnorm[batch,{len(shape)}d]", bn.batchnorm_forward, bn.batchnorm_backward,
            bn.batchnorm_rforward, bn.batchnorm_rbackward,
            lambda r, s=shape: {"x": r.standard_normal(s) * 2 + 1,
                                "gamma": r.standard_normal((s[0], s[-1])),
                                "beta": r.standard_normal((s[0], s[-1]))}))
    stats = np.random.default_rng(7)
    rmean, rvar = stats.standard_normal((2, 3)), stats.uniform(0.5, 2.0, (2, 3))
    cases.append(_layer_case(
        "batchnorm[running]",
        lambda x, g, b: bn.batchnorm_running_forward(x, g, b, rmean.astype(x.dtype),
                                                     rvar.astype(x.dtype)),
        bn.batchnorm_running_backward, bn.batchnorm_running_rforward,
        bn.batchnorm_running_rbackward,
        lambda r: {"x": r.standard_normal((2, 4, 3)), "gamma": r.standard_normal((2, 3)),
                   "beta": r.standard_normal((2, 3))}))
    cases.append(_layer_case(
        "maxpool2d", mp.maxpool_forward, mp.maxpool_backward, mp.maxpool_rforward,
        mp.maxpool_rbackward, lambda r: {"x": r.standard_normal((2, 2, 5, 6, 3))}))
    cases.append(_layer_case(
        "flatten", rs.flatten_forward, rs.flatten_backward, rs.flatten_rforward,
        rs.flatten_rbackward, lambda r: {"x": r.standard_normal((2, 2, 3, 2, 3))}))
    cases.append(_layer_case(
        "meanpool", rs.meanpool_forward, rs.meanpool_backward, rs.meanpool_rforward,
        rs.meanpool_rbackward, lambda r: {"x": r.standard_normal((2, 2, 3, 5, 3))}))
    return cases


# -------------------------------------------------------------------- loss cases
def _loss_case(name, fwd, bwd, rbwd, make_pred, make_target):
    target_rng = np.random.default_rng(99)
    target = make_target(target_rng)

    def grad_hvp(inputs, v=None):
        z = inputs["z"]
        t = target.astype(z.dtype) if target.dtype.kind == "f" else target
        loss, cache = fwd(z, t)
        grads = {"z": bwd(cache)}
        hv = None if v is None else {"z": rbwd(v["z"], cache)}
        return float(loss.sum()), grads, hv

    def value(inputs):
        z = inputs["z"]
        return float(fwd(z, target.astype(z.dtype) if target.dtype.kind == "f" else target)[0].sum())

    return Case(name, "loss", lambda r: {"z": make_pred(r)}, value, grad_hvp)


def _loss_cases():
    return [
        _loss_case("mse", mse.mse_forward, mse.mse_backward, mse.mse_rbackward,
                   lambda r: r.standard_normal((2, 5, 3)),
                   lambda r: r.standard_normal((2, 5, 3))),
        _loss_case("softmax_ce", softmax_ce.softmax_ce_forward, softmax_ce.softmax_ce_backward,
                   softmax_ce.softmax_ce_rbackward, lambda r: r.standard_normal((2, 6, 5)) * 2,
                   lambda r: r.integers(0, 5, (2, 6))),
        _loss_case("bce_logits", bce_logits.bce_logits_forward, bce_logits.bce_logits_backward,
                   bce_logits.bce_logits_rbackward, lambda r: r.standard_normal((2, 7, 2)) * 2,
                   lambda r: r.uniform(0, 1, (2, 7, 2))),
    ]


# ------------------------------------------------------------------- model cases
def _model_case(name, model, T, N, scale=0.3, per_block=None):
    """Model parameters: each task gets the model's init plus noise of size `scale`, so that
    tasks differ and no initialiser zero makes a derivative trivially zero."""
    data_rng = np.random.default_rng(2024)
    x = data_rng.standard_normal((T, N) + model.in_shape)
    if model.loss_name == "mse":
        target = data_rng.standard_normal((T, N) + model.out_shape)
    elif model.loss_name == "softmax_ce":
        target = data_rng.integers(0, model.out_shape[-1], (T, N))
    else:
        target = None                 # no loss: probe loss on the output (embedding)
        c = data_rng.standard_normal((T, N) + model.out_shape)
        q = data_rng.uniform(0.5, 1.5, (T, N) + model.out_shape)

    def make(rng):
        theta = np.stack([model.init_params(rng) for _ in range(T)])
        return {"theta": theta + scale * rng.standard_normal(theta.shape)}

    def grad_hvp(inputs, v=None):
        theta = inputs["theta"]
        xx = x.astype(theta.dtype)
        if target is not None:
            tt = target.astype(theta.dtype) if target.dtype.kind == "f" else target
            if v is None:
                loss, grad = model.loss_and_grad(theta, xx, tt)
                return float(loss.sum()), {"theta": grad}, None
            loss, grad, hv = model.hvp(theta, xx, tt, v["theta"])
            return float(loss.sum()), {"theta": grad}, {"theta": hv}
        cc, qq = c.astype(theta.dtype), q.astype(theta.dtype)
        out, caches = model.forward(theta, xx)
        value = float(np.sum(cc * out) + 0.5 * np.sum(qq * out * out))
        dout = cc + qq * out
        if v is None:
            return value, {"theta": model.backward(dout, caches, T)}, None
        rout, rcaches = model.rforward(v["theta"], caches)
        grad, hv = model.backward_and_rbackward(dout, qq * rout, caches, rcaches, T)
        return value, {"theta": grad}, {"theta": hv}

    def value(inputs):
        theta = inputs["theta"]
        xx = x.astype(theta.dtype)
        if target is not None:
            tt = target.astype(theta.dtype) if target.dtype.kind == "f" else target
            return float(model.loss(theta, xx, tt).sum())
        out, _ = model.forward(theta, xx)
        cc, qq = c.astype(theta.dtype), q.astype(theta.dtype)
        return float(np.sum(cc * out) + 0.5 * np.sum(qq * out * out))

    def pattern(inputs):
        _, caches = model.forward(inputs["theta"], x.astype(inputs["theta"].dtype))
        return [c if isinstance(layer, ReLU) else c[0]
                for layer, c in zip(model.layers, caches) if isinstance(layer, (ReLU, MaxPool2d))]

    P = model.num_params
    blocks = [slice(t * P + model.layout.slice(n).start, t * P + model.layout.slice(n).stop)
              for t in range(T) for n in model.layout.names]
    return Case(name, "model", make, value, grad_hvp, blocks if per_block else None, per_block, pattern)


def _model_cases():
    return [
        _model_case("sinusoid_mlp", models.sinusoid_mlp(), T=2, N=5, scale=0.3),
        _model_case("bn_mlp[tiny]", models.bn_mlp(n_way=3, in_features=12, hidden=(7, 6, 5, 4)),
                    T=2, N=6),
        _model_case("bn_mlp", models.bn_mlp(n_way=5), T=2, N=5, scale=0.05,
                    per_block=PER_BLOCK),
        _model_case("conv4_maml[tiny]",
                    models.conv4_maml(n_way=3, image_shape=(9, 9, 2), channels=3, depth=2),
                    T=2, N=4),
        _model_case("conv4_maml", models.conv4_maml(n_way=5), T=2, N=5, scale=0.05,
                    per_block=PER_BLOCK),
        _model_case("conv4_protonet[tiny]",
                    models.conv4_protonet(image_shape=(8, 9, 1), channels=3, depth=2),
                    T=2, N=3),
        _model_case("conv4_protonet", models.conv4_protonet(), T=2, N=3, scale=0.05,
                    per_block=PER_BLOCK),
    ]


def all_cases():
    from metacore.check_more import more_cases
    return _layer_cases() + _loss_cases() + _model_cases() + more_cases()


# ---------------------------------------------------------------------- measuring
def fd_gradient(case, inputs, coords):
    """Central differences of the objective at the given flat coordinates of each input."""
    return {name: numerical_gradient_at(lambda: case.value(inputs), a, coords[name],
                                        case.h_grad)
            for name, a in inputs.items()}


def fd_hvp(case, inputs, v):
    """Central differences of the analytic gradient along v, with a step whose two ends see
    the same ReLU masks and max-pool choices (a piecewise-smooth model's gradient jumps where
    they change; a large network has many near-kinks). -> ({name: FD of grad}, step used)."""
    h = H_HVP
    base = None if case.pattern is None else case.pattern(inputs)
    while True:
        plus = {k: a + h * v[k] for k, a in inputs.items()}
        minus = {k: a - h * v[k] for k, a in inputs.items()}
        if base is None or all(np.array_equal(b, p) and np.array_equal(b, m) for b, p, m in
                               zip(base, case.pattern(plus), case.pattern(minus))):
            break
        if h < 1e-8:
            raise RuntimeError(f"{case.name}: no finite-difference step >= 1e-8 keeps the "
                               f"activation pattern fixed")
        h /= 10
    gp, gm = case.grad_hvp(plus)[1], case.grad_hvp(minus)[1]
    return {k: (gp[k] - gm[k]) / (2 * h) for k in inputs}


def _flat(d, keys):
    return np.concatenate([np.asarray(d[k], np.float64).reshape(-1) for k in keys])


def _unit_direction(rng, inputs):
    d = {k: rng.standard_normal(a.shape) for k, a in inputs.items()}
    norm = np.sqrt(sum(float((a * a).sum()) for a in d.values()))
    return {k: a / norm for k, a in d.items()}


def measure(case, seed=0):
    """-> list of (quantity, dtype, error) rows for one case."""
    rng = np.random.default_rng(seed)
    inputs = case.make(rng)
    keys = list(inputs)
    v, u = _unit_direction(rng, inputs), _unit_direction(rng, inputs)
    coords = {}
    for k, a in inputs.items():
        if case.blocks is None:
            coords[k] = np.arange(a.size)
        else:
            coords[k] = np.concatenate([
                rng.choice(np.arange(b.start, b.stop), min(case.per_block, b.stop - b.start),
                           replace=False) for b in case.blocks])
    num_grad = fd_gradient(case, inputs, coords)
    num_hv = fd_hvp(case, inputs, v) if case.has_hvp else None
    rows = []
    for dtype in (np.float64, np.float32):
        cast = lambda d: {k: a.astype(dtype) for k, a in d.items()}
        _, grad, hv = case.grad_hvp(cast(inputs), cast(v) if case.has_hvp else None)
        g_at = {k: np.asarray(grad[k]).reshape(-1)[coords[k]] for k in keys}
        name = np.dtype(dtype).name
        rows.append(("gradient", name, rel_error(_flat(g_at, keys), _flat(num_grad, keys))))
        if case.backends is not None:
            rows += [(f"backend:{q}", name, e) for q, e in case.backends(inputs, dtype)]
        if not case.has_hvp:
            continue
        rows.append(("hvp", name, rel_error(_flat(hv, keys), _flat(num_hv, keys))))
        if dtype is np.float64:
            hu = case.grad_hvp(inputs, u)[2]
            a = float(_flat(u, keys) @ _flat(hv, keys))
            b = float(_flat(v, keys) @ _flat(hu, keys))
            rows.append(("symmetry", name, abs(a - b) / max(abs(a), abs(b), 1e-300)))
    return rows


def select(cases, only):
    """Cases whose name, name before '[', or group is in `only` (all if only is empty)."""
    if not only:
        return cases
    base = lambda c: c.name.split("[")[0]                      # noqa: E731
    chosen = [c for c in cases if c.name in only or base(c) in only or c.group in only]
    known = {c.name for c in chosen} | {base(c) for c in chosen} | {c.group for c in chosen}
    unknown = set(only) - known
    if unknown:
        names = sorted({base(c) for c in cases})
        raise UserError(f"unknown derivation(s) {sorted(unknown)}; choose a group "
                        f"{list(GROUPS)} or derivations from {names}")
    return chosen


def tolerance(case, quantity, dtype):
    return case.tolerance(quantity.split(":")[0], dtype)


def run(only=(), dtypes=("float64", "float32"), out=print, json_path=None):
    """Print one row per derivation x quantity x dtype, grouped; write them to json_path as
    a list of {name, group, dtype, quantity, error, tolerance, pass} when given. Returns the
    number of FAIL rows."""
    cases = select(all_cases(), only)
    cases = sorted(cases, key=lambda c: GROUPS.index(c.group))   # stable: order within a group
    w = max([30] + [len(c.name) for c in cases])                 # the name column's width
    out(f"{'derivation':<{w}} {'group':<14} {'quantity':<38} {'dtype':<8} "
        f"{'max rel error':>13} {'tolerance':>9}  result")
    failures, t0, records = 0, time.perf_counter(), []
    for case in cases:
        for quantity, dtype, err in measure(case):
            if dtype not in dtypes:
                continue
            tol = tolerance(case, quantity, dtype)
            ok = bool(err <= tol)
            failures += not ok
            records.append({"name": case.name, "group": case.group, "dtype": dtype,
                            "quantity": quantity, "error": float(err), "tolerance": tol,
                            "pass": ok})
            out(f"{case.name:<{w}} {case.group:<14} {quantity:<38} {dtype:<8} {err:13.3e} "
                f"{tol:9.0e}  {'PASS' if ok else 'FAIL'}")
    elapsed = time.perf_counter() - t0
    out(f"{'all ' + str(len(records)) if not failures else failures} "
        f"{'rows pass' if not failures else 'row(s) FAIL'}"
        f" ({len(cases)} derivations, {elapsed:.1f} s)")
    if json_path:
        import json
        with open(json_path, "w") as f:
            json.dump(records, f, indent=1)
    return failures
