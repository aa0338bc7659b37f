"""The peer workloads in JAX: jit of a function vmapped over tasks, jax.grad for every
derivative (second-order MAML differentiates through jax.grad of the inner loss). float32,
CPU. Calls end in block_until_ready so that the time includes the computation.

build("jax", w, inputs) -> zero-argument call returning a tuple of arrays in the order of
w.outputs.
"""
import numpy as np
import jax
import jax.numpy as jnp

from bench.peers import workloads as W


def _mlp_params(theta):
    from metacore.models import sinusoid_mlp
    return tuple(jnp.asarray(theta[sl].reshape(sh))
                 for ws, wsh, bs, bsh in W.sinusoid_layers(sinusoid_mlp())
                 for sl, sh in ((ws, wsh), (bs, bsh)))


def _mlp(p, x):
    L = len(p) // 2
    for i in range(L):
        x = x @ p[2 * i] + p[2 * i + 1]
        if i < L - 1:
            x = jax.nn.relu(x)
    return x


def _mse(p, x, y):
    return jnp.mean((_mlp(p, x) - y) ** 2)


def _flat(tree):
    return jnp.concatenate([t.reshape(-1) for t in tree])


def sinusoid(kind, k, inputs):
    alpha = W.SINUSOID["alpha"]
    params = _mlp_params(inputs["theta"])
    sx, sy, qx, qy = (jnp.asarray(inputs[n]) for n in ("sx", "sy", "qx", "qy"))

    def adapt(p, x, y):
        for _ in range(k):
            g = jax.grad(_mse)(p, x, y)
            p = tuple(pi - alpha * gi for pi, gi in zip(p, g))
        return p

    def task_loss(p, x, y, xq, yq):
        return _mse(adapt(p, x, y), xq, yq)

    def meta(p, sx, sy, qx, qy):
        losses = jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
        return losses.mean(), losses

    @jax.jit
    def maml(p, sx, sy, qx, qy):
        g, losses = jax.grad(meta, has_aux=True)(p, sx, sy, qx, qy)
        return losses, _flat(g)

    @jax.jit
    def fomaml(p, sx, sy, qx, qy):
        fast = jax.vmap(adapt, in_axes=(None, 0, 0))(p, sx, sy)
        losses = jax.vmap(_mse)(fast, qx, qy)
        g = jax.vmap(jax.grad(_mse))(fast, qx, qy)
        return losses, _flat([gi.mean(0) for gi in g])

    @jax.jit
    def reptile(p, sx, sy, qx, qy):
        loss0 = jax.vmap(_mse, in_axes=(None, 0, 0))(p, sx, sy)
        fast = jax.vmap(adapt, in_axes=(None, 0, 0))(p, sx, sy)
        return loss0, _flat(p) - _flat([f.mean(0) for f in fast])

    fn = {"maml": maml, "fomaml": fomaml, "reptile": reptile}[kind]
    return lambda: jax.block_until_ready(fn(params, sx, sy, qx, qy))


def distance(kind, inputs):
    q, s, g = (jnp.asarray(inputs[n]) for n in ("q", "s", "g"))
    y = jnp.asarray(inputs["y"].astype(np.int32))

    def dist(q, s):
        return ((q * q).sum(-1)[:, :, None] + (s * s).sum(-1)[:, None, :]
                - 2 * q @ jnp.swapaxes(s, 1, 2))

    if kind == "sqeuclidean":
        @jax.jit
        def fn(q, s, g):
            d, pull = jax.vjp(dist, q, s)
            return (d,) + pull(g)
        return lambda: jax.block_until_ready(fn(q, s, g))

    def ploss(q, s):
        logp = jax.nn.log_softmax(-dist(q, s), axis=-1)            # (1, Q, N)
        return -jnp.take_along_axis(logp, y[..., None], -1).mean()

    @jax.jit
    def fn(q, s):
        loss, (dq, ds) = jax.value_and_grad(ploss, argnums=(0, 1))(q, s)
        return loss.reshape(1), dq, ds
    return lambda: jax.block_until_ready(fn(q, s))


# ---------------------------------------------------------------- Conv-4 (NHWC, HWIO)
def _layout_params(model, theta):
    return tuple(jnp.asarray(theta[off:off + int(np.prod(sh))].reshape(sh))
                 for _, sh, off in model.layout.describe())


def _conv(x, w, b, stride):
    """x (B, H, W, C), w (3, 3, C_in, C_out); XLA's 'SAME' padding is metacore's 'same'."""
    y = jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + b


def _bn(x, gamma, beta, eps=1e-5):
    mean = x.mean((0, 1, 2))
    var = ((x - mean) ** 2).mean((0, 1, 2))
    return (x - mean) / jnp.sqrt(var + eps) * gamma + beta


def _ce_logits(logits, y):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, y[:, None], -1).mean()


def _conv4_maml(p, x):
    for l in range(4):
        w, b, g, be = p[4 * l:4 * l + 4]
        x = jax.nn.relu(_bn(_conv(x, w, b, 2), g, be))
    return x.mean((1, 2)) @ p[16] + p[17]


# Variants (issue 17): `jax` vmaps the task loss over the T tasks inside one jit (XLA's CPU
# convolution then runs batched-over-tasks weight gradients as grouped convolutions, which is
# slow); `jax-unrolled` is the same jit with the task loop unrolled in Python (T separate
# graphs in one program); `jax-map` a lax.map over the tasks (a loop XLA does not unroll).
def conv4_maml(variant, cfg, inputs, first_order=False):
    from metacore.models import conv4_maml as model_fn
    alpha, k = cfg["alpha"], cfg["k"]
    params = _layout_params(model_fn(n_way=cfg["n_way"]), inputs["theta"])
    sx, qx = jnp.asarray(inputs["sx"]), jnp.asarray(inputs["qx"])
    sy, qy = (jnp.asarray(inputs[n].astype(np.int32)) for n in ("sy", "qy"))
    T = sx.shape[0]

    def ce(p, x, y):
        return _ce_logits(_conv4_maml(p, x), y)

    def adapt(p, x, y):
        for _ in range(k):
            g = jax.grad(ce)(p, x, y)
            if first_order:
                g = jax.lax.stop_gradient(g)
            p = tuple(pi - alpha * gi for pi, gi in zip(p, g))
        return p

    def task_loss(p, x, y, xq, yq):
        return ce(adapt(p, x, y), xq, yq)

    if first_order:
        def task(p, x, y, xq, yq):          # -> (grad at the adapted weights, query loss)
            loss, g = jax.value_and_grad(ce)(adapt(p, x, y), xq, yq)
            return g, loss
    else:
        def task(p, x, y, xq, yq):          # -> (meta-gradient of this task, query loss)
            loss, g = jax.value_and_grad(task_loss)(p, x, y, xq, yq)
            return g, loss

    if variant == "jax-unrolled":
        @jax.jit
        def fn(p, sx, sy, qx, qy):
            parts = [task(p, sx[t], sy[t], qx[t], qy[t]) for t in range(T)]
            g = [sum(gs) / T for gs in zip(*[g for g, _ in parts])]
            return jnp.stack([l for _, l in parts]), _flat(g)
    elif variant == "jax-map":
        @jax.jit
        def fn(p, sx, sy, qx, qy):
            g, losses = jax.lax.map(lambda a: task(p, *a), (sx, sy, qx, qy))
            return losses, _flat([gi.mean(0) for gi in g])
    elif first_order:
        @jax.jit
        def fn(p, sx, sy, qx, qy):
            g, losses = jax.vmap(task, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
            return losses, _flat([gi.mean(0) for gi in g])
    else:                                   # the original peer: grad of a vmapped meta-loss
        def meta(p, sx, sy, qx, qy):
            losses = jax.vmap(task_loss, in_axes=(None, 0, 0, 0, 0))(p, sx, sy, qx, qy)
            return losses.mean(), losses

        @jax.jit
        def fn(p, sx, sy, qx, qy):
            g, losses = jax.grad(meta, has_aux=True)(p, sx, sy, qx, qy)
            return losses, _flat(g)
    return lambda: jax.block_until_ready(fn(params, sx, sy, qx, qy))


def protonet(variant, cfg, inputs):
    """`jax`: max-pool as a reshape + max, distance as the (M, N, 64) difference; `jax-pool`:
    lax.reduce_window max-pool and the BLAS expansion |q|^2 + |c|^2 - 2 q c^T."""
    from metacore.models import conv4_protonet
    params = _layout_params(conv4_protonet(), inputs["theta"])
    x = jnp.concatenate([jnp.asarray(inputs["sx"][0]), jnp.asarray(inputs["qx"][0])])
    A, qy = jnp.asarray(inputs["A"][0]), jnp.asarray(inputs["qy"][0].astype(np.int32))
    S = A.shape[1]

    def pool(x):
        B, H, W, C = x.shape
        if variant == "jax-pool":
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                         "VALID")
        return x[:, :H // 2 * 2, :W // 2 * 2].reshape(B, H // 2, 2, W // 2, 2, C).max((2, 4))

    def embed(p, x):
        for l in range(4):
            w, b, g, be = p[4 * l:4 * l + 4]
            x = pool(jax.nn.relu(_bn(_conv(x, w, b, 1), g, be)))
        return x.reshape(x.shape[0], -1)

    def loss_fn(p):
        emb = embed(p, x)
        protos, q = A @ emb[:S], emb[S:]
        if variant == "jax-pool":
            logits = -((q * q).sum(1)[:, None] + (protos * protos).sum(1)[None]
                       - 2 * q @ protos.T)
        else:
            logits = -((q[:, None, :] - protos[None]) ** 2).sum(-1)
        return _ce_logits(logits, qy)

    @jax.jit
    def fn(p):
        loss, g = jax.value_and_grad(loss_fn)(p)
        return loss.reshape(1), _flat(g)
    return lambda: jax.block_until_ready(fn(params))


# ---------------------------------------------------------------- LRUA memory (MANN)
def lrua(cfg, inputs):
    """jit of value_and_grad of a lax.scan over the T steps, each batched over the B
    episodes; L = sum(probe * reads), gradients w.r.t. keys, alpha, memory0, read0. The
    usage only feeds the least-used selection (non-differentiable in metacore): it goes
    through stop_gradient. Shapes: keys (T, B, H, W), alpha (H,), memory0 (B, S, W),
    read0 (B, H, S), usage0 (B, S)."""
    eps, gamma = 1e-8, cfg["gamma"]
    keys, alpha, memory0, read0, usage0, probe = (
        jnp.asarray(inputs[n]) for n in ("keys", "alpha", "memory0", "read0", "usage0",
                                         "probe"))
    T, B, H, W = keys.shape

    def episode(keys, alpha, memory0, read0):
        g = jax.nn.sigmoid(alpha)[None, :, None]                         # (1, H, 1)

        def step(carry, k):                                              # k (B, H, W)
            M, wr, wu = carry
            wu = jax.lax.stop_gradient(wu)
            m = jnp.sort(wu, axis=1)[:, H - 1]                           # (B,) n-th smallest
            wlu = (wu <= m[:, None]).astype(wu.dtype)                    # (B, S)
            keep = 1.0 - jax.nn.one_hot(jnp.argmin(wu, axis=1), wu.shape[1], dtype=wu.dtype)
            ww = g * wr + (1 - g) * wlu[:, None, :]                      # (B, H, S)
            M = M * keep[:, :, None] + jnp.einsum("bhs,bhw->bsw", ww, k)
            kn = jnp.maximum(jnp.linalg.norm(k, axis=2), eps)            # (B, H)
            mn = jnp.maximum(jnp.linalg.norm(M, axis=2), eps)            # (B, S)
            c = jnp.einsum("bhw,bsw->bhs", k, M) / (kn[:, :, None] * mn[:, None, :])
            wr = jax.nn.softmax(c, axis=2)                               # (B, H, S)
            r = jnp.einsum("bhs,bsw->bhw", wr, M)                        # (B, H, W)
            wu = gamma * wu + jax.lax.stop_gradient(wr.sum(1) + ww.sum(1))
            return (M, wr, wu), r

        _, reads = jax.lax.scan(step, (memory0, read0, usage0), keys)
        return reads                                                     # (T, B, H, W)

    def loss(keys, alpha, memory0, read0):
        reads = episode(keys, alpha, memory0, read0)
        return (probe * reads).sum(), reads

    @jax.jit
    def fn(keys, alpha, memory0, read0):
        (_, reads), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
            keys, alpha, memory0, read0)
        return (reads,) + grads
    return lambda: jax.block_until_ready(fn(keys, alpha, memory0, read0))


def build(variant, w, inputs):
    if w.kind in ("maml", "fomaml", "reptile"):
        return sinusoid(w.kind, w.cfg["k"], inputs)
    if w.kind in ("sqeuclidean", "protonet_loss"):
        return distance(w.kind, inputs)
    if w.kind in ("conv4_maml", "conv4_fomaml"):
        return conv4_maml(variant, w.cfg, inputs, first_order=w.kind == "conv4_fomaml")
    if w.kind == "protonet":
        return protonet(variant, w.cfg, inputs)
    if w.kind == "lrua":
        return lrua(w.cfg, inputs)
    raise KeyError(w.kind)


def to_numpy(out):
    return tuple(np.asarray(o) for o in out)


def setup_threads(n):
    pass                      # XLA_FLAGS is set by the runner before jax is imported
