"""The peer-benchmark workloads: inputs (float32), the float64 ground truth, the FLOP count,
and metacore's calls. The PyTorch and JAX versions live in torch_impl.py and jax_impl.py and
are looked up by `kind`.

Shape letters: T tasks, N support points, M query points, P parameters, Q queries,
D features.

Every call returns a tuple of arrays in a fixed order (`outputs`); the child process checks
each against the ground truth with rel_error = max|a - b| / (max|a| + max|b|) <= tol before
anything is timed.

FLOP counts are of the algorithm metacore runs, counting 2 per multiply-add of the matrix
products only (elementwise work is a few percent at these sizes and is left out); the same
count divides every framework's time, so GFLOP/s ratios are time ratios.
"""
from dataclasses import dataclass, field

import numpy as np

SINUSOID = dict(T=25, N=10, M=10, alpha=0.01)


@dataclass
class Workload:
    name: str                 # id used on the command line and in the tables
    kind: str                 # which builder each framework uses
    title: str
    cfg: dict
    outputs: tuple            # names of the returned arrays, in order
    tol: float = 1e-4         # float32 tolerance of rel_error against the float64 truth
    quick: bool = True        # part of `python -m bench --quick`
    note: str = ""
    metacore: tuple = ("metacore",)          # metacore variants (labels)
    baselines: tuple = ()                    # non-metacore rows built by metacore_call
    peers: tuple = ("torch-eager", "torch-func", "jax")
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- sinusoid MLP family
def _mlp_dims(model):
    from metacore.algorithms.mlp_maml import mlp_structure
    return [int(d) for d in mlp_structure(model)[0]]


def mlp_flops(dims, rows):
    """(forward, backward to the weights and inputs, HVP given the forward and backward) for
    `rows` points. S = sum_l D_l D_{l+1}, S' = the same without the first layer (no dx at
    the input): forward 2 rows S; backward dW 2 rows S + dx 2 rows S'; HVP, with the
    pass's a, z and dz kept: R-forward (a u_w for every layer, ra w past the first)
    2 rows (S + S'), R-backward a^T rdz + ra^T dz 2 rows (S + S'), rdx = rdz w^T + dz u_w^T
    4 rows S'. Multiply-adds only (2 FLOPs each); the elementwise work is not counted."""
    S = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    S1 = S - dims[0] * dims[1]
    return 2 * rows * S, 2 * rows * (S + S1), 2 * rows * (2 * S + 4 * S1)


def sinusoid_flops(kind, k, T, N, M, dims):
    fs, bs, hs = mlp_flops(dims, N)
    fq, bq, _ = mlp_flops(dims, M)
    inner = k * (fs + bs)
    if kind == "reptile":
        return T * inner
    if kind == "fomaml":
        return T * (inner + fq + bq)
    # second order: k inner steps, the query gradient, and k HVPs at the kept passes
    return T * (inner + fq + bq + k * hs)


def make_sinusoid(cfg, seed=0):
    from metacore.models import sinusoid_mlp
    from metacore.tasks import sample_sinusoid
    rng = np.random.default_rng(seed)
    model = sinusoid_mlp()
    sx, sy, qx, qy = sample_sinusoid(rng, cfg["T"], cfg["N"] + cfg["M"], np.float32).split(cfg["N"])
    theta = model.init_params(rng, np.float32)
    return {"theta": theta, "sx": sx, "sy": sy, "qx": qx, "qy": qy}


def sinusoid_layers(model):
    """[(w slice, w shape, b slice, b shape)] per Linear layer, in the flat vector's order."""
    from metacore.network import Linear
    out = []
    for name, layer in zip(model.layer_names, model.layers):
        if isinstance(layer, Linear):
            out.append((model.layout.slice(f"{name}.w"), (layer.d_in, layer.d_out),
                        model.layout.slice(f"{name}.b"), (layer.d_out,)))
    return out


def metacore_sinusoid(kind, k, inputs, dtype, variant):
    """-> zero-argument call returning (query_loss (T,), grad (P,)) or (loss0, d) for Reptile."""
    from metacore.algorithms.maml import fomaml_gradient, maml_gradient
    from metacore.algorithms.reptile import reptile_direction
    from metacore.models import sinusoid_mlp
    model = sinusoid_mlp()
    a = {n: np.ascontiguousarray(v, dtype=dtype) for n, v in inputs.items()}
    th, sx, sy, qx, qy = a["theta"], a["sx"], a["sy"], a["qx"], a["qy"]
    alpha = SINUSOID["alpha"]
    if variant == "metacore-fused":
        from metacore.algorithms.mlp_maml import mlp_maml_gradient, mlp_reptile_direction
        if kind == "reptile":
            return lambda: mlp_reptile_direction(model, th, sx, sy, alpha, steps=k)
        return lambda: mlp_maml_gradient(model, th, sx, sy, qx, qy, alpha, steps=k,
                                         first_order=kind == "fomaml")
    if kind == "maml":
        def call():
            r = maml_gradient(model, th, sx, sy, qx, qy, alpha, steps=k)
            return r.query_loss, r.grad
        return call
    if kind == "fomaml":
        def call():
            r = fomaml_gradient(model, th, sx, sy, qx, qy, alpha, steps=k)
            return r.query_loss, r.grad
        return call
    return lambda: reptile_direction(model, th, sx, sy, alpha, k)


# ---------------------------------------------------------------- distance kernels
def make_distance(cfg, seed=0):
    rng = np.random.default_rng(seed)
    Q, N, D = cfg["Q"], cfg["N"], cfg["D"]
    return {"q": rng.standard_normal((1, Q, D)).astype(np.float32),
            "s": rng.standard_normal((1, N, D)).astype(np.float32),
            "g": rng.standard_normal((1, Q, N)).astype(np.float32),
            "y": rng.integers(0, N, (1, Q)).astype(np.int64)}


def metacore_distance(kind, inputs, dtype, variant):
    """sqeuclidean: -> (d (1, Q, N), dq, ds) given upstream g; protonet_loss: -> (loss (1,),
    dq, ds) of the fused distance + softmax cross-entropy."""
    from metacore.kernels import distance as K
    q, s, g, y = (np.ascontiguousarray(inputs[n], dtype=dtype if n != "y" else None)
                  for n in ("q", "s", "g", "y"))
    if variant == "numpy-blas":
        return _blas_call(kind, q, s, g, y)
    if kind == "sqeuclidean":
        def call():
            d = K.pairwise_sqeuclidean(q, s)
            dq, ds = K.pairwise_sqeuclidean_backward(g, q, s)
            return d, dq, ds
        return call
    def call():
        loss, dq, ds, _ = K.protonet_loss(q, s, y)
        return loss, dq, ds
    return call


def _blas_call(kind, q, s, g, y):
    """The NumPy BLAS formulation: d = |q|^2 + |s|^2 - 2 q s^T, and its backward through
    two matrix products."""
    def dist():
        return ((q * q).sum(-1)[:, :, None] + (s * s).sum(-1)[:, None, :]
                - 2 * np.matmul(q, s.transpose(0, 2, 1)))

    def back(gg):
        dq = 2 * (gg.sum(2)[..., None] * q - np.matmul(gg, s))
        ds = 2 * (gg.sum(1)[..., None] * s - np.matmul(gg.transpose(0, 2, 1), q))
        return dq, ds

    if kind == "sqeuclidean":
        return lambda: (dist(),) + back(g)

    def call():
        logits = -dist()                                           # (1, Q, N)
        z = logits - logits.max(-1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(-1, keepdims=True)
        Q = q.shape[1]
        ll = np.take_along_axis(z - np.log(e.sum(-1, keepdims=True)), y[..., None], -1)
        loss = -ll[..., 0].mean(axis=1)                            # (1,)
        dl = p.copy()
        np.put_along_axis(dl, y[..., None], np.take_along_axis(p, y[..., None], -1) - 1, -1)
        dl /= Q
        return (loss,) + back(-dl)
    return call


def distance_flops(kind, Q, N, D):
    """The GEMM count: forward q s^T 2QND, backward g s and g^T q 4QND."""
    return 6 * Q * N * D


# ---------------------------------------------------------------- Omniglot Conv-4
def _episodes(n_way, shots, queries, T, seed):
    """Real Omniglot episodes (MAML's split, train part, rotations): on random images batch
    norm over a 5-image support set is too badly conditioned for a float32 comparison."""
    from metacore.data.omniglot import EpisodeSampler, load_omniglot, split_characters
    data = load_omniglot(version="maml", dtype=np.float32)
    sampler = EpisodeSampler(data.images, split_characters(data, "maml", "train"), n_way,
                             shots, queries, rotate=True, seed=seed, dtype=np.float32)
    ep = sampler.sample(T)
    return ep.support_x, ep.support_y, ep.query_x, ep.query_y


def make_conv4(cfg, seed=0):
    from metacore.models import conv4_maml
    sx, sy, qx, qy = _episodes(cfg["n_way"], cfg["shots"], cfg["queries"], cfg["T"], seed)
    theta = conv4_maml(n_way=cfg["n_way"]).init_params(np.random.default_rng(seed), np.float32)
    return {"theta": theta, "sx": sx, "sy": sy.astype(np.int64), "qx": qx,
            "qy": qy.astype(np.int64)}


def metacore_conv4(inputs, dtype, k, alpha, n_way, workers=1, first_order=False):
    """-> call returning (query_loss (T,), grad (P,)), second-order MAML (first-order with
    first_order=True); `workers` threads over blocks of the tasks (metacore.taskpool)."""
    from metacore.algorithms.maml import maml_gradient
    from metacore.models import conv4_maml
    model = conv4_maml(n_way=n_way)
    a = {n: (np.ascontiguousarray(v, dtype=dtype) if v.dtype.kind == "f" else v)
         for n, v in inputs.items()}

    def call():
        r = maml_gradient(model, a["theta"], a["sx"], a["sy"], a["qx"], a["qy"], alpha,
                          steps=k, workers=workers, first_order=first_order)
        return r.query_loss, r.grad
    return call


def conv_macs(model):
    """Multiply-adds per image of each Conv2d / Linear layer, in order."""
    from metacore.network import Conv2d, Linear
    shape, macs = model.in_shape, []
    for layer in model.layers:
        out = layer.out_shape(shape)
        if isinstance(layer, Conv2d):
            macs.append(out[0] * out[1] * 9 * layer.c_in * layer.c_out)
        elif isinstance(layer, Linear):
            macs.append(layer.d_in * layer.d_out)
        shape = out
    return macs


def macs_flops(macs, rows):
    """(forward, backward, HVP given the forward) of a stack of bilinear layers with these
    per-row multiply-adds; the same accounting as mlp_flops (the first layer has no dx)."""
    S = sum(macs)
    S1 = S - macs[0]
    return 2 * rows * S, 2 * rows * (S + S1), 2 * rows * (2 * S + 5 * S1)


def make_protonet(cfg, seed=0):
    from metacore.algorithms.protonet import class_mean_matrix
    from metacore.models import conv4_protonet
    sx, sy, qx, qy = _episodes(cfg["n_way"], cfg["shots"], cfg["queries"], 1, seed)
    theta = conv4_protonet().init_params(np.random.default_rng(seed), np.float32)
    return {"theta": theta, "sx": sx, "sy": sy.astype(np.int64), "qx": qx,
            "qy": qy.astype(np.int64),
            "A": class_mean_matrix(sy, cfg["n_way"], np.float32)}


def metacore_protonet(inputs, dtype):
    """-> call returning (loss (1,), grad (P,)) of one training episode."""
    from metacore.algorithms.protonet import ProtoNet
    net = ProtoNet()
    a = {n: (np.ascontiguousarray(v, dtype=dtype) if v.dtype.kind == "f" else v)
         for n, v in inputs.items()}

    def call():
        loss, grad, _ = net.episode_loss_and_grad(a["theta"], a["sx"], a["sy"], a["qx"],
                                                  a["qy"])
        return np.array([loss]), grad
    return call


# ---------------------------------------------------------------- LRUA memory (MANN)
LRUA = dict(T=50, B=16, H=4, S=128, W=40, gamma=0.95)


def make_lrua(cfg, seed=0):
    """The inputs of bench/bench_lrua.py's make() (same seed, same order of draws): MANN's
    start M_0 = 1e-6, w_u_0 = 0, w_r_0 one-hot on slot 0; keys, gates and the probe random.
    keys (T, B, H, W), alpha (H,), memory0 (B, S, W), read0 (B, H, S), usage0 (B, S),
    probe (T, B, H, W): the fixed linear probe c of L = sum(c * reads), so dL/dreads = c."""
    T, B, H, S, W = (cfg[n] for n in ("T", "B", "H", "S", "W"))
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((T, B, H, W)).astype(np.float32)
    alpha = rng.standard_normal(H).astype(np.float32)
    memory0 = np.full((B, S, W), 1e-6, np.float32)
    read0 = np.zeros((B, H, S), np.float32)
    read0[..., 0] = 1
    usage0 = np.zeros((B, S), np.float32)
    probe = rng.standard_normal((T, B, H, W)).astype(np.float32)
    return {"keys": keys, "alpha": alpha, "memory0": memory0, "read0": read0,
            "usage0": usage0, "probe": probe}


def metacore_lrua(cfg, inputs, dtype, variant):
    """-> call returning (reads (T, B, H, W), dkeys (T, B, H, W), dalpha (H,),
    dmemory0 (B, S, W), dread0 (B, H, S)), as bench/bench_lrua.py times it. `metacore`:
    lrua_forward_tape, then lrua_backward_tape of the probe (the reverse sweep only);
    `metacore-reference` (also the float64 truth): lrua_forward, then lrua_backward of the
    probe (which reruns the forward inside)."""
    from metacore.kernels import lrua as K
    a = {n: np.ascontiguousarray(v, dtype=dtype) for n, v in inputs.items()}
    args = (a["keys"], a["alpha"], a["memory0"], a["read0"], a["usage0"], cfg["gamma"])
    if variant == "metacore":
        def call():
            *out, tape = K.lrua_forward_tape(*args, backend="numba")
            return (out[0],) + tuple(K.lrua_backward_tape(a["probe"], tape))
        return call
    if variant != "metacore-reference":
        raise KeyError(variant)

    def call():
        reads = K.lrua_forward(*args, backend="reference")[0]
        return (reads,) + tuple(K.lrua_backward(a["probe"], *args, backend="reference"))
    return call


def lrua_flops(T, B, H, S, W):
    """bench/bench_lrua.py's nominal count: 20 H S W per step per episode (forward 6,
    reverse sweep 14; only the H S W terms). A backward that reruns the forward (the
    reference's lrua_backward, the step chain) does 6 more, not counted."""
    return 20 * H * S * W * T * B


# ---------------------------------------------------------------- registry
def _sinusoid(kind, k, quick=True):
    title = {"maml": "second-order MAML", "fomaml": "first-order MAML",
             "reptile": "Reptile"}[kind]
    outputs = ("loss0", "d") if kind == "reptile" else ("query_loss", "grad")
    metacore = ("metacore-fused", "metacore")
    return Workload(
        name=f"sinusoid-{kind}-k{k}", kind=kind,
        title=f"Sinusoid {title} meta-gradient, MLP 1-40-40-1, T=25 tasks, K=10 support + "
              f"10 query, k={k}",
        cfg=dict(SINUSOID, k=k), outputs=outputs, quick=quick, metacore=metacore,
        note="Timed: the meta-gradient of one meta-batch (query losses and the (P,) gradient; "
             "for Reptile the pre-update losses and d = theta - mean_t theta_k^t), no "
             "optimizer step. `metacore-fused` is kernels/mlp_maml.py, `metacore` is "
             "metacore.algorithms.maml (NumPy over all tasks at once).")


def _distance(kind, Q, N, D, quick=True):
    what = ("squared Euclidean distance forward + backward (given an upstream gradient)"
            if kind == "sqeuclidean" else
            "fused ProtoNet loss: distance, softmax cross-entropy, backward to q and s")
    return Workload(
        name=f"{'dist' if kind == 'sqeuclidean' else 'protoloss'}-Q{Q}-N{N}-D{D}",
        kind=kind, title=f"{what[0].upper() + what[1:]}, Q={Q}, N={N}, D={D}",
        cfg=dict(Q=Q, N=N, D=D), outputs=("d", "dq", "ds") if kind == "sqeuclidean" else
        ("loss", "dq", "ds"), quick=quick, metacore=("metacore",), baselines=("numpy-blas",),
        tol=1e-4,
        note="`metacore` is metacore.kernels.distance (Numba); `numpy-blas` the expansion "
             "|q|^2 + |s|^2 - 2 q s^T through NumPy's BLAS.")


# The PyTorch and JAX variants tried on the Conv-4 workloads (issue 17): the original two
# peers, and the forms a careful user would write (torch_impl.py / jax_impl.py say what each
# changes). The table's speed-up is against metacore; the fastest peer row is the one to read.
CONV4_TORCH = ("torch-eager", "torch-eager-fast", "torch-eager-fast-cl",
               "torch-eager-nativebn", "torch-module", "torch-func", "torch-func-loop")
CONV4_JAX = ("jax", "jax-unrolled", "jax-map")
PROTO_TORCH = ("torch-eager", "torch-eager-fast", "torch-eager-fast-cl", "torch-module")
PROTO_JAX = ("jax", "jax-pool")


def _conv4(T, k, quick=True, first_order=False, peers=CONV4_TORCH + CONV4_JAX):
    order = "first-order" if first_order else "second-order"
    return Workload(
        name=f"conv4-{'fomaml' if first_order else 'maml'}-T{T}-k{k}",
        kind="conv4_fomaml" if first_order else "conv4_maml",
        title=f"Omniglot Conv-4 {order} MAML meta-gradient, 5-way 1-shot, 15 queries per "
              f"class, meta-batch {T}, k={k}",
        cfg=dict(T=T, k=k, n_way=5, shots=1, queries=15, alpha=0.4), outputs=("query_loss", "grad"),
        quick=quick, tol=1e-3, peers=peers,
        note="conv4_maml (4 x [3x3 conv 64 stride 2 'same', batch norm with the task's batch "
             "statistics, ReLU], spatial mean, linear 5-way head; P = 112,261), softmax "
             "cross-entropy, alpha = 0.4, real Omniglot episodes. Timed: the meta-gradient "
             "(query losses and the (P,) gradient). On 2 threads metacore runs 2 task "
             "threads (`maml_gradient(..., workers=2)`, BLAS at 1 thread each). Tolerance 1e-3: batch norm over 5 support "
             "images amplifies float32 rounding.")


def _protonet(quick=True):
    return Workload(
        name="protonet-60w5s", kind="protonet",
        title="ProtoNet training episode, Conv-4, 60-way 5-shot, 5 queries per class, "
              "forward + backward",
        cfg=dict(n_way=60, shots=5, queries=5), outputs=("loss", "grad"), quick=quick,
        tol=5e-3, peers=PROTO_TORCH + PROTO_JAX,
        note="conv4_protonet (4 x [3x3 conv 64 'same', batch norm over the episode's 600 "
             "images, ReLU, 2x2 max-pool], 64-d embedding; P = 111,936), prototypes = class "
             "means of the support embeddings, logits = -squared distance, softmax "
             "cross-entropy over the 300 queries. Timed: loss and (P,) gradient. torch.func "
             "is left out: one episode has nothing to vmap over. Tolerance 5e-3: in float32 "
             "both metacore and PyTorch eager land about 3e-3 from the float64 gradient "
             "(JAX about 3e-4; batch norm over 600 images and 4 layers of it), measured on "
             "this input, not yet explained.")


def _lrua(quick=True):
    c = LRUA
    return Workload(
        name=f"lrua-T{c['T']}-B{c['B']}-H{c['H']}-{c['S']}x{c['W']}", kind="lrua",
        title=f"LRUA memory (MANN): a {c['T']}-step episode forward + backward, B={c['B']} "
              f"episodes, H={c['H']} heads, memory {c['S']} x {c['W']}",
        cfg=dict(c), outputs=("reads", "dkeys", "dalpha", "dmemory0", "dread0"),
        quick=quick, tol=1e-4, metacore=("metacore", "metacore-reference"),
        peers=("torch-eager", "jax"),
        note="Santoro et al.'s least-recently-used access (metacore.kernels.lrua; the math in "
             "metacore.reference.lrua): cosine read weights with softmax, usage decay gamma = "
             "0.95, least-used weights from the n-th smallest usage (n = H), write weights "
             "sigmoid(alpha) w_r_prev + (1 - sigmoid(alpha)) w_lu_prev, least-used slot "
             "zeroed before the write M_t = M' + w_w^T k. Inputs as bench/bench_lrua.py "
             "(M_0 = 1e-6, w_u_0 = 0, w_r_0 one-hot). Timed: the reads of the whole episode "
             "and the gradient of a fixed linear probe L = sum(c * reads) w.r.t. keys, "
             "alpha, memory0 and read0. `metacore` is the Numba backend (lrua_forward_tape, "
             "which keeps what the backward needs, + lrua_backward_tape, the reverse sweep "
             "only), `metacore-reference` the float64 NumPy reference (lrua_forward + "
             "lrua_backward, which reruns the forward; loops over episodes and steps; it "
             "computes in float64 and returns float32). PyTorch eager: a Python loop over the 50 steps, batched "
             "over episodes, autograd; JAX: jit of value_and_grad of a lax.scan over the "
             "steps. In both the least-used weights and the zeroed slot come from the usage "
             "under no_grad / stop_gradient (kthvalue / sort, argmin), as metacore treats "
             "them as non-differentiable. torch.func is left out: nothing to vmap over "
             "beyond the batch the ops already take.")


WORKLOADS = {}
for _w in [_sinusoid("maml", 1), _sinusoid("maml", 5), _sinusoid("fomaml", 1),
           _sinusoid("fomaml", 5, quick=False), _sinusoid("reptile", 1),
           _sinusoid("reptile", 5, quick=False),
           _distance("sqeuclidean", 75, 5, 64), _distance("sqeuclidean", 300, 20, 64),
           _distance("sqeuclidean", 2000, 2000, 1600, quick=False),
           _distance("protonet_loss", 75, 5, 64), _distance("protonet_loss", 300, 20, 64),
           _conv4(4, 1), _conv4(32, 1, quick=False, peers=CONV4_TORCH + ("jax-map",)),
           _conv4(4, 1, quick=False, first_order=True),
           _protonet(), _lrua()]:
    WORKLOADS[_w.name] = _w


def make_inputs(w, seed=0):
    if w.kind in ("maml", "fomaml", "reptile"):
        return make_sinusoid(w.cfg, seed)
    if w.kind in ("sqeuclidean", "protonet_loss"):
        return make_distance(w.cfg, seed)
    if w.kind in ("conv4_maml", "conv4_fomaml"):
        return make_conv4(w.cfg, seed)
    if w.kind == "protonet":
        return make_protonet(w.cfg, seed)
    if w.kind == "lrua":
        return make_lrua(w.cfg, seed)
    raise KeyError(w.kind)


def metacore_call(w, variant, inputs, dtype=np.float32, threads=1):
    """-> a call of metacore's computation of w; `threads`: the thread count of the run (the
    Conv-4 MAML step uses that many task threads)."""
    if w.kind in ("maml", "fomaml", "reptile"):
        return metacore_sinusoid(w.kind, w.cfg["k"], inputs, dtype, variant)
    if w.kind in ("sqeuclidean", "protonet_loss"):
        return metacore_distance(w.kind, inputs, dtype, variant)
    if w.kind in ("conv4_maml", "conv4_fomaml"):
        return metacore_conv4(inputs, dtype, w.cfg["k"], w.cfg["alpha"], w.cfg["n_way"],
                              workers=threads, first_order=w.kind == "conv4_fomaml")
    if w.kind == "protonet":
        return metacore_protonet(inputs, dtype)
    if w.kind == "lrua":
        return metacore_lrua(w.cfg, inputs, dtype, variant)
    raise KeyError(w.kind)


def truth(w, inputs):
    """The float64 ground truth: metacore's NumPy path in float64 (itself checked against
    central finite differences by the test suite)."""
    if w.kind in ("maml", "fomaml", "reptile"):
        out = metacore_sinusoid(w.kind, w.cfg["k"], inputs, np.float64, "metacore")()
    elif w.kind in ("sqeuclidean", "protonet_loss"):
        out = metacore_distance(w.kind, inputs, np.float64, "numpy-blas")()
    elif w.kind == "lrua":
        out = metacore_lrua(w.cfg, inputs, np.float64, "metacore-reference")()
    else:
        out = metacore_call(w, "metacore", inputs, np.float64)()
    return tuple(np.asarray(o, np.float64) for o in out)


def flops(w):
    c = w.cfg
    if w.kind in ("maml", "fomaml", "reptile"):
        from metacore.models import sinusoid_mlp
        return sinusoid_flops(w.kind, c["k"], c["T"], c["N"], c["M"],
                              _mlp_dims(sinusoid_mlp()))
    if w.kind in ("sqeuclidean", "protonet_loss"):
        return distance_flops(w.kind, c["Q"], c["N"], c["D"])
    if w.kind == "conv4_maml":
        from metacore.models import conv4_maml
        fs, bs, hs = macs_flops(conv_macs(conv4_maml(n_way=c["n_way"])), c["shots"] * c["n_way"])
        fq, bq, _ = macs_flops(conv_macs(conv4_maml(n_way=c["n_way"])),
                               c["queries"] * c["n_way"])
        k = c["k"]
        return c["T"] * (k * (fs + bs) + fq + bq + k * hs + (k - 1) * fs)
    if w.kind == "conv4_fomaml":
        from metacore.models import conv4_maml
        fs, bs, _ = macs_flops(conv_macs(conv4_maml(n_way=c["n_way"])), c["shots"] * c["n_way"])
        fq, bq, _ = macs_flops(conv_macs(conv4_maml(n_way=c["n_way"])),
                               c["queries"] * c["n_way"])
        return c["T"] * (c["k"] * (fs + bs) + fq + bq)
    if w.kind == "protonet":
        from metacore.models import conv4_protonet
        f, b, _ = macs_flops(conv_macs(conv4_protonet()), c["n_way"] * (c["shots"] + c["queries"]))
        return f + b
    if w.kind == "lrua":
        return lrua_flops(c["T"], c["B"], c["H"], c["S"], c["W"])
    raise KeyError(w.kind)
