"""Meta Networks (Munkhdalai & Yu 2017, "Meta Networks", ICML; Algorithm 1), one episode at a
time, with the exact outer gradient written by hand (formulas: docs/DERIVATIONS.md, "Meta
Networks").

Four parameter sets, all trained, in one flat vector (blocks "u", "b", "d.*", "m.*"):
  u  (Q)  the dynamic representation (key) network: conv blocks, fc1 -> key, relu, fc2 -> a
          class head used only by the embedding loss
  b  (W)  the base learner: conv blocks, fc1, relu, fc2 -> class logits
  d  (G)  task-level fast-weight generator: a coordinate-wise LSTM (2 -> H) over the
          embedding-loss gradients of S support chunks, then a linear read-out H -> 1
  m  (Z)  example-level fast-weight generator: a coordinate-wise MLP 2 -> Hm -> Hm -> 1

One episode (N supports x'_i, y'_i; L queries x_j, y_j):
  1. split the supports into S chunks; g^u_s = grad_Q CE(u_slow(Q, chunk s)) on the fast
     blocks of u; Q* = d(G, [pre(g^u_1), ..., pre(g^u_S)])            (task-level)
  2. g^b_i = grad_W CE(b_slow(W, x'_i), y'_i) on the fast blocks of b;
     M_i = m(Z, pre(g^b_i))                                          (value memory)
  3. keys r = u(Q, Q*, x) for supports (key memory R) and queries
  4. a_j = softmax_i cos(r_j, R_i);  W*_j = sum_i a_ji M_i             (attention read)
  5. logits_j = b(W, W*_j, x_j);  loss = mean_j CE(logits_j, y_j)
pre() is the gradient preprocessing of Andrychowicz et al. 2016 (k = 7), as in the authors'
code. Layer augmentation: a hidden layer with a fast weight gives relu(slow) + relu(fast);
an output layer (u's key layer, b's logit layer) gives slow + fast, as the authors' code does.
The fast branches have no bias.

The meta-information g^u, g^b depends on Q and W. Write the episode loss as F(theta) =
L(theta; g^u(theta), g^b(theta)), L the loss with the meta-information as an input.
  second_order=False (default; the authors' Chainer code, which reads the .grad arrays and
    preprocesses them in NumPy, cutting the graph there): the gradient at theta0 of the
    surrogate theta -> L(theta; g^u(theta0), g^b(theta0)), the meta-information held at its
    value at theta0. The generators' parameters get their exact gradient; Q and W miss the
    terms through g.
  second_order=True: the exact gradient of F, which adds sum_s H^u_s v^u_s to dQ and
    sum_i H^b_i v^b_i to dW, with v = dL/dg from the generators' backward passes
    (metacore.network.Model.hvp, exact, by the R-operator): two HVP passes more.
Both are in `metacore check` (metanet_episode[first_order], [second_order]).

Shape letters: N supports, L queries, S embedding chunks (LSTM steps), Fu / Fb fast
coordinates of u / b, Pu / Pb slow parameters of u / b, H LSTM units, Hm MLP units,
K classes (n_way), E key features.
"""
import math

import numpy as np

from metacore.kernels import distance as dist
from metacore.layers import conv2d as cv
from metacore.layers import linear as ln
from metacore.layers import lstm as ls
from metacore.losses import softmax_ce as sce
from metacore.network import Conv2d, Flatten, Linear, MaxPool2d, Model, ReLU
from metacore.nonfinite import check_loss_grad
from metacore.params import ParamLayout, tile_tasks
from metacore.validate import check_float_array, check_int_array


# ------------------------------------------------------------------ gradient preprocessing
def preprocess(g, k):
    """Andrychowicz et al. 2016, Appendix A: g -> (log|g| / k, sign g) if |g| >= e^-k, else
    (-1, e^k g).  g: (...,) -> x (..., 2), big (...,) bool (the branch, for the backward)."""
    big = np.abs(g) >= math.exp(-k)
    x = np.empty(g.shape + (2,), g.dtype)
    x[..., 0] = np.where(big, np.log(np.where(big, np.abs(g), 1.0)) / k, -1.0)
    x[..., 1] = np.where(big, np.sign(g), math.exp(k) * g)
    return x, big


def preprocess_backward(dx, g, big, k):
    """dx: (..., 2) -> dg (...,): 1/(k g) dx_0 on the log branch, e^k dx_1 on the linear
    branch (sign and the constant -1 have derivative 0)."""
    return np.where(big, dx[..., 0] / (k * np.where(big, g, 1.0)), math.exp(k) * dx[..., 1])


# ------------------------------------------------------------------ layer-augmented nets
def _per_layer(model, theta):
    """theta: (T, P) -> [{param: (T, *shape)} per layer] (views)."""
    v = model.layout.views(theta)
    return [{p: v[f"{n}.{p}"] for p, _ in layer.params}
            for n, layer in zip(model.layer_names, model.layers)]


def aug_forward(model, theta, fast, x, stop):
    """Layers 0..stop-1 of `model`, each Linear/Conv2d layer i in `fast` augmented with the
    fast weight fast[i]: (T, *w shape). theta: (T, P), x: (T, n, *in_shape)
    -> out (T, n, ...), caches."""
    per = _per_layer(model, theta)
    caches, h, i = [], x, 0
    while i < stop:
        layer = model.layers[i]
        if i not in fast:
            h, c = layer.forward(h, per[i])
            caches.append(("plain", i, c))
            i += 1
            continue
        ys, cs = layer.forward(h, per[i])
        wf = fast[i]
        zero = np.zeros((wf.shape[0], wf.shape[-1]), h.dtype)              # no fast bias
        if isinstance(layer, Conv2d):
            yf, cf = cv.conv2d_forward(h, wf, zero, layer.stride, layer.padding)
        else:
            yf, cf = ln.linear_forward(h, wf, zero)
        if i + 1 < stop and isinstance(model.layers[i + 1], ReLU):        # hidden layer
            ms, mf = ys > 0, yf > 0
            h = ys * ms + yf * mf
            caches.append(("aug_relu", i, cs, cf, ms, mf))
            i += 2
        else:                                                              # output layer
            h = ys + yf
            caches.append(("aug", i, cs, cf))
            i += 1
    return h, caches


def aug_backward(model, dout, caches, T):
    """Backward of aug_forward: dout like its output -> dtheta (T, P) (zero for layers not
    run), dfast {i: (T, *w shape)}."""
    grads, dfast, g = {}, {}, dout
    for entry in reversed(caches):
        kind, i = entry[0], entry[1]
        layer, need_dx = model.layers[i], i > 0
        if kind == "plain":
            g, grads[i] = layer.backward(g, entry[2], need_dx)
            continue
        cs, cf = entry[2], entry[3]
        gs, gf = (g * entry[4], g * entry[5]) if kind == "aug_relu" else (g, g)
        dxs, grads[i] = layer.backward(gs, cs, need_dx)
        bwd = cv.conv2d_backward if isinstance(layer, Conv2d) else ln.linear_backward
        dxf, dfast[i], _ = bwd(gf, cf, need_dx)
        g = dxs + dxf if need_dx else None
    flat = np.zeros((T, model.num_params), dout.dtype)
    views = model.layout.views(flat)
    for i, d in grads.items():
        for p, a in d.items():
            views[f"{model.layer_names[i]}.{p}"][...] = a
    return flat, dfast


def convnet(name, image_shape, channels, depth, hidden, n_way):
    """depth x (conv 3x3 -> relu -> maxpool 2x2), flatten, fc1 (-> hidden), relu, fc2 (->
    n_way), softmax cross-entropy."""
    layers, c_in = [], image_shape[2]
    for _ in range(depth):
        layers += [Conv2d(c_in, channels), ReLU(), MaxPool2d()]
        c_in = channels
    layers.append(Flatten())
    probe = Model(name, layers, image_shape)
    layers += [Linear(probe.out_shape[0], hidden), ReLU(), Linear(hidden, n_way)]
    return Model(name, layers, image_shape, loss="softmax_ce")


class MetaNet:
    """See the module docstring. All settings are plain numbers; `steps` (S) must divide the
    number of supports of every episode."""

    def __init__(self, n_way, image_shape=(28, 28, 1), channels=32, depth=4, key_dim=64,
                 hidden=64, lstm_hidden=20, mlp_hidden=20, steps=None, preproc_k=7.0,
                 backend="auto"):
        for key, v in (("n_way", n_way), ("channels", channels), ("depth", depth),
                       ("key_dim", key_dim), ("hidden", hidden), ("lstm_hidden", lstm_hidden),
                       ("mlp_hidden", mlp_hidden)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MetaNet: {key} must be a positive int, got {v!r}")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                                  or steps < 1):
            raise ValueError(f"MetaNet: steps must be None or a positive int, got {steps!r}")
        if not (isinstance(preproc_k, (int, float)) and preproc_k > 0):
            raise ValueError(f"MetaNet: preproc_k must be > 0, got {preproc_k!r}")
        self.n_way, self.image_shape = n_way, tuple(image_shape)
        self.steps, self.k, self.backend = steps, float(preproc_k), backend
        self.H, self.Hm = lstm_hidden, mlp_hidden
        self.u = convnet("metanet_u", self.image_shape, channels, depth, key_dim, n_way)
        self.b = convnet("metanet_b", self.image_shape, channels, depth, hidden, n_way)
        n_layers = len(self.u.layers)
        convs = [i for i, l in enumerate(self.u.layers) if isinstance(l, Conv2d)]
        fc1, fc2 = n_layers - 3, n_layers - 1
        self.u_fast, self.u_stop = convs + [fc1], fc1 + 1     # keys: fc1's output
        self.b_fast = convs + [fc1, fc2]
        self.u_idx = self._fast_index(self.u, self.u_fast)    # (Fu,) into u's parameters
        self.b_idx = self._fast_index(self.b, self.b_fast)    # (Fb,) into b's parameters
        H, Hm = self.H, self.Hm
        self.layout = ParamLayout([
            ("u", (self.u.num_params,)), ("b", (self.b.num_params,)),
            ("d.W", (2 + H, 4 * H)), ("d.b", (4 * H,)), ("d.wo", (H, 1)), ("d.bo", (1,)),
            ("m.w1", (2, Hm)), ("m.b1", (Hm,)), ("m.w2", (Hm, Hm)), ("m.b2", (Hm,)),
            ("m.w3", (Hm, 1)), ("m.b3", (1,))])
        self.num_params = self.layout.size

    @staticmethod
    def _fast_index(model, layers):
        return np.concatenate([np.arange(model.num_params)[
            model.layout.slice(f"{model.layer_names[i]}.w")] for i in layers])

    def _unpack(self, model, fast_layers, flat):
        """flat: (T, F) -> {layer i: (T, *w shape)} (views)."""
        out, off, T = {}, 0, flat.shape[0]
        for i in fast_layers:
            shape = dict(model.layers[i].params)["w"]
            n = math.prod(shape)
            out[i] = flat[:, off:off + n].reshape((T,) + shape)
            off += n
        return out

    @staticmethod
    def _pack(fast_layers, d, T):
        return np.concatenate([d[i].reshape(T, -1) for i in fast_layers], axis=1)

    # ------------------------------------------------------------------ parameters
    def init_params(self, rng, dtype=np.float64):
        """u, b: their layers' initialisers; d: lstm_init (forget bias 1); the read-outs of d
        and m start small (uniform +-0.01), so the fast branches start near zero."""
        theta = np.zeros(self.num_params, dtype)
        v = self.layout.views(theta[None])
        v["u"][0] = self.u.init_params(rng, dtype)
        v["b"][0] = self.b.init_params(rng, dtype)
        W, bb = ls.lstm_init(rng, 2, self.H, dtype)
        v["d.W"][0], v["d.b"][0] = W, bb
        v["d.wo"][0] = rng.uniform(-0.01, 0.01, (self.H, 1))
        for name, (a, b_) in (("m.w1", (2, self.Hm)), ("m.w2", (self.Hm, self.Hm))):
            lim = math.sqrt(6.0 / (a + b_))
            v[name][0] = rng.uniform(-lim, lim, (a, b_))
        v["m.w3"][0] = rng.uniform(-0.01, 0.01, (self.Hm, 1))
        return theta

    # ------------------------------------------------------------------ checks
    def _check(self, params, sx, sy, qx, qy):
        op = "MetaNet"
        check_float_array(op, "params", params, shape=(self.num_params,))
        dt = params.dtype
        check_float_array(op, "support_x", sx, ndim=4, dtype=dt)
        if sx.shape[1:] != self.image_shape:
            want = ", ".join(map(str, self.image_shape))
            raise ValueError(f"{op}: support_x must have shape (N, {want}), got {sx.shape}")
        N = sx.shape[0]
        check_int_array(op, "support_y", sy, shape=(N,), low=0, high=self.n_way)
        check_float_array(op, "query_x", qx, shape=(None,) + self.image_shape, dtype=dt)
        if qy is not None:
            check_int_array(op, "query_y", qy, shape=(qx.shape[0],), low=0, high=self.n_way)
        S = N if self.steps is None else self.steps
        if N % S:
            raise ValueError(f"{op}: steps = {S} must divide the number of supports, got {N}")
        return S

    # ------------------------------------------------------------------ the episode
    def _forward(self, params, sx, sy, qx, frozen=None):
        """Steps 1-5 of the module docstring for one episode -> logits (L, K), a cache.
        frozen: None, or (g^u (S, Fu), g^b (N, Fb)) used instead of the computed support
        gradients (the first-order variant's function, for its finite-difference test)."""
        S = self._check(params, sx, sy, qx, None)
        v = {k: a[0] for k, a in self.layout.views(params[None]).items()}
        N, L, k = sx.shape[0], qx.shape[0], self.k
        # 1. task-level fast weights of u from S chunks' embedding-loss gradients
        thQ = tile_tasks(v["u"], S)                                       # (S, Pu)
        xs_c = sx.reshape((S, N // S) + self.image_shape)                 # (S, N/S, ...)
        ys_c = sy.reshape(S, N // S)
        if frozen is None:
            gQ = self.u.loss_and_grad(thQ, xs_c, ys_c)[1][:, self.u_idx]  # (S, Fu)
        else:
            gQ = frozen[0]
        xin, bigQ = preprocess(gQ, k)                                     # (S, Fu, 2)
        Fu = gQ.shape[1]
        h0 = np.zeros((Fu, self.H), params.dtype)                         # (Fu, H)
        _, (hS, _), lcache = ls.lstm_forward(xin, h0, h0, v["d.W"], v["d.b"])
        qfast = hS @ v["d.wo"] + v["d.bo"]                                # (Fu, 1)
        # 2. example-level fast weights of b: the value memory M
        thW = tile_tasks(v["b"], N)                                       # (N, Pb)
        if frozen is None:
            gW = self.b.loss_and_grad(thW, sx[:, None], sy[:, None])[1][:, self.b_idx]
        else:
            gW = frozen[1]                                                # (N, Fb)
        xm, bigW = preprocess(gW, k)                                      # (N, Fb, 2)
        Fb = gW.shape[1]
        x2 = xm.reshape(N * Fb, 2)                                        # (N*Fb, 2)
        a1 = x2 @ v["m.w1"] + v["m.b1"]                                   # (N*Fb, Hm)
        h1 = a1 * (a1 > 0)
        a2 = h1 @ v["m.w2"] + v["m.b2"]                                   # (N*Fb, Hm)
        h2 = a2 * (a2 > 0)
        Mv = (h2 @ v["m.w3"] + v["m.b3"]).reshape(N, Fb)                  # (N, Fb)
        # 3. keys of supports and queries through u(Q, Q*)
        xall = np.concatenate([sx, qx])[None]                             # (1, N+L, ...)
        fastQ = self._unpack(self.u, self.u_fast, qfast.reshape(1, Fu))
        keys, kcache = aug_forward(self.u, v["u"][None], fastQ, xall, self.u_stop)
        R, rq = keys[:, :N], keys[:, N:]                                  # (1, N, E), (1, L, E)
        # 4. cosine attention over the key memory reads the value memory
        cos = dist.pairwise_cosine(rq, R, backend=self.backend)           # (1, L, N)
        e = np.exp(cos - cos.max(axis=-1, keepdims=True))
        att = (e / e.sum(axis=-1, keepdims=True))[0]                      # (L, N)
        Wq = att @ Mv                                                     # (L, Fb)
        # 5. the base learner with each query's own fast weights
        fastW = self._unpack(self.b, self.b_fast, Wq)
        z, bcache = aug_forward(self.b, tile_tasks(v["b"], L), fastW, qx[:, None],
                                len(self.b.layers))                       # (L, 1, K)
        cache = dict(v=v, S=S, thQ=thQ, xs_c=xs_c, ys_c=ys_c, gQ=gQ, bigQ=bigQ, lcache=lcache,
                     hS=hS, thW=thW, gW=gW, bigW=bigW, x2=x2, a1=a1, h1=h1, a2=a2, h2=h2,
                     Mv=Mv, R=R, rq=rq, att=att, kcache=kcache, bcache=bcache)
        return z[:, 0, :], cache

    def predict(self, params, sx, sy, qx):
        """-> logits (L, K) of every query; each query's logits depend on the supports and
        on that query alone (no batch statistics)."""
        return self._forward(params, sx, sy, qx)[0]

    def loss(self, params, sx, sy, qx, qy, frozen=None):
        self._check(params, sx, sy, qx, qy)
        z, _ = self._forward(params, sx, sy, qx, frozen)
        return float(sce.softmax_ce_forward(z[None], qy[None])[0][0])

    def loss_and_grad(self, params, sx, sy, qx, qy, second_order=False):
        """-> loss (mean query cross-entropy), grad (P,), logits (L, K), support gradients
        (g^u, g^b) (for the first-order variant's test). second_order: see the module
        docstring (False: the authors' first-order gradient)."""
        self._check(params, sx, sy, qx, qy)
        z, c = self._forward(params, sx, sy, qx)
        v, L, N = c["v"], qx.shape[0], sx.shape[0]
        loss, lc = sce.softmax_ce_forward(z[None], qy[None])
        grad = np.zeros_like(params)
        gv = {k: a[0] for k, a in self.layout.views(grad[None]).items()}
        # 5. base learner on the queries
        dz = sce.softmax_ce_backward(lc)[0][:, None, :]                   # (L, 1, K)
        dWt, dfastW = aug_backward(self.b, dz, c["bcache"], L)            # (L, Pb)
        gv["b"][...] = dWt.sum(axis=0)
        dWq = self._pack(self.b_fast, dfastW, L)                          # (L, Fb)
        # 4. attention read
        att, Mv = c["att"], c["Mv"]
        dMv = att.T @ dWq                                                 # (N, Fb)
        datt = dWq @ Mv.T                                                 # (L, N)
        dcos = att * (datt - (att * datt).sum(axis=-1, keepdims=True))    # (L, N)
        drq, dR = dist.pairwise_cosine_backward(dcos[None], c["rq"], c["R"],
                                                backend=self.backend)
        # 3. keys through u(Q, Q*)
        dkeys = np.concatenate([dR, drq], axis=1)                         # (1, N+L, E)
        dQt, dfastQ = aug_backward(self.u, dkeys, c["kcache"], 1)
        gv["u"][...] = dQt[0]
        dq = self._pack(self.u_fast, dfastQ, 1).reshape(-1, 1)            # (Fu, 1)
        # 1. d: read-out and LSTM
        gv["d.wo"][...] = c["hS"].T @ dq
        gv["d.bo"][...] = dq.sum(axis=0)
        dhS = dq @ v["d.wo"].T                                            # (Fu, H)
        dxin, _, _, dLW, dLb = ls.lstm_backward(None, dhS, None, c["lcache"])
        gv["d.W"][...], gv["d.b"][...] = dLW, dLb
        # 2. m: the coordinate-wise MLP
        dout = dMv.reshape(-1, 1)                                         # (N*Fb, 1)
        gv["m.w3"][...], gv["m.b3"][...] = c["h2"].T @ dout, dout.sum(axis=0)
        da2 = (dout @ v["m.w3"].T) * (c["a2"] > 0)                        # (N*Fb, Hm)
        gv["m.w2"][...], gv["m.b2"][...] = c["h1"].T @ da2, da2.sum(axis=0)
        da1 = (da2 @ v["m.w2"].T) * (c["a1"] > 0)                         # (N*Fb, Hm)
        gv["m.w1"][...], gv["m.b1"][...] = c["x2"].T @ da1, da1.sum(axis=0)
        if second_order:
            # dL/dg through the preprocessing, then H v of every support loss (R-operator)
            dgQ = preprocess_backward(dxin, c["gQ"], c["bigQ"], self.k)   # (S, Fu)
            VQ = np.zeros_like(c["thQ"])                                  # (S, Pu)
            VQ[:, self.u_idx] = dgQ
            gv["u"][...] += self.u.hvp(c["thQ"], c["xs_c"], c["ys_c"], VQ)[2].sum(axis=0)
            dxm = (da1 @ v["m.w1"].T).reshape(N, -1, 2)                   # (N, Fb, 2)
            dgW = preprocess_backward(dxm, c["gW"], c["bigW"], self.k)    # (N, Fb)
            VW = np.zeros_like(c["thW"])                                  # (N, Pb)
            VW[:, self.b_idx] = dgW
            gv["b"][...] += self.b.hvp(c["thW"], sx[:, None], sy[:, None], VW)[2].sum(axis=0)
        check_loss_grad("MetaNet.loss_and_grad", loss, grad)
        return float(loss[0]), grad, z, (c["gQ"], c["gW"])
