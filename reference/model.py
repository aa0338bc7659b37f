"""Loss, gradient and Hessian-vector product of a sequential model, computed with the
reference layers one task at a time (a Python loop over tasks, then over layers): the ground
truth for metacore.network.Model.forward / loss_and_grad / hvp.

Shape letters (this module):
    T tasks, N points (or images) per task, P parameters per task.

The model is described here, in this module's own terms (ModelSpec, LayerSpec: a layer kind,
where its parameters sit in the flat (P,) vector, and its settings), so that the ground truth
imports nothing of what it checks. metacore.network.Model.reference_spec() describes a Model
this way; every function below takes a ModelSpec or any object with such a reference_spec()
method.

For each task t, with theta[t] unpacked through the layers' parameter offsets:
    forward   h_0 = x[t],  h_{i+1} = layer_i(h_i)
    R-forward rh_0 = 0 (the data does not depend on theta),  rh_{i+1} = R{layer_i}(h_i, rh_i)
    backward  g = dL/dout, rg = R{dL/dout}, then for i = last .. 0:
              (g, grads_i) = backward_i(g; h_i),  (rg, hv_i) = rbackward_i(g, rg; h_i, rh_i)
grad[t] and Hv[t] are the grads_i and hv_i packed back at the same offsets
(Pearlmutter 1994: Hv = R{grad}).
"""
import math

import numpy as np

from . import batchnorm as bn
from . import conv2d as cv
from . import linear as ln
from . import losses
from . import maxpool as mp
from . import relu as rl
from . import reshape as rs

# Layer kinds and their settings (LayerSpec.settings):
#   Linear                       params w (D_in, D_out), b (D_out,)
#   Conv2d      stride, padding  params w (3, 3, C_in, C_out), b (C_out,)
#   BatchNorm   mode ('batch' or 'running'), eps; running_mean, running_var (C,) for
#               'running'                     params gamma (C,), beta (C,)
#   ReLU, MaxPool2d, Flatten, MeanPool       no parameters, no settings
KINDS = ("Linear", "Conv2d", "BatchNorm", "ReLU", "MaxPool2d", "Flatten", "MeanPool")


class LayerSpec:
    """One layer: kind (one of KINDS; any other name is refused when the layer is run),
    params [(name, shape, offset in the flat vector)], settings {name: value}."""

    def __init__(self, kind, params=(), **settings):
        self.kind = kind
        self.params = [(name, tuple(shape), int(offset)) for name, shape, offset in params]
        self.settings = settings


class ModelSpec:
    """A sequence of LayerSpec over one flat parameter vector of num_params entries, with a
    loss name (a key of reference.losses.LOSSES) or None."""

    def __init__(self, name, layers, num_params, loss_name=None):
        self.name, self.layers = name, list(layers)
        self.num_params, self.loss_name = int(num_params), loss_name


def as_spec(model):
    """A ModelSpec as it is, or the one model.reference_spec() gives."""
    if isinstance(model, ModelSpec):
        return model
    describe = getattr(model, "reference_spec", None)
    if describe is None:
        raise TypeError(f"reference model: expected a ModelSpec or an object with a "
                        f"reference_spec() method, got {type(model).__name__}")
    return describe()


def _unpack(spec, theta_t):
    """theta_t: (P,) -> per layer {param: float64 array of the layer's shape} (fresh)."""
    theta_t = np.asarray(theta_t, np.float64)
    return [{p: theta_t[off:off + math.prod(shape)].reshape(shape).copy()
             for p, shape, off in layer.params}
            for layer in spec.layers]


def _pack(spec, per_layer):
    """per layer {param: array} -> (P,) float64."""
    flat = np.zeros(spec.num_params)
    for layer, grads in zip(spec.layers, per_layer):
        for p, shape, off in layer.params:
            flat[off:off + math.prod(shape)] = np.asarray(grads[p]).reshape(-1)
    return flat


def _bn_stats(layer):
    s = layer.settings
    return np.asarray(s["running_mean"], np.float64), np.asarray(s["running_var"], np.float64)


def _forward(layer, h, p):
    """One layer's forward on one task's activations h."""
    kind, st = layer.kind, layer.settings
    if kind == "Linear":
        return ln.linear_forward(h, p["w"], p["b"])
    if kind == "Conv2d":
        return cv.conv2d_forward(h, p["w"], p["b"], st["stride"], st["padding"])
    if kind == "BatchNorm":
        if st["mode"] == "batch":
            return bn.batchnorm_forward(h, p["gamma"], p["beta"], st["eps"])
        return bn.batchnorm_running_forward(h, p["gamma"], p["beta"], *_bn_stats(layer),
                                            st["eps"])
    if kind == "ReLU":
        return rl.relu_forward(h)
    if kind == "MaxPool2d":
        return mp.maxpool_forward(h)
    if kind == "Flatten":
        return rs.flatten_forward(h)
    if kind == "MeanPool":
        return rs.meanpool_forward(h)
    raise TypeError(f"reference model: no reference for layer type {kind}")


def _backward(layer, dy, h, p):
    """-> dx, {param: grad}."""
    kind, st = layer.kind, layer.settings
    if kind == "Linear":
        dx, dw, db = ln.linear_backward(dy, h, p["w"])
        return dx, {"w": dw, "b": db}
    if kind == "Conv2d":
        dx, dw, db = cv.conv2d_backward(dy, h, p["w"], st["stride"], st["padding"])
        return dx, {"w": dw, "b": db}
    if kind == "BatchNorm":
        if st["mode"] == "batch":
            dx, dg, db = bn.batchnorm_backward(dy, h, p["gamma"], st["eps"])
        else:
            dx, dg, db = bn.batchnorm_running_backward(dy, h, p["gamma"], *_bn_stats(layer),
                                                       st["eps"])
        return dx, {"gamma": dg, "beta": db}
    if kind == "ReLU":
        return rl.relu_backward(dy, h), {}
    if kind == "MaxPool2d":
        return mp.maxpool_backward(dy, h), {}
    if kind == "Flatten":
        return rs.flatten_backward(dy, h.shape), {}
    if kind == "MeanPool":
        return rs.meanpool_backward(dy, h.shape), {}
    raise TypeError(f"reference model: no reference for layer type {kind}")


def _rforward(layer, h, p, rh, rp):
    """-> R{layer output} along (rh, rp)."""
    kind, st = layer.kind, layer.settings
    if kind == "Linear":
        return ln.linear_rforward(h, p["w"], rh, rp["w"], rp["b"])
    if kind == "Conv2d":
        return cv.conv2d_rforward(h, p["w"], rh, rp["w"], rp["b"], st["stride"], st["padding"])
    if kind == "BatchNorm":
        if st["mode"] == "batch":
            return bn.batchnorm_rforward(h, p["gamma"], rh, rp["gamma"], rp["beta"], st["eps"])
        return bn.batchnorm_running_rforward(h, p["gamma"], rh, rp["gamma"], rp["beta"],
                                             *_bn_stats(layer), st["eps"])
    if kind == "ReLU":
        return rl.relu_rforward(h, rh)
    if kind == "MaxPool2d":
        return mp.maxpool_rforward(h, rh)
    if kind == "Flatten":
        return rs.flatten_rforward(rh)
    if kind == "MeanPool":
        return rs.meanpool_rforward(rh)
    raise TypeError(f"reference model: no reference for layer type {kind}")


def _rbackward(layer, dy, rdy, h, p, rh, rp):
    """-> R{dx}, {param: R{grad}} along (rh, rp) with R{dy} = rdy."""
    kind, st = layer.kind, layer.settings
    if kind == "Linear":
        rdx, rdw, rdb = ln.linear_rbackward(dy, rdy, h, p["w"], rh, rp["w"])
        return rdx, {"w": rdw, "b": rdb}
    if kind == "Conv2d":
        rdx, rdw, rdb = cv.conv2d_rbackward(dy, rdy, h, p["w"], rh, rp["w"], st["stride"],
                                            st["padding"])
        return rdx, {"w": rdw, "b": rdb}
    if kind == "BatchNorm":
        if st["mode"] == "batch":
            rdx, rdg, rdb = bn.batchnorm_rbackward(dy, rdy, h, p["gamma"], rh, rp["gamma"],
                                                   st["eps"])
        else:
            rdx, rdg, rdb = bn.batchnorm_running_rbackward(dy, rdy, h, p["gamma"], rh,
                                                           rp["gamma"], *_bn_stats(layer),
                                                           st["eps"])
        return rdx, {"gamma": rdg, "beta": rdb}
    if kind == "ReLU":
        return rl.relu_rbackward(dy, rdy, h), {}
    if kind == "MaxPool2d":
        return mp.maxpool_rbackward(dy, rdy, h), {}
    if kind == "Flatten":
        return rs.flatten_rbackward(dy, rdy, h.shape), {}
    if kind == "MeanPool":
        return rs.meanpool_rbackward(dy, rdy, h.shape), {}
    raise TypeError(f"reference model: no reference for layer type {kind}")


def _inputs_one_task(spec, params, x_t):
    """-> [h_0 = x_t, h_1, ..., h_L = out]: every layer's input, then the output."""
    hs = [np.asarray(x_t, np.float64)]
    for layer, p in zip(spec.layers, params):
        hs.append(_forward(layer, hs[-1], p))
    return hs


def reference_forward(model, theta, x, return_inputs=False):
    """model: a ModelSpec (or has reference_spec()); theta: (T, P), x: (T, N, *in_shape)
    -> out: (T, N, *out_shape) float64.
    return_inputs=True also returns, per task, the list of every layer's input (h_0..h_L)."""
    spec = as_spec(model)
    theta, x = np.asarray(theta, np.float64), np.asarray(x, np.float64)
    outs, inputs = [], []
    for t in range(theta.shape[0]):
        hs = _inputs_one_task(spec, _unpack(spec, theta[t]), x[t])
        outs.append(hs[-1])
        inputs.append(hs)
    out = np.stack(outs)
    return (out, inputs) if return_inputs else out


def reference_loss_grad_hvp(model, theta, x, target, v, loss=None):
    """model: a ModelSpec (or has reference_spec()); theta, v: (T, P), x: (T, N, *in_shape),
    target: per-task targets (target[t] is passed to the loss) -> loss (T,), grad (T, P),
    Hv (T, P), all float64 (Hv None when v is None).

    loss: None for the model's loss_name, or a triple of one-task functions
    (forward(out, target) -> L, backward(out, target) -> dout,
     rbackward(rout, out, target) -> R{dout}), e.g. a probe loss for a model without one."""
    spec = as_spec(model)
    if loss is None:
        if spec.loss_name is None:
            raise ValueError(f"reference model: {spec.name} has no loss; pass loss=(f, df, rdf)")
        loss = losses.LOSSES[spec.loss_name]
    lfwd, lbwd, lrbwd = loss
    with_hvp = v is not None
    theta, x = np.asarray(theta, np.float64), np.asarray(x, np.float64)
    v = np.asarray(v, np.float64) if with_hvp else np.zeros_like(theta)
    T = theta.shape[0]
    L = np.zeros(T)                                           # (T,)
    grad = np.zeros((T, spec.num_params))                    # (T, P)
    hv = np.zeros((T, spec.num_params))                      # (T, P)
    for t in range(T):
        params, rparams = _unpack(spec, theta[t]), _unpack(spec, v[t])
        hs = _inputs_one_task(spec, params, x[t])
        rhs = [np.zeros_like(hs[0])]
        if with_hvp:
            for layer, p, rp, h in zip(spec.layers, params, rparams, hs):
                rhs.append(_rforward(layer, h, p, rhs[-1], rp))
        out = hs[-1]
        L[t] = lfwd(out, target[t])
        g = lbwd(out, target[t])
        rg = lrbwd(rhs[-1], out, target[t]) if with_hvp else None
        grads, hvs = [None] * len(spec.layers), [None] * len(spec.layers)
        for i in range(len(spec.layers) - 1, -1, -1):
            layer, p, rp = spec.layers[i], params[i], rparams[i]
            if with_hvp:
                rg, hvs[i] = _rbackward(layer, g, rg, hs[i], p, rhs[i], rp)
            g, grads[i] = _backward(layer, g, hs[i], p)
        grad[t] = _pack(spec, grads)
        if with_hvp:
            hv[t] = _pack(spec, hvs)
    return L, grad, (hv if with_hvp else None)


def reference_loss_and_grad(model, theta, x, target, loss=None):
    """The same without the R-passes: -> loss (T,), grad (T, P), float64."""
    L, grad, _ = reference_loss_grad_hvp(model, theta, x, target, None, loss)
    return L, grad
