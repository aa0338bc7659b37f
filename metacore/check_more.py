"""`metacore check` beyond layers, losses and models: the LSTM layers, the MAML-family
meta-gradients, the fast kernels (with every host backend against the reference) and each
paper's episode gradient. Setups are the small ones of the tests (tests/test_lstm.py,
test_maml.py, test_distance.py, test_lrua.py, test_protonet.py, ...), smaller where the check
must stay quick.

Objectives, all against float64 central differences (metacore.check.measure):
  vjp cases        L = sum_i sum(c_i * out_i) for fixed random c_i on every output (cell
                   state, hidden sequence, reads, ...), with respect to every differentiable
                   input jointly;
  meta-gradients   MAML / Meta-SGD: the meta-objective F(theta, alpha) = mean_t L_q,t(theta_k^t)
                   (metacore.algorithms.meta_objective), w.r.t. theta and alpha;
                   FOMAML: G(delta) = mean_t L_q,t(theta_k^t + delta) at delta = 0 (the
                   first-order direction is exactly its gradient);
                   Reptile: R(delta) = alpha sum_i mean_t L_s,t(theta_i^t + delta) (the
                   direction theta - mean_t theta_k^t is exactly its gradient);
  algorithms       the method's own episode loss w.r.t. its flat parameter vector (a seeded
                   sample of coordinates of every named block).
float32 rows run the derivation in float32 and compare it with the same float64 differences.
"""
import numpy as np

from metacore.check_case import Case

# float32 bounds per group, over the float64 finite differences (normwise rel_error).
# Measured worst row of the group in parentheses (this machine, the fixed seeds here); each
# bound leaves 15x-40x margin for other BLAS / summation orders and is far below any real
# derivation error (a wrong term or factor gives O(1e-2) to O(1)).
F32 = {
    "lstm": 2e-6,          # S <= 3 recurrent steps of (D + H)-term sums, |h| <= 1 (1.3e-7)
    "meta": 1e-5,          # k inner steps, each a gradient and an HVP in float32 (2.6e-7)
    "kernel": 2e-6,        # distance sums over D, the softmax over N, LRUA reads (1.0e-7)
    "algorithm": 1e-5,     # conv + BN + LSTM reads / fast weights in float32 (4.8e-7)
}


def _fixed_probe(shapes, seed=4321):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in shapes]


def vjp_case(name, group, make, fwd, bwd, tol32, backends=None):
    """make(rng) -> dict of float64 differentiable inputs (in call order);
    fwd(inputs) -> (tuple of outputs, cache); bwd(dys, cache, inputs) -> gradients in input
    order. backends(inputs, dtype) -> [(quantity, error)] agreement rows (kernels)."""
    probe_cache = {}

    def probe(outs):
        key = tuple(o.shape for o in outs)
        if key not in probe_cache:
            probe_cache[key] = _fixed_probe(key)
        return [c.astype(o.dtype) for c, o in zip(probe_cache[key], outs)]

    def value(inputs):
        outs, _ = fwd(inputs)
        return float(sum(np.sum(c * o, dtype=np.float64) for c, o in zip(probe(outs), outs)))

    def grad_hvp(inputs, v=None):
        outs, cache = fwd(inputs)
        dys = probe(outs)
        grads = bwd(dys, cache, inputs)
        val = float(sum(np.sum(c * o, dtype=np.float64) for c, o in zip(dys, outs)))
        return val, dict(zip(inputs, grads)), None

    return Case(name, "vjp", make, value, grad_hvp, group=group, has_hvp=False,
                tol={("gradient", "float32"): tol32}, backends=backends)


def param_case(name, group, make, loss_grad, loss, tol32, layout=None, per_block=None,
               h_grad=1e-6):
    """One flat parameter vector (plus optional extra differentiable inputs):
    make(rng) -> dict {'theta': (P,), ...} float64; loss_grad(inputs) -> (loss, {name: grad});
    loss(inputs) -> float. layout + per_block: check `per_block` seeded coordinates of every
    named block of theta (all of a block when it is smaller)."""
    def grad_hvp(inputs, v=None):
        value, grads = loss_grad(inputs)
        return float(value), grads, None

    blocks = None
    if layout is not None:
        blocks = [layout.slice(n) for n in layout.names]
    return Case(name, "params", make, lambda inputs: float(loss(inputs)), grad_hvp,
                blocks=blocks, per_block=per_block, group=group, has_hvp=False,
                tol={("gradient", "float32"): tol32}, h_grad=h_grad)


def _cast(data, dtype):
    return [a.astype(dtype) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
            for a in data]


# ---------------------------------------------------------------------------- LSTM layers
def _lstm_cases():
    from metacore.layers import lstm as L

    def make(S, B, D, H, seed, cell=False, bi=False):
        def m(rng):
            r = np.random.default_rng(seed)
            x = r.standard_normal((S, B, D))
            h0, c0 = 0.5 * r.standard_normal((B, H)), r.standard_normal((B, H))
            W, b = 0.8 * r.standard_normal((D + H, 4 * H)), 0.5 * r.standard_normal(4 * H)
            if cell:
                return {"x": x[0], "h": h0, "c": c0, "W": W, "b": b}
            if bi:
                return {"x": x, "Wf": W, "bf": b,
                        "Wb": 0.8 * r.standard_normal((D + H, 4 * H)),
                        "bb": 0.5 * r.standard_normal(4 * H)}
            return {"x": x, "h0": h0, "c0": c0, "W": W, "b": b}
        return m

    def cell_fwd(i):
        h, c, cache = L.lstm_cell_forward(*i.values())
        return (h, c), cache

    def seq_fwd(i):
        hs, (hS, cS), cache = L.lstm_forward(*i.values())
        return (hs, hS, cS), cache

    def bi_fwd(i):
        hf, hb, cache = L.bilstm_forward(*i.values())
        return (hf, hb), cache

    return [
        vjp_case("lstm_cell", "layers", make(1, 3, 4, 5, 1, cell=True), cell_fwd,
                 lambda d, cache, i: L.lstm_cell_backward(d[0], d[1], cache), F32["lstm"]),
        vjp_case("lstm_sequence[S=3]", "layers", make(3, 2, 3, 4, 5), seq_fwd,
                 lambda d, cache, i: L.lstm_backward(d[0], d[1], d[2], cache), F32["lstm"]),
        vjp_case("bilstm[S=3]", "layers", make(3, 2, 3, 4, 7, bi=True), bi_fwd,
                 lambda d, cache, i: L.bilstm_backward(d[0], d[1], cache), F32["lstm"]),
    ]


# ------------------------------------------------------------------------ meta-gradients
def _maml_setup(kind, seed):
    from metacore import models
    rng = np.random.default_rng(seed)
    if kind == "sinusoid":
        model = models.sinusoid_mlp(hidden=(7, 5))
        theta = model.init_params(rng, np.float64)
        theta += 0.3 * rng.standard_normal(theta.shape)   # away from the tiny init
        x = rng.uniform(-5, 5, (3, 12, 1))
        amp, ph = rng.uniform(0.1, 5, 3)[:, None, None], rng.uniform(0, np.pi, 3)[:, None, None]
        y = amp * np.sin(x - ph)
        data = (x[:, :5], y[:, :5], x[:, 5:], y[:, 5:])
        return model, theta, data, 0.05
    model = models.bn_mlp(n_way=3, in_features=6, hidden=(5, 4))
    theta = model.init_params(rng, np.float64)
    sx, qx = rng.standard_normal((3, 4, 6)), rng.standard_normal((3, 5, 6))
    sy, qy = rng.integers(0, 3, (3, 4)), rng.integers(0, 3, (3, 5))
    return model, theta, (sx, sy, qx, qy), 0.4


def _meta_cases():
    from metacore.algorithms import adapt, maml_gradient, meta_objective
    from metacore.algorithms.maml import _loss
    from metacore.algorithms.reptile import reptile_direction
    cases = []

    def maml_case(name, kind, k, seed, metasgd=False):
        model, theta0, data, alpha0 = _maml_setup(kind, seed)

        def make(rng):
            if metasgd:
                a = alpha0 * np.random.default_rng(seed + 1).uniform(0.5, 1.5, theta0.size)
            else:
                a = np.array([alpha0])
            return {"theta": theta0.copy(), "alpha": a}

        def alpha_of(inputs):
            return inputs["alpha"] if metasgd else inputs["alpha"][0]

        def loss_grad(inputs):
            th = inputs["theta"]
            r = maml_gradient(model, th, *_cast(data, th.dtype), alpha_of(inputs), steps=k)
            ga = np.asarray(r.alpha_grad, th.dtype).reshape(inputs["alpha"].shape)
            return float(r.query_loss.mean()), {"theta": r.grad, "alpha": ga}

        def loss(inputs):
            return meta_objective(model, inputs["theta"], *data, alpha_of(inputs), k)

        cases.append(param_case(name, "meta-gradients", make, loss_grad, loss, F32["meta"]))

    maml_case("maml[sinusoid,k=1]", "sinusoid", 1, 11)
    maml_case("maml[sinusoid,k=3]", "sinusoid", 3, 13)
    maml_case("maml[bn_mlp,k=2]", "bn", 2, 22)
    maml_case("metasgd[sinusoid,k=2]", "sinusoid", 2, 9, metasgd=True)
    maml_case("metasgd[bn_mlp,k=2]", "bn", 2, 10, metasgd=True)

    def fomaml_case(name, kind, k, seed):
        model, theta0, data, alpha = _maml_setup(kind, seed)
        sx, sy, qx, qy = data
        theta_k = adapt(model, theta0, sx, sy, alpha, k)[-1]        # (T, P), fixed

        def loss_grad(inputs):
            dt = inputs["delta"].dtype
            r = maml_gradient(model, theta0.astype(dt), *_cast(data, dt), alpha, steps=k,
                              first_order=True)
            return float(r.query_loss.mean()), {"delta": r.grad}

        def loss(inputs):
            return float(_loss(model, theta_k + inputs["delta"], qx, qy).mean())

        cases.append(param_case(name, "meta-gradients",
                                lambda rng: {"delta": np.zeros(theta0.size)}, loss_grad, loss,
                                F32["meta"]))

    fomaml_case("fomaml[sinusoid,k=3]", "sinusoid", 3, 31)
    fomaml_case("fomaml[bn_mlp,k=2]", "bn", 2, 32)

    def reptile_case(name, kind, k, seed):
        model, theta0, data, alpha = _maml_setup(kind, seed)
        sx, sy = data[0], data[1]
        iterates = adapt(model, theta0, sx, sy, alpha, k)[:-1]     # theta_0 .. theta_{k-1}

        def loss_grad(inputs):
            dt = inputs["delta"].dtype
            loss0, d = reptile_direction(model, theta0.astype(dt), *_cast((sx, sy), dt),
                                         alpha, k)
            return float(loss0.mean()), {"delta": d}

        def loss(inputs):
            return alpha * sum(float(_loss(model, th + inputs["delta"], sx, sy).mean())
                               for th in iterates)

        cases.append(param_case(name, "meta-gradients",
                                lambda rng: {"delta": np.zeros(theta0.size)}, loss_grad, loss,
                                F32["meta"]))

    reptile_case("reptile[sinusoid,k=3]", "sinusoid", 3, 41)
    reptile_case("reptile[bn_mlp,k=2]", "bn", 2, 42)
    return cases


# ------------------------------------------------------------------------------- kernels
def _device_available():
    """The Numba CUDA kernels run under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1 set before
    the first import of numba: `NUMBA_ENABLE_CUDASIM=1 metacore check kernels`) or on a GPU."""
    try:
        from numba import config, cuda
        return bool(config.ENABLE_CUDASIM) or cuda.is_available()
    except Exception:          # no numba / numba-cuda, no driver: no device rows
        return False


def _host_backends(module):
    """The backends compared with the reference: numba (CPU) when importable, and numba-cuda
    under the simulator or on a GPU. CuPy needs a GPU; tests/test_cuda_*.py cover it."""
    names = [b for b in ("reference", "numba") if b in module.available_backends()]
    if "numba-cuda" in module.available_backends() and _device_available():
        names.append("numba-cuda")
    return names


def _call(fn, name, *args, **kw):
    """fn(*args, backend=name, **kw) with host outputs; device backends get device arrays
    (numba.cuda.to_device) and their outputs are copied back."""
    if name != "numba-cuda":
        return fn(*args, backend=name, **kw)
    from numba import cuda
    dev = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    out = fn(*dev, backend=name, **kw)
    host = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else a    # noqa: E731
    return tuple(host(a) for a in out) if isinstance(out, (tuple, list)) else host(out)


def _distance_cases():
    from metacore.kernels import distance as K
    cases = []

    def make(rng):
        r = np.random.default_rng(5)
        return {"q": r.standard_normal((2, 4, 5)), "s": r.standard_normal((2, 3, 5))}

    for op in ("sqeuclidean", "cosine", "l1"):
        f = getattr(K, "pairwise_" + op)
        b = getattr(K, "pairwise_" + op + "_backward")

        def backends(inputs, dtype, f=f, b=b):
            q, s = (inputs[k].astype(dtype) for k in ("q", "s"))
            g = np.random.default_rng(6).standard_normal((2, 4, 3)).astype(dtype)
            ref_y, ref_d = f(q, s, backend="reference"), b(g, q, s, backend="reference")
            rows = []
            for name in _host_backends(K):
                if name == "reference":
                    continue
                from metacore.gradcheck import rel_error
                y, d = _call(f, name, q, s), _call(b, name, g, q, s)
                err = max(rel_error(y, ref_y), *(rel_error(a, r) for a, r in zip(d, ref_d)))
                rows.append((f"{name} vs reference", err))
            return rows

        cases.append(vjp_case(
            f"distance[{op}]", "kernels", make,
            lambda i, f=f: ((f(i["q"], i["s"], backend="auto"),), None),
            lambda d, cache, i, b=b: b(d[0], i["q"], i["s"], backend="auto"),
            F32["kernel"], backends=backends))

    y = np.random.default_rng(7).integers(0, 3, (2, 4))
    for metric in ("sqeuclidean", "cosine"):
        def fwd(i, metric=metric):
            loss, dq, ds, _ = K.protonet_loss(i["q"], i["s"], y, metric=metric,
                                              backend="auto")
            return (loss,), (dq, ds)

        def backends(inputs, dtype, metric=metric):
            from metacore.gradcheck import rel_error
            q, s = (inputs[k].astype(dtype) for k in ("q", "s"))
            ref = K.protonet_loss(q, s, y, metric=metric, backend="reference")
            rows = []
            for name in _host_backends(K):
                if name != "reference":
                    got = _call(K.protonet_loss, name, q, s, y, metric=metric)
                    rows.append((f"{name} vs reference",
                                 max(rel_error(a, r) for a, r in zip(got[:3], ref[:3]))))
            return rows

        # the probe's upstream c scales loss.sum(): (dq, ds) are d loss.sum(), so scale by c
        cases.append(vjp_case(
            f"protonet_loss[{metric}]", "kernels", make, fwd,
            lambda d, cache, i: tuple(g * d[0][:, None, None] for g in cache), F32["kernel"],
            backends=backends))
    return cases


def _lrua_case(write_rule="shared", with_adds=False):
    """The LRUA episode pair (kernels/lrua.py) under one write rule, with or without a
    separate add vector (then an input 'adds' whose gradient is checked too); rows
    lrua_episode (the ops' default, shared), lrua_episode[per_head], [per_head,add]."""
    from metacore.kernels import lrua as K
    gamma = 0.9
    T, B, H, S, W = 4, 2, 2, 5, 3
    tag = "" if write_rule == "shared" and not with_adds else \
        f"[{write_rule}{',add' if with_adds else ''}]"

    def make(rng):
        r = np.random.default_rng(1)
        keys, alpha = r.standard_normal((T, B, H, W)), r.standard_normal((H,))
        memory0 = r.standard_normal((B, S, W))
        e = np.exp(r.standard_normal((B, H, S)))
        out = {"keys": keys, "alpha": alpha, "memory0": memory0,
               "read0": e / e.sum(axis=-1, keepdims=True)}
        if with_adds:
            out["adds"] = np.random.default_rng(4).standard_normal((T, B, H, W))
        return out

    usage0_64 = 0.3 * np.stack([np.random.default_rng(2).permutation(S) for _ in range(B)])

    def split(i):
        """inputs -> the four positional arrays and the settings as keywords."""
        args = [i["keys"], i["alpha"], i["memory0"], i["read0"]]
        return args, dict(write_rule=write_rule, adds=i.get("adds"))

    def fwd(i):
        u = usage0_64.astype(i["keys"].dtype)
        args, kw = split(i)
        reads = K.lrua_forward(*args, u, gamma, backend="auto", **kw)[0]
        return (reads,), None

    def bwd(d, cache, i):
        u = usage0_64.astype(i["keys"].dtype)
        args, kw = split(i)
        return K.lrua_backward(d[0], *args, u, gamma, backend="auto", **kw)

    def backends(inputs, dtype):
        from metacore.gradcheck import rel_error
        cast = {k: a.astype(dtype) for k, a in inputs.items()}
        args, kw = split(cast)
        args = args + [usage0_64.astype(dtype), gamma]
        dr = np.random.default_rng(3).standard_normal((T, B, H, W)).astype(dtype)
        ref = K.lrua_forward(*args, backend="reference", **kw)[:1] + tuple(
            K.lrua_backward(dr, *args, backend="reference", **kw))
        rows = []
        for name in _host_backends(K):
            # the device backends have no add vector (NotImplementedError)
            if name != "reference" and not (with_adds and K.is_device_backend(name)):
                if not with_adds:
                    kw.pop("adds", None)
                got = _call(K.lrua_forward, name, *args, **kw)[:1] + tuple(
                    _call(K.lrua_backward, name, dr, *args, **kw))
                rows.append((f"{name} vs reference",
                             max(rel_error(a, r) for a, r in zip(got, ref))))
        return rows

    return vjp_case("lrua_episode" + tag, "kernels", make, fwd, bwd, F32["kernel"],
                    backends=backends)


# ---------------------------------------------------------------------------- algorithms
def _episode_case(name, build, per_block):
    """build() -> (net-like, params64, data tuple, loss_grad(params, data) -> (loss, grad),
    loss(params, data) -> float, layout)."""
    net, params, data, lg, lo, layout = build()

    def loss_grad(inputs):
        th = inputs["theta"]
        loss, grad = lg(th, _cast(data, th.dtype))
        return loss, {"theta": grad}

    return param_case(name, "algorithms", lambda rng: {"theta": params.copy()}, loss_grad,
                      lambda inputs: lo(inputs["theta"], data), F32["algorithm"],
                      layout=layout, per_block=per_block)


def _algorithm_cases():
    from metacore import models
    from metacore.algorithms import MatchingNet, ProtoNet, RelationNet, SiameseNet
    cases = []

    def protonet():
        rng = np.random.default_rng(0)
        pn = ProtoNet(models.conv4_protonet(image_shape=(6, 6, 1), channels=2, depth=2),
                      backend="reference")
        p = pn.init_params(rng, np.float64) + 0.1 * rng.standard_normal(pn.num_params)
        sy = np.stack([rng.permutation(np.repeat(np.arange(3), 2)) for _ in range(2)])
        data = (rng.random((2, 6, 6, 6, 1)), sy, rng.random((2, 4, 6, 6, 1)),
                rng.integers(0, 3, (2, 4)))
        lg = lambda th, d: pn.episode_loss_and_grad(th, *d)[:2]           # noqa: E731
        return pn, p, data, lg, lambda th, d: lg(th, d)[0], pn.layout

    def matching(fce, **similarity):
        def build():
            rng = np.random.default_rng(0)
            net = MatchingNet(models.conv4_protonet(image_shape=(6, 6, 1), channels=2,
                                                    depth=2), fce=fce, read_steps=2,
                              backend="reference", **similarity)
            p = net.init_params(rng, np.float64) + 0.1 * rng.standard_normal(net.num_params)
            sy = np.stack([rng.permutation(np.repeat(np.arange(3), 2))])
            data = (rng.standard_normal((1, 6, 6, 6, 1)), sy,
                    rng.standard_normal((1, 3, 6, 6, 1)), np.arange(3)[None])
            lg = lambda th, d: net.episode_loss_and_grad(th, *d, 3)[:2]   # noqa: E731
            lo = lambda th, d: net.episode_loss(th, *d, 3)                # noqa: E731
            return net, p, data, lg, lo, net.layout
        return build

    def relation():
        from metacore.algorithms.relation import relation_embedding, relation_module
        rng = np.random.default_rng(0)
        f = relation_embedding((10, 10, 1), channels=2, blocks=(("valid", True),
                                                                ("same", False)))
        g = relation_module(f.out_shape, channels=2, depth=2, hidden=3)
        rn = RelationNet(f, g)
        p = rn.init_params(rng, np.float64) + 0.1 * rng.standard_normal(rn.num_params)
        sy = np.stack([rng.permutation(np.repeat(np.arange(2), 2))])
        data = (rng.random((1, 4, 10, 10, 1)), sy, rng.random((1, 4, 10, 10, 1)),
                rng.integers(0, 2, (1, 4)))
        lg = lambda th, d: rn.episode_loss_and_grad(th, *d)[:2]           # noqa: E731
        return rn, p, data, lg, lambda th, d: lg(th, d)[0], rn.layout

    def siamese():
        rng = np.random.default_rng(0)
        sn = SiameseNet(models.conv4_protonet(image_shape=(6, 6, 1), channels=2, depth=2))
        p = sn.init_params(rng, np.float64) + 0.1 * rng.standard_normal(sn.num_params)
        data = (rng.random((2, 3, 6, 6, 1)), rng.random((2, 3, 6, 6, 1)),
                (rng.random((2, 3)) < 0.5).astype(np.float64))
        lg = lambda th, d: sn.episode_loss_and_grad(th, *d)[:2]           # noqa: E731
        return sn, p, data, lg, lambda th, d: lg(th, d)[0], sn.layout

    def mann(write_rule="per_head", add_vector=False):
        from metacore.algorithms.mann import MANN
        model = MANN(d_in=6, n_way=3, hidden=4, heads=2, slots=5, width=3, gamma=0.9,
                     write_rule=write_rule, add_vector=add_vector)
        rng = np.random.default_rng(0)
        p = model.init_params(rng, np.float64) + 0.3 * rng.standard_normal(model.num_params)
        data = (rng.standard_normal((5, 2, 6)), rng.integers(0, 3, (5, 2)))

        def lg(th, d):
            loss, _, grad = model.loss_grad(th, *d, "reference")
            return float(np.asarray(loss).sum()), grad

        def lo(th, d):
            return float(np.asarray(model.loss(model.forward(th, *d, "reference")[0],
                                               d[1])[0]).sum())
        return model, p, data, lg, lo, model.layout

    def metanet(second_order):
        def build():
            from metacore.algorithms.metanet import MetaNet
            net = MetaNet(3, image_shape=(6, 6, 1), channels=2, depth=1, key_dim=3, hidden=4,
                          lstm_hidden=3, mlp_hidden=4, backend="reference")
            rng = np.random.default_rng(2)
            p = net.init_params(rng) + 0.1 * rng.standard_normal(net.num_params)
            for name in ("d.wo", "m.w3"):
                sl = net.layout.slice(name)
                p[sl] = rng.standard_normal(sl.stop - sl.start)
            data = (rng.random((3, 6, 6, 1)), rng.permutation(3), rng.random((6, 6, 6, 1)),
                    np.repeat(np.arange(3), 2))
            lg = lambda th, d: net.loss_and_grad(th, *d, second_order)[:2]   # noqa: E731
            if second_order:
                return net, p, data, lg, lambda th, d: net.loss(th, *d), net.layout
            # first order (the authors' code): the gradient of the surrogate whose
            # meta-information, the support-loss gradients g^u, g^b, is held at its value
            # at the checked point p
            frozen = net.loss_and_grad(p, *data, second_order=False)[3]
            lo = lambda th, d: net.loss(th, *d, frozen=frozen)                 # noqa: E731
            return net, p, data, lg, lo, net.layout
        return build

    def meta_lstm():
        from metacore.algorithms.meta_lstm import MetaLSTM
        rng = np.random.default_rng(0)
        model = models.conv4_maml(n_way=3, image_shape=(6, 6, 1), channels=2, depth=2)
        ml = MetaLSTM(model, hidden=3, p=3.0)
        phi = ml.init_params(rng, np.float64)
        v = ml.views(phi)
        for k in ("lstm.W", "lstm.b", "WF", "WI"):
            v[k][...] = rng.normal(0, 0.5, v[k].shape)
        v["bF"][...], v["bI"][...] = 1.0, -1.0
        data = (rng.random((2, 3, 6, 6, 1)), np.tile(np.arange(3), (2, 1)),
                rng.random((2, 6, 6, 6, 1)), np.tile(np.arange(3), (2, 2)))

        def lg(th, d):
            r = ml.meta_gradient(th, *d, 2, second_order=True)
            return float(np.mean(r["query_loss"])), r["grad"]
        return ml, phi, data, lg, lambda th, d: ml.objective(th, *d, 2), ml.layout

    def lstm_optimizer():
        from metacore.algorithms import lstm_optimizer as A
        from metacore.tasks.quadratic import sample_quadratics
        rng = np.random.default_rng(231)
        layout = A.lstm_optimizer_layout(3)
        phi = A.init_lstm_optimizer(rng, 3) + 0.3 * rng.standard_normal(layout.size)
        q, theta0 = sample_quadratics(rng, 2, 3)
        theta0 = theta0 + rng.standard_normal(theta0.shape)
        state0 = 0.5 * rng.standard_normal((4, 6, 3))
        S = 3
        # the paper's surrogate: the optimizee gradients recorded at phi are held fixed
        _, _, r = A.meta_gradient(phi, layout, theta0, state0, q.loss_grad, S, scale=0.5)
        fixed = r["grads"][:S].copy()

        def lg(th, d):
            dt = th.dtype
            W, y = q.W.astype(dt), q.y.astype(dt)
            from metacore.tasks.quadratic import quadratic_loss_grad
            L, dphi, _ = A.meta_gradient(th, layout, theta0.astype(dt), state0.astype(dt),
                                         lambda t: quadratic_loss_grad(t, W, y), S, scale=0.5)
            return L, dphi

        def lo(th, d):
            return A.meta_loss(A.unroll(th, layout, theta0, state0, q.loss_grad, S,
                                        fixed_grads=fixed, scale=0.5)["losses"])
        return None, phi, (), lg, lo, None

    cases.append(_episode_case("protonet_episode", protonet, per_block=4))
    # the default similarity (support_cosine, c = f.g/|g|), then the paper text's cosine and
    # the scaled cosine (a fixed scale; a learned one), each with FCE and without
    for fce in (True, False):
        tag = "fce" if fce else "no_fce"
        cases.append(_episode_case(f"matching_episode[{tag}]", matching(fce), per_block=3))
        for sim, kw in (("cosine", dict(similarity="cosine")),
                        ("scaled_cosine", dict(similarity="scaled_cosine", cosine_scale=5.0)),
                        ("scaled_cosine,learn_scale", dict(similarity="scaled_cosine",
                                                           cosine_scale=5.0,
                                                           learn_scale=True))):
            cases.append(_episode_case(f"matching_episode[{tag},{sim}]", matching(fce, **kw),
                                       per_block=3))
    cases.append(_episode_case("relation_episode", relation, per_block=3))
    cases.append(_episode_case("siamese_pairs", siamese, per_block=4))
    cases.append(_episode_case("mann_lrua_episode", mann, per_block=4))       # per_head
    cases.append(_episode_case("mann_lrua_episode[shared]",
                               lambda: mann(write_rule="shared"), per_block=4))
    cases.append(_episode_case("mann_lrua_episode[add_vector]",
                               lambda: mann(add_vector=True), per_block=4))
    cases.append(_episode_case("metanet_episode[second_order]", metanet(True), per_block=3))
    cases.append(_episode_case("metanet_episode[first_order]", metanet(False), per_block=3))
    cases.append(_episode_case("meta_lstm[second_order]", meta_lstm, per_block=3))
    cases.append(_episode_case("lstm_optimizer[surrogate]", lstm_optimizer, per_block=None))
    return cases


def _mlp_maml_cases():
    """The fused MAML-family kernel (kernels/mlp_maml.py, Numba) against finite differences
    of the meta-objective, and against the NumPy path (metacore.algorithms), the reference."""
    try:
        from metacore.algorithms.mlp_maml import mlp_maml_gradient, mlp_reptile_direction
        import numba  # noqa: F401
    except ImportError:
        return []
    from metacore.algorithms import maml_gradient, meta_objective
    from metacore.algorithms.reptile import reptile_direction
    from metacore.gradcheck import rel_error
    cases = []
    for k in (2,):
        model, theta0, data, alpha = _maml_setup("sinusoid", 50 + k)
        data = [np.ascontiguousarray(a) for a in data]

        def loss_grad(inputs, k=k, model=model, data=data, alpha=alpha):
            th = inputs["theta"]
            loss, grad = mlp_maml_gradient(model, th, *_cast(data, th.dtype), alpha, steps=k)
            return float(loss.mean()), {"theta": grad}

        def backends(inputs, dtype, k=k, model=model, data=data, alpha=alpha):
            # the reference: the float64 NumPy path on the same (dtype-rounded) inputs
            th = inputs["theta"].astype(dtype)
            d = _cast(data, dtype)
            th64, d64 = th.astype(np.float64), _cast(d, np.float64)
            rows = []
            for fo in (False, True):
                loss, grad = mlp_maml_gradient(model, th, *d, alpha, steps=k, first_order=fo)
                ref = maml_gradient(model, th64, *d64, alpha, steps=k, first_order=fo)
                rows.append((f"numba vs reference ({'fomaml' if fo else 'maml'})",
                             max(rel_error(grad, ref.grad), rel_error(loss, ref.query_loss))))
            l0, dr = mlp_reptile_direction(model, th, d[0], d[1], alpha, steps=k)
            r0, rr = reptile_direction(model, th64, d64[0], d64[1], alpha, k)
            rows.append(("numba vs reference (reptile)", max(rel_error(dr, rr),
                                                              rel_error(l0, r0))))
            return rows

        c = param_case(f"mlp_maml_fused[k={k}]", "kernels",
                       lambda rng, t=theta0: {"theta": t.copy()}, loss_grad,
                       lambda inputs, k=k, model=model, data=data, alpha=alpha:
                       meta_objective(model, inputs["theta"], *data, alpha, k),
                       F32["meta"])
        c.backends = backends
        cases.append(c)
    return cases


def more_cases():
    lrua = [_lrua_case(), _lrua_case("per_head"), _lrua_case("per_head", with_adds=True)]
    return (_lstm_cases() + _meta_cases() + _distance_cases() + lrua
            + _mlp_maml_cases() + _algorithm_cases())
