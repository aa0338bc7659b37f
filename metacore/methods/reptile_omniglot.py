"""Reptile on Omniglot as Nichol, Achiam & Schulman 2018 ran it (`metacore train reptile --task
omniglot`; maml_family hands this task to this module, sinusoid Reptile stays there).

Shape letters: T tasks, B images in an inner mini-batch, S support images of a task (N * K),
P parameters.

The protocol (the paper's Section 6 / Table 1 and the authors' code, openai/supervised-reptile:
the README's command for 1-shot 5-way Omniglot, reptile.py, models.py, train.py):

    training   each meta-iteration draws meta_batch = 5 tasks of N = 5 classes with
               train_shots = 10 images each (50 images). Task by task, starting from theta,
               inner_steps = 5 steps of Adam (lr 1e-3, beta1 = 0) on mini-batches of
               inner_batch = 10 drawn without replacement (a fresh shuffle of the 50 images,
               cut into batches; one pass here). Then
                   theta <- theta + eps_i * (mean_t theta_t - theta),
               eps_i = 1.0 annealed linearly to 0 over the run (outer_lr, outer_lr_final).
               The trainer sees d = theta - mean_t theta_t and takes an SGD step eps_i * d.
    inner Adam the authors' Adam is one TensorFlow optimizer whose moments are NOT reset
               between tasks or iterations: only the trainable variables are restored after
               each task (reptile.py exports `tf.trainable_variables()`). So its second moment
               v and step count t run on through the whole of training; this module keeps them
               (buffers inner_v, inner_t) and checkpoints them. TensorFlow's update, with
               beta1 = 0 (m = g):
                   t <- t + 1;  v <- b2 v + (1 - b2) g^2
                   theta <- theta - lr * sqrt(1 - b2^t) * g / (sqrt(v) + eps)
    evaluation 5-way 1-shot, one query per class; eval_steps = 50 Adam steps on mini-batches of
               eval_batch = 5 (the whole support set), starting from the training Adam state,
               which is then thrown away (the authors restore every variable after a task).
               Transductive: the 5 queries are classified as one batch (batch-norm statistics
               over the queries). Non-transductive: each query is classified in a batch of the
               5 support images plus itself, so no query sees another.
    network    Conv-4 with stride-2 'same' convolutions, 64 channels, batch norm with batch
               statistics always (training=True in their code, eps 1e-3), ReLU, the 2x2x64
               map flattened into the linear layer (models.py: OmniglotModel).

Differences, stated: the authors train on 1,200 random characters (x4 rotations) and test on
the other 423; this module uses MAML's split (1,100 train characters x 4 rotations, 100
validation characters for the learning curve, the same 423 test characters, unrotated at test
as in their code). Weight decay: their default rate 1 means none.
"""
import math

import numpy as np

from metacore.algorithms.maml import _loss_grad
from metacore.checkpoint import rng_state, set_rng_state
from metacore.errors import UserError
from metacore.methods import MethodBase
from metacore.network import LOSSES

SOURCE = "Nichol et al. 2018 (arXiv 1803.02999), openai/supervised-reptile README command"

# Every default, and where it comes from. "iterations", "meta_batch" etc. keep the trainer's
# names; eval_every / eval_tasks / log_every / ckpt_every are this project's, not the paper's.
DEFAULTS = dict(
    n_way=5,              # --classes 5
    shots=1,              # --shots 1: the test-time K
    train_shots=10,       # --train-shots 10: images per class in a training task
    inner_steps=5,        # --inner-iters 5
    inner_batch=10,       # --inner-batch 10
    inner_lr=1e-3,        # --learning-rate 0.001 (Adam's step size)
    inner_beta1=0.0,      # models.py: DEFAULT_OPTIMIZER = AdamOptimizer(beta1=0)
    inner_beta2=0.999,    # TensorFlow's AdamOptimizer default
    inner_eps=1e-8,       # TensorFlow's AdamOptimizer default
    meta_batch=5,         # --meta-batch 5
    outer_opt="sgd",      # the interpolation theta + eps (mean theta_t - theta) is SGD on d
    outer_lr=1.0,         # --meta-step 1
    outer_lr_final=0.0,   # --meta-step-final 0, linear in the iteration (train.py)
    iterations=100000,    # --meta-iters 100000
    test_steps=50,        # --eval-iters 50
    eval_batch=5,         # --eval-batch 5
    queries=1,            # reptile.py evaluate(): one test image per class
    bn_eps=1e-3,          # tf.layers.batch_normalization's default epsilon
    head="flatten",       # models.py: reshape the 2x2x64 map, then dense
    eval_every=1000,      # this project's: validation curve
    eval_tasks=100,       # this project's: fixed validation tasks (5-way 1-shot, 100 chars)
    log_every=100, ckpt_every=1000, workers=1,
)

SOURCES = {
    "n_way": SOURCE + ": --classes 5",
    "shots": SOURCE + ": --shots 1",
    "train_shots": SOURCE + ": --train-shots 10",
    "inner_steps": SOURCE + ": --inner-iters 5",
    "inner_batch": SOURCE + ": --inner-batch 10",
    "inner_lr": SOURCE + ": --learning-rate 0.001",
    "inner_beta1": "openai/supervised-reptile models.py: AdamOptimizer(beta1=0)",
    "inner_beta2": "TensorFlow AdamOptimizer default",
    "inner_eps": "TensorFlow AdamOptimizer default",
    "meta_batch": SOURCE + ": --meta-batch 5",
    "outer_opt": "Nichol et al. 2018, Algorithm 2 (the interpolation is an SGD step on d)",
    "outer_lr": SOURCE + ": --meta-step 1",
    "outer_lr_final": SOURCE + ": --meta-step-final 0 (linear, train.py)",
    "iterations": SOURCE + ": --meta-iters 100000",
    "test_steps": SOURCE + ": --eval-iters 50",
    "eval_batch": SOURCE + ": --eval-batch 5",
    "queries": "openai/supervised-reptile reptile.py: evaluate() holds out 1 image per class",
    "bn_eps": "TensorFlow batch_normalization default epsilon",
    "head": "openai/supervised-reptile models.py: OmniglotModel flattens before the dense layer",
}


def check_config(cfg):
    for key in ("n_way", "shots", "train_shots", "inner_steps", "inner_batch", "meta_batch",
                "test_steps", "eval_batch", "queries", "eval_tasks", "workers"):
        v = cfg[key]
        low = 0 if key == "test_steps" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise UserError(f"make_config: {key} must be an int >= {low}, got {v!r}")
    for key, low, high in (("inner_lr", 0.0, math.inf), ("inner_beta1", 0.0, 1.0),
                           ("inner_beta2", 0.0, 1.0), ("inner_eps", 0.0, math.inf),
                           ("bn_eps", 0.0, math.inf)):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or not low <= v < high or (key in ("inner_eps", "bn_eps") and v <= 0):
            raise UserError(f"make_config: {key} must be a finite number in "
                             f"[{low}, {high}){' and > 0' if key.endswith('eps') else ''}, "
                             f"got {v!r}")
        cfg[key] = float(v)
    if cfg["inner_beta1"] != 0.0:
        raise UserError("make_config: inner_beta1 must be 0 for reptile on omniglot (the "
                         "inner Adam keeps no first moment across tasks here), got "
                         f"{cfg['inner_beta1']!r}")
    if cfg["inner_batch"] > cfg["n_way"] * cfg["train_shots"]:
        raise UserError(f"make_config: inner_batch {cfg['inner_batch']} exceeds a training "
                         f"task's {cfg['n_way']} x {cfg['train_shots']} images")
    if cfg["eval_batch"] > cfg["n_way"] * cfg["shots"]:
        raise UserError(f"make_config: eval_batch {cfg['eval_batch']} exceeds a test task's "
                         f"{cfg['n_way']} x {cfg['shots']} support images")
    if cfg["head"] not in ("flatten", "mean"):
        raise UserError(f"make_config: head must be 'flatten' or 'mean', got {cfg['head']!r}")
    if cfg["workers"] != 1:
        raise UserError("make_config: reptile on omniglot runs its tasks one after another "
                         "(the inner Adam state carries over), so workers must be 1")


# ------------------------------------------------------------------------------ inner Adam
def adam_b1zero_step(theta, g, v, t, lr, beta2, eps):
    """One step of TensorFlow's Adam with beta1 = 0, in place on theta and v.
    theta, g, v: (..., P) the same shape; t: the step count after this step (>= 1).
    theta <- theta - lr sqrt(1 - b2^t) g / (sqrt(v) + eps), v updated first."""
    v *= beta2
    v += (1.0 - beta2) * (g * g)
    theta -= (lr * math.sqrt(1.0 - beta2 ** t)) * g / (np.sqrt(v) + eps)


def minibatch_order(rng, n, batch, steps):
    """(steps, batch) indices into n samples, as the authors' _mini_batches without
    replacement: shuffle, cut into batches, reshuffle when the samples run out (a partial
    batch carries over into the next shuffle)."""
    out, cur = [], []
    while len(out) < steps:
        for i in rng.permutation(n):
            cur.append(i)
            if len(cur) == batch:
                out.append(cur)
                cur = []
                if len(out) == steps:
                    break
    return np.array(out, np.int64).reshape(steps, batch)


# ------------------------------------------------------------------------------ evaluation
def _predict(model, theta, x):
    """theta (T, P), x (T, B, H, W, 1) -> logits (T, B, N) with batch statistics over B."""
    out, _ = model.forward(theta, x, _checked=True)
    return out


def adapt_adam(model, theta, v, t, sx, sy, steps, batch, rng, cfg):
    """Adapt T tasks at once: theta (P,) copied to (T, P); v (P,) and t the training Adam
    state, copied (the caller's are untouched). sx (T, S, ...), sy (T, S).
    -> adapted theta (T, P)."""
    T, S = sy.shape
    th = np.repeat(theta[None, :], T, axis=0)                       # (T, P)
    vt = np.repeat(v[None, :], T, axis=0)                           # (T, P)
    order = np.stack([minibatch_order(rng, S, batch, steps) for _ in range(T)])  # (T, steps, B)
    rows = np.arange(T)[:, None]
    for i in range(steps):
        idx = order[:, i]                                           # (T, B)
        _, g = _loss_grad(model, th, sx[rows, idx], sy[rows, idx])  # g: (T, P)
        adam_b1zero_step(th, g, vt, t + i + 1, cfg["inner_lr"], cfg["inner_beta2"],
                         cfg["inner_eps"])
    return th


def score(model, th, sx, qx, qy, transductive):
    """Accuracy (T,) of the adapted th (T, P) on the queries qx (T, M, ...), qy (T, M).
    Transductive: all M queries in one batch. Otherwise query j is classified in the batch
    [support, query j] (the authors' non-transductive protocol)."""
    T, M = qy.shape
    if transductive:
        pred = _predict(model, th, qx).argmax(axis=-1)              # (T, M)
    else:
        S = sx.shape[1]
        x = np.concatenate([np.repeat(sx[:, None], M, axis=1), qx[:, :, None]], axis=2)
        x = x.reshape((T * M, S + 1) + qx.shape[2:])                # (T*M, S+1, ...)
        out = _predict(model, np.repeat(th, M, axis=0), x)          # (T*M, S+1, N)
        pred = out[:, -1].argmax(axis=-1).reshape(T, M)
    return (pred == qy).mean(axis=1)


# ------------------------------------------------------------------------------ the method
class Method(MethodBase):
    """Reptile with the authors' protocol; see the module docstring."""

    def __init__(self, cfg):
        super().__init__(cfg)
        from metacore.data.omniglot import EpisodeSampler, load_omniglot_once, split_characters
        from metacore.models import conv4_maml
        self.model = conv4_maml(n_way=cfg["n_way"], head=cfg["head"], bn_eps=cfg["bn_eps"])
        data = load_omniglot_once("maml", self.dtype)
        self.images = data.images
        self.train_sampler = EpisodeSampler(data.images, split_characters(data, "maml", "train"),
                                            cfg["n_way"], cfg["train_shots"], 0, rotate=True,
                                            seed=cfg["seed"], dtype=self.dtype)
        val = EpisodeSampler(data.images, split_characters(data, "maml", "val"), cfg["n_way"],
                             cfg["shots"], cfg["queries"], rotate=False, seed=cfg["seed"] + 1,
                             dtype=self.dtype).sample(cfg["eval_tasks"])
        self.val_batch = (val.support_x, val.support_y, val.query_x, val.query_y)
        P = self.model.num_params
        self.inner_v = np.zeros(P, self.dtype)      # the inner Adam's second moment (P,)
        self.inner_t = 0                            # and its step count

    def init_params(self, rng):
        return self.model.init_params(rng, self.dtype)

    def sample(self):
        ep = self.train_sampler.sample(self.cfg["meta_batch"])
        return ep.support_x, ep.support_y                 # (T, N*K, H, W, 1), (T, N*K)

    def gradient(self, params, batch):
        """d = theta - mean_t theta_t after each task's inner Adam steps, tasks in order, the
        Adam state carried from task to task. Metrics: the inner mini-batches' mean loss and
        accuracy before each step (first step and last step)."""
        cfg, model = self.cfg, self.model
        sx, sy = batch
        T, S = sy.shape
        lfwd = LOSSES[model.loss_name][0]
        lbwd = LOSSES[model.loss_name][1]
        total = np.zeros_like(params)
        first, last = [], []
        for t in range(T):
            th = params[None, :].copy()                                     # (1, P)
            order = minibatch_order(self.rng, S, cfg["inner_batch"], cfg["inner_steps"])
            for i, idx in enumerate(order):
                x, y = sx[t:t + 1, idx], sy[t:t + 1, idx]                   # (1, B, ...)
                out, caches = model.forward(th, x, _checked=True)           # (1, B, N)
                loss, lcache = lfwd(out, y)
                g = model.backward(lbwd(lcache), caches, 1)                 # (1, P)
                acc = float((out.argmax(axis=-1) == y).mean())
                if i == 0:
                    first.append((float(loss[0]), acc))
                if i == len(order) - 1:
                    last.append((float(loss[0]), acc))
                self.inner_t += 1
                adam_b1zero_step(th, g, self.inner_v[None, :], self.inner_t, cfg["inner_lr"],
                                 cfg["inner_beta2"], cfg["inner_eps"])
            total += th[0]
        d = params - total / T
        f, l_ = np.array(first), np.array(last)
        return d, {"inner_loss_first": float(f[:, 0].mean()),
                   "inner_acc_first": float(f[:, 1].mean()),
                   "inner_loss_last": float(l_[:, 0].mean()),
                   "inner_acc_last": float(l_[:, 1].mean())}

    # -------------------------------------------------------------- state for exact resume
    def buffers(self):
        return {"inner_v": self.inner_v, "inner_t": np.array([self.inner_t], np.int64)}

    def load_buffers(self, arrays):
        if set(arrays) != {"inner_v", "inner_t"}:
            raise ValueError(f"reptile: the checkpoint's buffers are {sorted(arrays)}, "
                             f"expected ['inner_t', 'inner_v']")
        v = np.asarray(arrays["inner_v"])
        if v.shape != self.inner_v.shape or v.dtype != self.inner_v.dtype:
            raise ValueError(f"reptile: checkpoint inner_v is {v.shape} {v.dtype}, expected "
                             f"{self.inner_v.shape} {self.inner_v.dtype}")
        self.inner_v = v.copy()
        self.inner_t = int(np.asarray(arrays["inner_t"]).reshape(-1)[0])

    def state(self):
        return {"rng": rng_state(self.rng), "sampler": rng_state(self.train_sampler.rng)}

    def load_state(self, s):
        set_rng_state(self.rng, s["rng"])
        set_rng_state(self.train_sampler.rng, s["sampler"])

    # -------------------------------------------------------------- evaluation
    def _accuracy(self, params, batch, modes, seed, steps=None, chunk=50):
        """{transductive (bool): accuracy (T,)} for each mode in modes, the tasks adapted
        once (the same adapted parameters scored both ways)."""
        sx, sy, qx, qy = batch
        rng = np.random.default_rng(seed)
        steps = self.cfg["test_steps"] if steps is None else steps
        accs = {tr: [] for tr in modes}
        for lo in range(0, sy.shape[0], chunk):
            hi = min(lo + chunk, sy.shape[0])
            th = adapt_adam(self.model, params, self.inner_v, self.inner_t, sx[lo:hi],
                            sy[lo:hi], steps, self.cfg["eval_batch"], rng, self.cfg)
            for tr in modes:
                accs[tr].append(score(self.model, th, sx[lo:hi], qx[lo:hi], qy[lo:hi], tr))
        return {tr: np.concatenate(a) for tr, a in accs.items()}              # (T,) each

    def evaluate_val(self, params):
        acc = self._accuracy(params, self.val_batch, [True], self.cfg["seed"] + 2)[True]
        return {"val_accuracy": float(acc.mean())}

    def evaluate(self, params, opts):
        """`metacore eval`: n test tasks (default 600) from the 423 test characters,
        unrotated; --bn transductive / non-transductive / both (default both)."""
        from metacore.data.omniglot import EpisodeSampler, load_omniglot_once, split_characters
        from metacore.stats import mean_ci
        cfg = self.cfg
        n = 600 if opts.get("tasks") is None else opts["tasks"]
        way = opts.get("way") or cfg["n_way"]
        shots = opts.get("shots") or cfg["shots"]
        steps = cfg["test_steps"] if opts.get("steps") is None else opts["steps"]
        seed = 2017 if opts.get("seed") is None else opts["seed"]
        bn = opts.get("bn") or "both"
        for key, v, low in (("tasks", n, 2), ("way", way, 2), ("shots", shots, 1),
                            ("steps", steps, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise UserError(f"eval: --{key} must be an int >= {low}, got {v!r}")
        if way != cfg["n_way"]:
            raise UserError(f"eval: this reptile model has a {cfg['n_way']}-way output layer; "
                             f"--way {way} needs a model trained for {way} ways")
        if cfg["eval_batch"] > way * shots:
            raise UserError(f"eval: eval_batch {cfg['eval_batch']} exceeds the {way * shots} "
                             f"support images")
        modes = {"transductive": [True], "non-transductive": [False],
                 "both": [True, False]}.get(bn)
        if modes is None:
            raise UserError(f"eval: --bn must be transductive, non-transductive or both for "
                             f"reptile, got {bn!r}")
        data = load_omniglot_once("maml", self.dtype)
        ep = EpisodeSampler(data.images, split_characters(data, "maml", "test"), way, shots,
                            cfg["queries"], rotate=False, seed=seed, dtype=self.dtype).sample(n)
        batch = (ep.support_x, ep.support_y, ep.query_x, ep.query_y)
        results = []
        accs = self._accuracy(params, batch, modes, seed + 1, steps)
        for tr in modes:
            m, c = mean_ci(accs[tr])
            results.append({"algorithm": "reptile", "task": "omniglot", "way": way,
                            "shots": shots, "queries": cfg["queries"], "steps": steps,
                            "tasks": n, "seed": seed,
                            "bn": "transductive" if tr else "non-transductive",
                            "accuracy": 100 * m, "ci95": 100 * c})
        return results if len(results) > 1 else results[0]

    def format_result(self, result):
        rs = result if isinstance(result, list) else [result]
        return "\n".join(f"reptile omniglot {r['way']}-way {r['shots']}-shot, {r['steps']} Adam "
                         f"steps, BN {r['bn']}, {r['tasks']} test tasks: accuracy "
                         f"{r['accuracy']:.2f}% +- {r['ci95']:.2f}" for r in rs)
