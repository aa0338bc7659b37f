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


# ---------------------------------------------------------------- Conv-4 (NCHW inside)
def _layout_params(model, theta):
    """The flat vector as a tuple of tensors in the layout's order and shapes (conv weights
    stay (3, 3, C_in, C_out); the model permutes them, so the gradient keeps that layout)."""
    th = _t(theta)
    return tuple(th[off:off + int(np.prod(sh))].reshape(sh).clone()
                 for _, sh, off in model.layout.describe())


def _conv_same(x, w, b, stride):
    """x (B, C, H, W); w (3, 3, C_in, C_out) -> TensorFlow 'same' padding (extra row/column
    at the bottom/right), as metacore's conv2d_geometry."""
    H, Wd = x.shape[-2:]
    Ho, Wo = -(-H // stride), -(-Wd // stride)
    ph, pw = max((Ho - 1) * stride + 3 - H, 0), max((Wo - 1) * stride + 3 - Wd, 0)
    x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return torch.nn.functional.conv2d(x, w.permute(3, 2, 0, 1), b, stride=stride)


def _bn(x, gamma, beta, eps=1e-5):
    """Batch norm with the batch's own statistics (biased variance), over (B, H, W)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean((0, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * gamma[:, None, None] + beta[:, None, None]


def _conv4_maml(p, x):
    """x (B, 1, 28, 28) -> logits (B, n_way)."""
    for l in range(4):
        w, b, g, be = p[4 * l:4 * l + 4]
        x = torch.relu(_bn(_conv_same(x, w, b, 2), g, be))
    return x.mean((2, 3)) @ p[16] + p[17]


def _ce(p, x, y):
    return torch.nn.functional.cross_entropy(_conv4_maml(p, x), y)


def _nchw(a):
    return _t(a).permute(0, 1, 4, 2, 3).contiguous()      # (T, B, H, W, C) -> (T, B, C, H, W)


def conv4_maml(variant, cfg, inputs):
    from metacore.models import conv4_maml as model_fn
    alpha, k = cfg["alpha"], cfg["k"]
    params = _layout_params(model_fn(n_way=cfg["n_way"]), inputs["theta"])
    sx, qx = _nchw(inputs["sx"]), _nchw(inputs["qx"])
    sy, qy = _t(inputs["sy"]), _t(inputs["qy"])
    T = sx.shape[0]
    if variant == "torch-eager":
        ps = [p.requires_grad_() for p in params]

        def call():
            for p in ps:
                p.grad = None
            losses = []
            for t in range(T):
                fast = ps
                for _ in range(k):
                    g = torch.autograd.grad(_ce(fast, sx[t], sy[t]), fast, create_graph=True)
                    fast = [p - alpha * gi for p, gi in zip(fast, g)]
                losses.append(_ce(fast, qx[t], qy[t]))
            losses = torch.stack(losses)
            losses.mean().backward()
            return losses.detach(), _flat([p.grad for p in ps])
        return call

    def task_loss(p, x, y, xq, yq):
        for _ in range(k):
            g = grad(_ce)(p, x, y)
            p = tuple(pi - alpha * gi for pi, gi in zip(p, g))
        return _ce(p, xq, yq)

    def meta(p):
        losses = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
        return losses.mean(), losses

    meta_grad = grad(meta, has_aux=True)

    def call():
        g, losses = meta_grad(params)
        return losses, _flat(g)
    return call


def _conv4_embed(p, x):
    """x (B, 1, 28, 28) -> (B, 64): 4 x [conv 'same', batch norm, ReLU, 2x2 max-pool]."""
    for l in range(4):
        w, b, g, be = p[4 * l:4 * l + 4]
        x = torch.relu(_bn(_conv_same(x, w, b, 1), g, be))
        x = torch.nn.functional.max_pool2d(x, 2)
    return x.reshape(x.shape[0], -1)


def protonet(cfg, inputs):
    from metacore.models import conv4_protonet
    ps = [p.requires_grad_() for p in _layout_params(conv4_protonet(), inputs["theta"])]
    x = torch.cat([_nchw(inputs["sx"])[0], _nchw(inputs["qx"])[0]])   # (S + M, 1, 28, 28)
    A, qy = _t(inputs["A"])[0], _t(inputs["qy"])[0]                     # (N, S), (M,)
    S = A.shape[1]

    def call():
        for p in ps:
            p.grad = None
        emb = _conv4_embed(ps, x)                                        # (S + M, 64)
        protos, q = A @ emb[:S], emb[S:]
        logits = -((q[:, None, :] - protos[None]) ** 2).sum(-1)          # (M, N)
        loss = torch.nn.functional.cross_entropy(logits, qy)
        loss.backward()
        return loss.detach().reshape(1), _flat([p.grad for p in ps])
    return call


# ---------------------------------------------------------------- LRUA memory (MANN)
def lrua(cfg, inputs):
    """A Python loop over the T steps, each batched over the B episodes, autograd for the
    gradient of L = sum(probe * reads) w.r.t. keys, alpha, memory0, read0. The usage only
    feeds the least-used selection (non-differentiable in metacore), so it is kept
    under no_grad. Shapes: keys (T, B, H, W), alpha (H,), memory0 (B, S, W),
    read0 (B, H, S), usage0 (B, S)."""
    eps, gamma = 1e-8, cfg["gamma"]
    keys, alpha, memory0, read0 = (_t(inputs[n]).requires_grad_()
                                   for n in ("keys", "alpha", "memory0", "read0"))
    usage0, probe = _t(inputs["usage0"]), _t(inputs["probe"])
    T, B, H, W = keys.shape

    def episode():
        g = torch.sigmoid(alpha)[None, :, None]                          # (1, H, 1)
        M, wr, wu = memory0, read0, usage0
        reads = []
        for t in range(T):
            k = keys[t]                                                  # (B, H, W)
            with torch.no_grad():
                m = torch.kthvalue(wu, H, dim=1).values                  # (B,) n-th smallest
                wlu = (wu <= m[:, None]).to(wu.dtype)                    # (B, S)
                keep = torch.ones_like(wu)
                keep[torch.arange(B), wu.argmin(dim=1)] = 0.0            # zero the least used
            ww = g * wr + (1 - g) * wlu[:, None, :]                      # (B, H, S)
            M = M * keep[:, :, None] + torch.einsum("bhs,bhw->bsw", ww, k)
            kn = torch.linalg.vector_norm(k, dim=2).clamp_min(eps)       # (B, H)
            mn = torch.linalg.vector_norm(M, dim=2).clamp_min(eps)       # (B, S)
            c = torch.einsum("bhw,bsw->bhs", k, M) / (kn[:, :, None] * mn[:, None, :])
            wr = torch.softmax(c, dim=2)                                 # (B, H, S)
            reads.append(torch.einsum("bhs,bsw->bhw", wr, M))            # (B, H, W)
            with torch.no_grad():
                wu = gamma * wu + wr.sum(1) + ww.sum(1)                  # (B, S)
        return torch.stack(reads)                                        # (T, B, H, W)

    def call():
        reads = episode()
        grads = torch.autograd.grad((probe * reads).sum(), (keys, alpha, memory0, read0))
        return (reads.detach(),) + grads
    return call


def build(variant, w, inputs):
    if w.kind in ("maml", "fomaml", "reptile"):
        make = sinusoid_eager if variant == "torch-eager" else sinusoid_func
        return make(w.kind, w.cfg["k"], inputs)
    if w.kind in ("sqeuclidean", "protonet_loss"):
        return distance(w.kind, inputs, variant)
    if w.kind == "conv4_maml":
        return conv4_maml(variant, w.cfg, inputs)
    if w.kind == "protonet":
        return protonet(w.cfg, inputs)
    if w.kind == "lrua":
        return lrua(w.cfg, inputs)
    raise KeyError(w.kind)


def to_numpy(out):
    return tuple(o.detach().numpy() for o in out)


def setup_threads(n):
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
