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


def build(variant, w, inputs):
    if w.kind in ("maml", "fomaml", "reptile"):
        return sinusoid(w.kind, w.cfg["k"], inputs)
    if w.kind in ("sqeuclidean", "protonet_loss"):
        return distance(w.kind, inputs)
    raise KeyError(w.kind)


def to_numpy(out):
    return tuple(np.asarray(o) for o in out)


def setup_threads(n):
    pass                      # XLA_FLAGS is set by the runner before jax is imported
