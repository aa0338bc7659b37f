"""Loss, gradient and Hessian-vector product of a metacore.network.Model, computed with the
reference layers one task at a time (a Python loop over tasks, then over layers): the ground
truth for Model.forward / loss_and_grad / hvp.

Shape letters (this module):
    T tasks, N points (or images) per task, P parameters per task.

For each task t, with theta[t] unpacked through model.layout:
    forward   h_0 = x[t],  h_{i+1} = layer_i(h_i)
    R-forward rh_0 = 0 (the data does not depend on theta),  rh_{i+1} = R{layer_i}(h_i, rh_i)
    backward  g = dL/dout, rg = R{dL/dout}, then for i = last .. 0:
              (g, grads_i) = backward_i(g; h_i),  (rg, hv_i) = rbackward_i(g, rg; h_i, rh_i)
grad[t] and Hv[t] are the grads_i and hv_i packed back through model.layout
(Pearlmutter 1994: Hv = R{grad}).
"""
import numpy as np

from metacore.network import (BatchNorm, Conv2d, Flatten, Linear, MaxPool2d, MeanPool, ReLU)
from metacore.reference import batchnorm as bn
from metacore.reference import conv2d as cv
from metacore.reference import linear as ln
from metacore.reference import losses
from metacore.reference import maxpool as mp
from metacore.reference import relu as rl
from metacore.reference import reshape as rs


def _unpack(model, theta_t):
    """theta_t: (P,) -> per layer {param: float64 array of the layer's shape} (fresh)."""
    views = model.layout.views(np.asarray(theta_t, np.float64)[None, :])
    return [{p: views[f"{lname}.{p}"][0].copy() for p, _ in layer.params}
            for lname, layer in zip(model.layer_names, model.layers)]


def _pack(model, per_layer):
    """per layer {param: array} -> (P,) float64."""
    flat = np.zeros(model.num_params)
    for lname, grads in zip(model.layer_names, per_layer):
        for p, g in grads.items():
            flat[model.layout.slice(f"{lname}.{p}")] = np.asarray(g).reshape(-1)
    return flat


def _bn_stats(layer):
    return np.asarray(layer.running_mean, np.float64), np.asarray(layer.running_var, np.float64)


def _forward(layer, h, p):
    """One layer's forward on one task's activations h."""
    if isinstance(layer, Linear):
        return ln.linear_forward(h, p["w"], p["b"])
    if isinstance(layer, Conv2d):
        return cv.conv2d_forward(h, p["w"], p["b"], layer.stride, layer.padding)
    if isinstance(layer, BatchNorm):
        if layer.mode == "batch":
            return bn.batchnorm_forward(h, p["gamma"], p["beta"], layer.eps)
        return bn.batchnorm_running_forward(h, p["gamma"], p["beta"], *_bn_stats(layer),
                                            layer.eps)
    if isinstance(layer, ReLU):
        return rl.relu_forward(h)
    if isinstance(layer, MaxPool2d):
        return mp.maxpool_forward(h)
    if isinstance(layer, Flatten):
        return rs.flatten_forward(h)
    if isinstance(layer, MeanPool):
        return rs.meanpool_forward(h)
    raise TypeError(f"reference model: no reference for layer type {type(layer).__name__}")


def _backward(layer, dy, h, p):
    """-> dx, {param: grad}."""
    if isinstance(layer, Linear):
        dx, dw, db = ln.linear_backward(dy, h, p["w"])
        return dx, {"w": dw, "b": db}
    if isinstance(layer, Conv2d):
        dx, dw, db = cv.conv2d_backward(dy, h, p["w"], layer.stride, layer.padding)
        return dx, {"w": dw, "b": db}
    if isinstance(layer, BatchNorm):
        if layer.mode == "batch":
            dx, dg, db = bn.batchnorm_backward(dy, h, p["gamma"], layer.eps)
        else:
            dx, dg, db = bn.batchnorm_running_backward(dy, h, p["gamma"], *_bn_stats(layer),
                                                       layer.eps)
        return dx, {"gamma": dg, "beta": db}
    if isinstance(layer, ReLU):
        return rl.relu_backward(dy, h), {}
    if isinstance(layer, MaxPool2d):
        return mp.maxpool_backward(dy, h), {}
    if isinstance(layer, Flatten):
        return rs.flatten_backward(dy, h.shape), {}
    if isinstance(layer, MeanPool):
        return rs.meanpool_backward(dy, h.shape), {}
    raise TypeError(f"reference model: no reference for layer type {type(layer).__name__}")


def _rforward(layer, h, p, rh, rp):
    """-> R{layer output} along (rh, rp)."""
    if isinstance(layer, Linear):
        return ln.linear_rforward(h, p["w"], rh, rp["w"], rp["b"])
    if isinstance(layer, Conv2d):
        return cv.conv2d_rforward(h, p["w"], rh, rp["w"], rp["b"], layer.stride, layer.padding)
    if isinstance(layer, BatchNorm):
        if layer.mode == "batch":
            return bn.batchnorm_rforward(h, p["gamma"], rh, rp["gamma"], rp["beta"], layer.eps)
        return bn.batchnorm_running_rforward(h, p["gamma"], rh, rp["gamma"], rp["beta"],
                                             *_bn_stats(layer), layer.eps)
    if isinstance(layer, ReLU):
        return rl.relu_rforward(h, rh)
    if isinstance(layer, MaxPool2d):
        return mp.maxpool_rforward(h, rh)
    if isinstance(layer, Flatten):
        return rs.flatten_rforward(rh)
    if isinstance(layer, MeanPool):
        return rs.meanpool_rforward(rh)
    raise TypeError(f"reference model: no reference for layer type {type(layer).__name__}")


def _rbackward(layer, dy, rdy, h, p, rh, rp):
    """-> R{dx}, {param: R{grad}} along (rh, rp) with R{dy} = rdy."""
    if isinstance(layer, Linear):
        rdx, rdw, rdb = ln.linear_rbackward(dy, rdy, h, p["w"], rh, rp["w"])
        return rdx, {"w": rdw, "b": rdb}
    if isinstance(layer, Conv2d):
        rdx, rdw, rdb = cv.conv2d_rbackward(dy, rdy, h, p["w"], rh, rp["w"], layer.stride,
                                            layer.padding)
        return rdx, {"w": rdw, "b": rdb}
    if isinstance(layer, BatchNorm):
        if layer.mode == "batch":
            rdx, rdg, rdb = bn.batchnorm_rbackward(dy, rdy, h, p["gamma"], rh, rp["gamma"],
                                                   layer.eps)
        else:
            rdx, rdg, rdb = bn.batchnorm_running_rbackward(dy, rdy, h, p["gamma"], rh,
                                                           rp["gamma"], *_bn_stats(layer),
                                                           layer.eps)
        return rdx, {"gamma": rdg, "beta": rdb}
    if isinstance(layer, ReLU):
        return rl.relu_rbackward(dy, rdy, h), {}
    if isinstance(layer, MaxPool2d):
        return mp.maxpool_rbackward(dy, rdy, h), {}
    if isinstance(layer, Flatten):
        return rs.flatten_rbackward(dy, rdy, h.shape), {}
    if isinstance(layer, MeanPool):
        return rs.meanpool_rbackward(dy, rdy, h.shape), {}
    raise TypeError(f"reference model: no reference for layer type {type(layer).__name__}")


def _inputs_one_task(model, params, x_t):
    """-> [h_0 = x_t, h_1, ..., h_L = out]: every layer's input, then the output."""
    hs = [np.asarray(x_t, np.float64)]
    for layer, p in zip(model.layers, params):
        hs.append(_forward(layer, hs[-1], p))
    return hs


def reference_forward(model, theta, x, return_inputs=False):
    """theta: (T, P), x: (T, N, *in_shape) -> out: (T, N, *out_shape) float64.
    return_inputs=True also returns, per task, the list of every layer's input (h_0..h_L)."""
    theta, x = np.asarray(theta, np.float64), np.asarray(x, np.float64)
    outs, inputs = [], []
    for t in range(theta.shape[0]):
        hs = _inputs_one_task(model, _unpack(model, theta[t]), x[t])
        outs.append(hs[-1])
        inputs.append(hs)
    out = np.stack(outs)
    return (out, inputs) if return_inputs else out


def reference_loss_grad_hvp(model, theta, x, target, v, loss=None):
    """theta, v: (T, P), x: (T, N, *in_shape), target: per-task targets (target[t] is passed
    to the loss) -> loss (T,), grad (T, P), Hv (T, P), all float64 (Hv None when v is None).

    loss: None for model.loss_name, or a triple of one-task functions
    (forward(out, target) -> L, backward(out, target) -> dout,
     rbackward(rout, out, target) -> R{dout}), e.g. a probe loss for a model without one."""
    if loss is None:
        if model.loss_name is None:
            raise ValueError(f"reference model: {model.name} has no loss; pass loss=(f, df, rdf)")
        loss = losses.LOSSES[model.loss_name]
    lfwd, lbwd, lrbwd = loss
    with_hvp = v is not None
    theta, x = np.asarray(theta, np.float64), np.asarray(x, np.float64)
    v = np.asarray(v, np.float64) if with_hvp else np.zeros_like(theta)
    T = theta.shape[0]
    L = np.zeros(T)                                           # (T,)
    grad = np.zeros((T, model.num_params))                    # (T, P)
    hv = np.zeros((T, model.num_params))                      # (T, P)
    for t in range(T):
        params, rparams = _unpack(model, theta[t]), _unpack(model, v[t])
        hs = _inputs_one_task(model, params, x[t])
        rhs = [np.zeros_like(hs[0])]
        if with_hvp:
            for layer, p, rp, h in zip(model.layers, params, rparams, hs):
                rhs.append(_rforward(layer, h, p, rhs[-1], rp))
        out = hs[-1]
        L[t] = lfwd(out, target[t])
        g = lbwd(out, target[t])
        rg = lrbwd(rhs[-1], out, target[t]) if with_hvp else None
        grads, hvs = [None] * len(model.layers), [None] * len(model.layers)
        for i in range(len(model.layers) - 1, -1, -1):
            layer, p, rp = model.layers[i], params[i], rparams[i]
            if with_hvp:
                rg, hvs[i] = _rbackward(layer, g, rg, hs[i], p, rhs[i], rp)
            g, grads[i] = _backward(layer, g, hs[i], p)
        grad[t] = _pack(model, grads)
        if with_hvp:
            hv[t] = _pack(model, hvs)
    return L, grad, (hv if with_hvp else None)


def reference_loss_and_grad(model, theta, x, target, loss=None):
    """The same without the R-passes: -> loss (T,), grad (T, P), float64."""
    L, grad, _ = reference_loss_grad_hvp(model, theta, x, target, None, loss)
    return L, grad
