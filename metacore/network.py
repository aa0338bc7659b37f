"""Layers as objects that own their parameter shapes, and a sequential Model with loss,
gradient and Hessian-vector product for a batch of tasks whose parameters differ.

Each layer object only adapts the plain function pairs of metacore.layers to one calling
convention; all the math lives there:
  forward(x, p)                         -> y, cache
  backward(dy, cache, need_dx)          -> dx or None, {param: grad}
  rforward(rx, rp, cache)               -> ry, rcache            (rx None: input is data)
  rbackward(dy, rdy, cache, rcache, need_dx) -> rdx or None, {param: R{grad}}
p, rp: {param name: (T, *shape) array}.

Shapes: T tasks, N points (or images) per task, P parameters per task.
"""
import math

import numpy as np

from metacore.layers import batchnorm as bn
from metacore.layers import conv2d as cv
from metacore.layers import linear as ln
from metacore.layers import maxpool as mp
from metacore.layers import relu as rl
from metacore.layers import reshape as rs
from metacore.losses import bce_logits, mse, softmax_ce
from metacore.nonfinite import all_finite, report
from metacore.params import ParamLayout
from metacore.validate import check_float_array, check_int_array


def truncated_normal(rng, shape, std, dtype):
    """Normal(0, std) redrawn outside +-2 std, as TensorFlow's truncated_normal (MAML's init)."""
    out = rng.standard_normal(shape)
    bad = np.abs(out) > 2.0
    while bad.any():
        out[bad] = rng.standard_normal(int(bad.sum()))
        bad = np.abs(out) > 2.0
    return (out * std).astype(dtype)


class _WeightBias:
    """Adapter for the bilinear ops with a weight w and a bias b (Linear, Conv2d): their
    backward and R-passes share one signature, given as the class attributes _bwd, _rfwd,
    _rbwd; subclasses define forward (which knows the op's own settings)."""

    def backward(self, dy, cache, need_dx=True):
        dx, dw, db = self._bwd(dy, cache, need_dx)
        return dx, {"w": dw, "b": db}

    def rforward(self, rx, rp, cache):
        return self._rfwd(rx, rp["w"], rp["b"], cache)

    def rbackward(self, dy, rdy, cache, rcache, need_dx=True):
        rdx, rdw, rdb = self._rbwd(dy, rdy, cache, rcache, need_dx)
        return rdx, {"w": rdw, "b": rdb}


class Linear(_WeightBias):
    _bwd, _rfwd = staticmethod(ln.linear_backward), staticmethod(ln.linear_rforward)
    _rbwd = staticmethod(ln.linear_rbackward)

    def __init__(self, d_in, d_out, init="glorot", init_std=0.01):
        self.d_in, self.d_out, self.init_kind, self.init_std = d_in, d_out, init, init_std
        self.params = [("w", (d_in, d_out)), ("b", (d_out,))]

    def out_shape(self, s):
        if s != (self.d_in,):
            raise ValueError(f"Linear({self.d_in}, {self.d_out}): input features {s}, "
                             f"expected ({self.d_in},)")
        return (self.d_out,)

    def init(self, rng, dtype):
        if self.init_kind == "truncated_normal":           # Finn et al.'s sinusoid MLP
            w = truncated_normal(rng, (self.d_in, self.d_out), self.init_std, dtype)
        else:                                               # Glorot/Xavier uniform
            a = math.sqrt(6.0 / (self.d_in + self.d_out))
            w = rng.uniform(-a, a, (self.d_in, self.d_out)).astype(dtype)
        return {"w": w, "b": np.zeros(self.d_out, dtype)}

    def forward(self, x, p):
        return ln.linear_forward(x, p["w"], p["b"])


class Conv2d(_WeightBias):
    _bwd, _rfwd = staticmethod(cv.conv2d_backward), staticmethod(cv.conv2d_rforward)
    _rbwd = staticmethod(cv.conv2d_rbackward)

    def __init__(self, c_in, c_out, stride=1, padding="same"):
        cv.conv2d_geometry(3, 3, stride, padding)          # validates stride and padding
        self.c_in, self.c_out, self.stride, self.padding = c_in, c_out, stride, padding
        self.params = [("w", (3, 3, c_in, c_out)), ("b", (c_out,))]

    def out_shape(self, s):
        if len(s) != 3 or s[2] != self.c_in:
            raise ValueError(f"Conv2d({self.c_in}->{self.c_out}): input image shape {s}, "
                             f"expected (H, W, {self.c_in})")
        Ho, Wo, _, _ = cv.conv2d_geometry(s[0], s[1], self.stride, self.padding)
        return (Ho, Wo, self.c_out)

    def init(self, rng, dtype):
        a = math.sqrt(6.0 / (9 * self.c_in + 9 * self.c_out))   # Glorot uniform, as MAML
        w = rng.uniform(-a, a, (3, 3, self.c_in, self.c_out)).astype(dtype)
        return {"w": w, "b": np.zeros(self.c_out, dtype)}

    def forward(self, x, p):
        return cv.conv2d_forward(x, p["w"], p["b"], self.stride, self.padding)


class BatchNorm:
    """mode='batch': statistics of each task's batch (MAML). mode='running': the fixed
    buffers running_mean / running_var, shape (C,), shared by all tasks (not parameters)."""

    def __init__(self, channels, mode="batch", eps=1e-5):
        if mode not in ("batch", "running"):
            raise ValueError(f"BatchNorm: mode must be 'batch' or 'running', got {mode!r}")
        self.channels, self.mode, self.eps = channels, mode, eps
        self.params = [("gamma", (channels,)), ("beta", (channels,))]
        self.running_mean = np.zeros(channels)
        self.running_var = np.ones(channels)

    def out_shape(self, s):
        if s[-1] != self.channels:
            raise ValueError(f"BatchNorm({self.channels}): input shape {s} has "
                             f"{s[-1]} channels")
        return s

    def init(self, rng, dtype):
        return {"gamma": np.ones(self.channels, dtype), "beta": np.zeros(self.channels, dtype)}

    def _stats(self, T, dtype):
        shape = (T, self.channels)
        return (np.broadcast_to(self.running_mean.astype(dtype), shape),
                np.broadcast_to(self.running_var.astype(dtype), shape))

    def forward(self, x, p):
        if self.mode == "batch":
            return bn.batchnorm_forward(x, p["gamma"], p["beta"], self.eps)
        m, v = self._stats(x.shape[0], x.dtype)
        return bn.batchnorm_running_forward(x, p["gamma"], p["beta"], m, v, self.eps)

    def backward(self, dy, cache, need_dx=True):
        f = bn.batchnorm_backward if self.mode == "batch" else bn.batchnorm_running_backward
        dx, dg, db = f(dy, cache)
        return dx, {"gamma": dg, "beta": db}

    def forward_relu(self, x, p):
        """This layer then a ReLU (batch mode only): -> y, this layer's cache, the ReLU's."""
        return bn.batchnorm_relu_forward(x, p["gamma"], p["beta"], self.eps)

    def backward_relu(self, dy, relu_cache, cache):
        """The ReLU after this layer (its cache relu_cache) then this layer, backward (batch
        mode only): -> dx, {param: grad}."""
        dx, dg, db = bn.batchnorm_relu_backward(dy, relu_cache, cache)
        return dx, {"gamma": dg, "beta": db}

    def rforward(self, rx, rp, cache):
        f = bn.batchnorm_rforward if self.mode == "batch" else bn.batchnorm_running_rforward
        return f(rx, rp["gamma"], rp["beta"], cache)

    def rbackward(self, dy, rdy, cache, rcache, need_dx=True):
        f = bn.batchnorm_rbackward if self.mode == "batch" else bn.batchnorm_running_rbackward
        rdx, rdg, rdb = f(dy, rdy, cache, rcache)
        return rdx, {"gamma": rdg, "beta": rdb}


class _Parameterless:
    """Adapter for ops without parameters: fwd(x) -> (y, cache), bwd(dy, cache),
    rfwd(rx, cache) -> (ry, rcache), rbwd(dy, rdy, cache, rcache)."""
    params = []

    def init(self, rng, dtype):
        return {}

    def forward(self, x, p):
        return self._fwd(x)

    def backward(self, dy, cache, need_dx=True):
        return (self._bwd(dy, cache) if need_dx else None), {}

    def rforward(self, rx, rp, cache):
        if rx is None:
            return None, None
        return self._rfwd(rx, cache)

    def rbackward(self, dy, rdy, cache, rcache, need_dx=True):
        return (self._rbwd(dy, rdy, cache, rcache) if need_dx else None), {}


class ReLU(_Parameterless):
    _fwd, _bwd = staticmethod(rl.relu_forward), staticmethod(rl.relu_backward)
    _rfwd, _rbwd = staticmethod(rl.relu_rforward), staticmethod(rl.relu_rbackward)

    def out_shape(self, s):
        return s


class MaxPool2d(_Parameterless):
    _fwd, _bwd = staticmethod(mp.maxpool_forward), staticmethod(mp.maxpool_backward)
    _rfwd, _rbwd = staticmethod(mp.maxpool_rforward), staticmethod(mp.maxpool_rbackward)

    def out_shape(self, s):
        if len(s) != 3 or s[0] < 2 or s[1] < 2:
            raise ValueError(f"MaxPool2d: input image shape {s}, expected (H>=2, W>=2, C)")
        return (s[0] // 2, s[1] // 2, s[2])


class Flatten(_Parameterless):
    _fwd, _bwd = staticmethod(rs.flatten_forward), staticmethod(rs.flatten_backward)
    _rfwd, _rbwd = staticmethod(rs.flatten_rforward), staticmethod(rs.flatten_rbackward)

    def out_shape(self, s):
        return (math.prod(s),)


class MeanPool(_Parameterless):
    _fwd, _bwd = staticmethod(rs.meanpool_forward), staticmethod(rs.meanpool_backward)
    _rfwd, _rbwd = staticmethod(rs.meanpool_rforward), staticmethod(rs.meanpool_rbackward)

    def out_shape(self, s):
        if len(s) != 3:
            raise ValueError(f"MeanPool: input image shape {s}, expected (H, W, C)")
        return (s[2],)


def _reference_layer(layer):
    """(kind, settings) of one layer for metacore.reference.model.LayerSpec. A type the
    reference does not know keeps its class name, which the reference then refuses by name."""
    kind = _REFERENCE_KINDS.get(type(layer), type(layer).__name__)
    if isinstance(layer, Conv2d):
        return kind, dict(stride=layer.stride, padding=layer.padding)
    if isinstance(layer, BatchNorm):
        return kind, dict(mode=layer.mode, eps=layer.eps, running_mean=layer.running_mean,
                          running_var=layer.running_var)
    return kind, {}


_REFERENCE_KINDS = {Linear: "Linear", Conv2d: "Conv2d", BatchNorm: "BatchNorm", ReLU: "ReLU",
                    MaxPool2d: "MaxPool2d", Flatten: "Flatten", MeanPool: "MeanPool"}


# ------------------------------------------------------------------------------ losses
LOSSES = {
    "mse": (mse.mse_forward, mse.mse_backward, mse.mse_rbackward),
    "softmax_ce": (softmax_ce.softmax_ce_forward, softmax_ce.softmax_ce_backward,
                   softmax_ce.softmax_ce_rbackward),
    "bce_logits": (bce_logits.bce_logits_forward, bce_logits.bce_logits_backward,
                   bce_logits.bce_logits_rbackward),
}


class Model:
    """A sequence of layers over one flat parameter vector, and an optional loss.

    theta: (T, P), one parameter vector per task; x: (T, N, *in_shape); targets: (T, N, O)
    floats for 'mse', (T, N) integer labels for 'softmax_ce', (T, N, O) in [0, 1] for
    'bce_logits'. Every method works on all T tasks at once (no Python loop over tasks).
    """

    def __init__(self, name, layers, in_shape, loss=None):
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"Model {name}: unknown loss {loss!r}, expected one of {sorted(LOSSES)}")
        self.name, self.layers, self.in_shape, self.loss_name = name, layers, tuple(in_shape), loss
        blocks, shape = [], self.in_shape
        self.layer_names = []
        for i, layer in enumerate(layers):
            lname = f"{i}.{type(layer).__name__.lower()}"
            self.layer_names.append(lname)
            blocks += [(f"{lname}.{p}", s) for p, s in layer.params]
            shape = layer.out_shape(shape)
        self.out_shape = shape
        self.layout = ParamLayout(blocks)
        self.num_params = self.layout.size

    def __repr__(self):
        return (f"Model({self.name}: in {self.in_shape} -> out {self.out_shape}, "
                f"{self.num_params} parameters, loss={self.loss_name})")

    def reference_spec(self):
        """This model in the terms of the plain NumPy ground truth: a
        metacore.reference.model.ModelSpec whose layers carry their kind, their parameters'
        (name, shape, offset) in the flat vector and their settings (BN running statistics
        as they are now). The reference_* functions there call it."""
        from metacore.reference.model import LayerSpec, ModelSpec
        layers = []
        for lname, layer in zip(self.layer_names, self.layers):
            params = [(p, shape, self.layout.slice(f"{lname}.{p}").start)
                      for p, shape in layer.params]
            kind, settings = _reference_layer(layer)
            layers.append(LayerSpec(kind, params, **settings))
        return ModelSpec(self.name, layers, self.num_params, self.loss_name)

    # ------------------------------------------------------------------ parameters
    def init_params(self, rng, dtype=np.float64):
        """A fresh (P,) parameter vector from each layer's initialiser."""
        theta = np.empty(self.num_params, dtype)
        for lname, layer in zip(self.layer_names, self.layers):
            for pname, value in layer.init(rng, dtype).items():
                theta[self.layout.slice(f"{lname}.{pname}")] = value.reshape(-1)
        return theta

    def _split(self, theta):
        """(T, P) -> per layer {param: (T, *shape) view}."""
        views = self.layout.views(theta)
        return [{p: views[f"{lname}.{p}"] for p, _ in layer.params}
                for lname, layer in zip(self.layer_names, self.layers)]

    def _join(self, per_layer, T, dtype):
        """Per layer {param: (T, *shape)} -> a fresh (T, P) vector."""
        flat = np.empty((T, self.num_params), dtype)
        views = self.layout.views(flat)
        for lname, grads in zip(self.layer_names, per_layer):
            for p, g in grads.items():
                views[f"{lname}.{p}"][...] = g
        return flat

    # ------------------------------------------------------------------ BN buffers
    def batchnorm_layers(self):
        return [(n, l) for n, l in zip(self.layer_names, self.layers) if isinstance(l, BatchNorm)]

    def set_bn_mode(self, mode):
        """'batch' (each task's own batch statistics) or 'running' (the buffers) for every
        BatchNorm layer, e.g. 'batch' to train and 'running' to evaluate one query at a time."""
        for _, layer in self.batchnorm_layers():
            if mode not in ("batch", "running"):
                raise ValueError(f"Model {self.name}: BN mode must be 'batch' or 'running', "
                                 f"got {mode!r}")
            layer.mode = mode

    def update_running_stats(self, caches, momentum=0.1):
        """After a batch-mode forward pass: running <- (1 - m) running + m batch statistic, the
        batch statistic averaged over the T tasks (the variance biased, as normalised)."""
        for (name, layer), cache in zip(self.batchnorm_layers(),
                                        [c for l, c in zip(self.layers, caches)
                                         if isinstance(l, BatchNorm)]):
            if layer.mode != "batch":
                raise ValueError(f"Model {self.name}: {name} is in running mode; its forward "
                                 f"pass has no batch statistics")
            _, _, _, mu, var = cache
            C = layer.channels
            layer.running_mean = ((1 - momentum) * layer.running_mean
                                  + momentum * mu.reshape(-1, C).mean(axis=0))
            layer.running_var = ((1 - momentum) * layer.running_var
                                 + momentum * var.reshape(-1, C).mean(axis=0))

    def buffers(self):
        """{name: array} of the BN running statistics (float64 copies), for checkpoints."""
        out = {}
        for name, layer in self.batchnorm_layers():
            out[f"{name}.running_mean"] = layer.running_mean.astype(np.float64)
            out[f"{name}.running_var"] = layer.running_var.astype(np.float64)
        return out

    def load_buffers(self, buffers):
        """Inverse of buffers(); every BN layer's two arrays must be present, shape (C,)."""
        for name, layer in self.batchnorm_layers():
            for key in ("running_mean", "running_var"):
                full = f"{name}.{key}"
                if full not in buffers:
                    raise ValueError(f"Model {self.name}: buffer {full!r} missing")
                a = np.asarray(buffers[full], np.float64)
                if a.shape != (layer.channels,):
                    raise ValueError(f"Model {self.name}: buffer {full!r} has shape {a.shape}, "
                                     f"expected ({layer.channels},)")
                setattr(layer, key, a.copy())

    # ------------------------------------------------------------------ validation
    def _check(self, theta, x, target=None, v=None):
        op = f"Model {self.name}"
        check_float_array(op, "theta", theta, ndim=2)
        if theta.shape[1] != self.num_params:
            raise ValueError(f"{op}: theta has {theta.shape[1]} parameters per task, the model "
                             f"has {self.num_params} (theta shape {theta.shape}, expected "
                             f"(T, {self.num_params}))")
        if v is not None:
            check_float_array(op, "v", v, shape=theta.shape, dtype=theta.dtype)
        self._check_data(theta.shape[0], theta.dtype, x, target)
        return np.ascontiguousarray(theta), x

    def _check_data(self, T, dtype, x, target=None):
        """x (T, N, *in_shape) of `dtype` and, if given, its targets, checked as _check does
        (without a theta: the algorithms check their shared (P,) theta once themselves)."""
        op = f"Model {self.name}"
        check_float_array(op, "x", x, shape=(T, None) + self.in_shape, dtype=dtype)
        if target is not None:
            N = x.shape[1]
            if self.loss_name is None:
                raise ValueError(f"{op}: has no loss; use forward/backward with your own loss")
            if self.loss_name == "softmax_ce":
                check_int_array(op, "labels", target, shape=(T, N), low=0,
                                high=self.out_shape[-1])
            else:
                check_float_array(op, "targets", target, shape=(T, N) + self.out_shape,
                                  dtype=dtype)
                if self.loss_name == "bce_logits" and (target.min() < 0 or target.max() > 1):
                    raise ValueError(f"{op}: bce_logits targets must lie in [0, 1], got range "
                                     f"[{target.min()}, {target.max()}]")

    # ------------------------------------------------------------------ passes
    def _bn_relu_pairs(self):
        """Indices i of the batch-statistics BatchNorm layers followed by a ReLU: forward and
        backward run each such pair as one op (one pass over the activations less, the same
        bits and caches as layer by layer); the R-passes stay per layer."""
        return {i for i in range(len(self.layers) - 1)
                if isinstance(self.layers[i], BatchNorm) and self.layers[i].mode == "batch"
                and isinstance(self.layers[i + 1], ReLU)}

    def forward(self, theta, x, _checked=False):
        """-> out (T, N, *out_shape), caches (one per layer)."""
        if not _checked:
            theta, x = self._check(theta, x)
        caches, h = [], x
        pairs, params, i = self._bn_relu_pairs(), self._split(theta), 0
        while i < len(self.layers):
            if i in pairs:                       # BatchNorm + ReLU: one op, two caches
                h, c, mask = self.layers[i].forward_relu(h, params[i])
                caches += [c, mask]
                i += 2
                continue
            h, c = self.layers[i].forward(h, params[i])
            caches.append(c)
            i += 1
        return h, caches

    def backward(self, dout, caches, T, return_dx=False):
        """dout: d loss / d out (T, N, *out_shape) -> grad (T, P); with return_dx also the
        gradient with respect to the input x, (grad, dx (T, N, *in_shape)), for a model
        whose input is another model's output (Relation Networks)."""
        grads, g = [None] * len(self.layers), dout
        pairs, i = self._bn_relu_pairs(), len(self.layers) - 1
        while i >= 0:
            if i - 1 in pairs:                   # ReLU then its BatchNorm: one op
                g, grads[i - 1] = self.layers[i - 1].backward_relu(g, caches[i], caches[i - 1])
                grads[i] = {}
                i -= 2
                continue
            g, grads[i] = self.layers[i].backward(g, caches[i], need_dx=i > 0 or return_dx)
            i -= 1
        grad = self._join(grads, T, dout.dtype)
        return (grad, g) if return_dx else grad

    def rforward(self, v, caches):
        """v: (T, P) direction -> R{out} (T, N, *out_shape), rcaches."""
        rcaches, rh = [], None                   # R{x} = 0: the data does not depend on theta
        for layer, rp, c in zip(self.layers, self._split(v), caches):
            rh, rc = layer.rforward(rh, rp, c)
            rcaches.append(rc)
        return rh, rcaches

    def backward_and_rbackward(self, dout, rdout, caches, rcaches, T):
        """One backward sweep carrying d and R{d}: -> grad (T, P), H v (T, P)."""
        grads, hv = [None] * len(self.layers), [None] * len(self.layers)
        g, rg = dout, rdout
        for i in range(len(self.layers) - 1, -1, -1):
            layer, need_dx = self.layers[i], i > 0
            rg_next, hv[i] = layer.rbackward(g, rg, caches[i], rcaches[i], need_dx)
            g, grads[i] = layer.backward(g, caches[i], need_dx)
            rg = rg_next
        return self._join(grads, T, dout.dtype), self._join(hv, T, dout.dtype)

    # ------------------------------------------------------------------ with the loss
    def loss(self, theta, x, target):
        """-> per-task loss (T,)."""
        theta, x = self._check(theta, x, target)
        out, _ = self.forward(theta, x, _checked=True)
        loss = LOSSES[self.loss_name][0](out, target)[0]
        if not all_finite(loss):
            self._nonfinite("loss", {"loss": loss})
        return loss

    def loss_and_grad(self, theta, x, target):
        """-> loss (T,), grad (T, P): task t's gradient of its own loss."""
        theta, x = self._check(theta, x, target)
        lfwd, lbwd, _ = LOSSES[self.loss_name]
        out, caches = self.forward(theta, x, _checked=True)
        loss, lcache = lfwd(out, target)
        grad = self.backward(lbwd(lcache), caches, theta.shape[0])
        if not (all_finite(loss) and all_finite(grad)):
            self._nonfinite("loss_and_grad", {"loss": loss, "gradient": grad})
        return loss, grad

    def hvp(self, theta, x, target, v):
        """Exact Hessian-vector product by Pearlmutter's R-operator, in one call:
        -> loss (T,), grad (T, P), H v (T, P), each task with its own Hessian."""
        theta, x = self._check(theta, x, target, v)
        lfwd, lbwd, lrbwd = LOSSES[self.loss_name]
        T = theta.shape[0]
        out, caches = self.forward(theta, x, _checked=True)
        loss, lcache = lfwd(out, target)
        dout = lbwd(lcache)
        rout, rcaches = self.rforward(np.ascontiguousarray(v), caches)
        rdout = lrbwd(rout, lcache)
        grad, hv = self.backward_and_rbackward(dout, rdout, caches, rcaches, T)
        if not (all_finite(loss) and all_finite(grad) and all_finite(hv)):
            self._nonfinite("hvp", {"loss": loss, "gradient": grad, "Hv": hv})
        return loss, grad, hv

    def _nonfinite(self, op, outputs):
        """A non-finite loss or gradient from finite inputs (checked on entry): raise or
        warn per metacore.nonfinite's policy."""
        dtype = next(iter(outputs.values())).dtype
        report(f"Model {self.name}.{op}", dtype, outputs,
               hint="learning rate (the parameters or activations grew too large)")
