"""The peer workloads in PyTorch, written the way a PyTorch user would: eager autograd
(a loop over tasks with create_graph=True for second-order MAML), and torch.func (grad and
vmap over tasks). float32, CPU.

build(variant, w, inputs) -> zero-argument call returning a tuple of numpy-convertible
tensors in the order of w.outputs. variant is "torch-eager" or "torch-func".
"""
import numpy as np
import torch
from torch.func import grad, vmap

from bench.peers import workloads as W


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------- sinusoid MLP
def _mlp_params(theta):
    from metacore.models import sinusoid_mlp
    th = _t(theta)
    return [(th[ws].reshape(wsh).clone(), th[bs].reshape(bsh).clone())
            for ws, wsh, bs, bsh in W.sinusoid_layers(sinusoid_mlp())]


def _mlp(params, x):
    """params: flat list w0, b0, w1, b1, ...; x (N, 1) -> (N, 1)."""
    L = len(params) // 2
    for i in range(L):
        x = x @ params[2 * i] + params[2 * i + 1]
        if i < L - 1:
            x = torch.relu(x)
    return x


def _mse(params, x, y):
    return ((_mlp(params, x) - y) ** 2).mean()


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def sinusoid_eager(kind, k, inputs):
    alpha = W.SINUSOID["alpha"]
    params = [p.requires_grad_() for pair in _mlp_params(inputs["theta"]) for p in pair]
    sx, sy, qx, qy = (_t(inputs[n]) for n in ("sx", "sy", "qx", "qy"))
    T = sx.shape[0]

    def maml():
        for p in params:
            p.grad = None
        losses = []
        for t in range(T):
            fast = params
            for _ in range(k):
                g = torch.autograd.grad(_mse(fast, sx[t], sy[t]), fast, create_graph=True)
                fast = [p - alpha * gi for p, gi in zip(fast, g)]
            losses.append(_mse(fast, qx[t], qy[t]))
        losses = torch.stack(losses)
        losses.mean().backward()
        return losses.detach(), _flat([p.grad for p in params])

    def fomaml():
        losses, total = [], None
        for t in range(T):
            fast = [p.detach() for p in params]
            for _ in range(k):
                fast = [f.requires_grad_() for f in fast]
                g = torch.autograd.grad(_mse(fast, sx[t], sy[t]), fast)
                fast = [(f - alpha * gi).detach() for f, gi in zip(fast, g)]
            fast = [f.requires_grad_() for f in fast]
            loss = _mse(fast, qx[t], qy[t])
            g = _flat(torch.autograd.grad(loss, fast))
            total = g if total is None else total + g
            losses.append(loss.detach())
        return torch.stack(losses), total / T

    def reptile():
        loss0, total = [], None
        theta = _flat([p.detach() for p in params])
        for t in range(T):
            fast = [p.detach() for p in params]
            for i in range(k):
                fast = [f.requires_grad_() for f in fast]
                loss = _mse(fast, sx[t], sy[t])
                if i == 0:
                    loss0.append(loss.detach())
                g = torch.autograd.grad(loss, fast)
                fast = [(f - alpha * gi).detach() for f, gi in zip(fast, g)]
            total = _flat(fast) if total is None else total + _flat(fast)
        return torch.stack(loss0), theta - total / T

    return {"maml": maml, "fomaml": fomaml, "reptile": reptile}[kind]


def sinusoid_func(kind, k, inputs):
    alpha = W.SINUSOID["alpha"]
    params = tuple(p for pair in _mlp_params(inputs["theta"]) for p in pair)
    sx, sy, qx, qy = (_t(inputs[n]) for n in ("sx", "sy", "qx", "qy"))

    def adapt(p, x, y):
        for _ in range(k):
            g = grad(_mse)(p, x, y)
            p = tuple(pi - alpha * gi for pi, gi in zip(p, g))
        return p

    def task_loss(p, x, y, xq, yq):
        return _mse(adapt(p, x, y), xq, yq)

    def meta(p):
        losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
        return losses.mean(), losses

    meta_grad = grad(meta, has_aux=True)

    def maml():
        g, losses = meta_grad(params)
        return losses, _flat(g)

    def fomaml():
        fast = vmap(adapt, in_dims=(None, 0, 0))(params, sx, sy)      # each (T, ...)
        losses = vmap(_mse)(fast, qx, qy)
        g = vmap(grad(_mse))(fast, qx, qy)
        return losses, _flat([gi.mean(0) for gi in g])

    def reptile():
        loss0 = vmap(_mse, in_dims=(None, 0, 0))(params, sx, sy)
        fast = vmap(adapt, in_dims=(None, 0, 0))(params, sx, sy)
        return loss0, _flat(params) - _flat([f.mean(0) for f in fast])

    return {"maml": maml, "fomaml": fomaml, "reptile": reptile}[kind]


# ---------------------------------------------------------------- distance kernels
def distance(kind, inputs, variant):
    q = _t(inputs["q"]).requires_grad_()
    s = _t(inputs["s"]).requires_grad_()
    g, y = _t(inputs["g"]), _t(inputs["y"])

    def dist(q, s):
        return ((q * q).sum(-1)[:, :, None] + (s * s).sum(-1)[:, None, :]
                - 2 * q @ s.transpose(1, 2))

    def ploss(q, s):
        logits = -dist(q, s)                                    # (1, Q, N)
        return torch.nn.functional.cross_entropy(logits[0], y[0])

    if variant == "torch-func":
        if kind == "sqeuclidean":
            from torch.func import vjp

            def call():
                d, pull = vjp(dist, q.detach(), s.detach())
                dq, ds = pull(g)
                return d, dq, ds
            return call
        gl = torch.func.grad_and_value(ploss, argnums=(0, 1))

        def call():
            (dq, ds), loss = gl(q.detach(), s.detach())
            return loss.reshape(1), dq, ds
        return call

    if kind == "sqeuclidean":
        def call():
            q.grad = s.grad = None
            d = dist(q, s)
            d.backward(g)
            return d.detach(), q.grad, s.grad
        return call

    def call():
        q.grad = s.grad = None
        loss = ploss(q, s)
        loss.backward()
        return loss.detach().reshape(1), q.grad, s.grad
    return call


def build(variant, w, inputs):
    if w.kind in ("maml", "fomaml", "reptile"):
        make = sinusoid_eager if variant == "torch-eager" else sinusoid_func
        return make(w.kind, w.cfg["k"], inputs)
    if w.kind in ("sqeuclidean", "protonet_loss"):
        return distance(w.kind, inputs, variant)
    raise KeyError(w.kind)


def to_numpy(out):
    return tuple(o.detach().numpy() for o in out)


def setup_threads(n):
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
