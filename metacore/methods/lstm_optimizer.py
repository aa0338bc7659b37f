"""The coordinatewise LSTM optimizer (Andrychowicz et al. 2016) through the trainer
(`metacore train lstm_optimizer --task quadratic|omniglot_mlp`); the math lives in
metacore.algorithms.lstm_optimizer.

Tasks (optimizee families):
    quadratic     f(theta) = ||W theta - y||^2, 10 dimensions, W, y ~ N(0, 1), theta_0 ~
                  N(0, 0.01^2) (Section 3.1; metacore.tasks.quadratic)
    omniglot_mlp  the paper's MNIST network (Section 3.2: one hidden layer of 20 units,
                  cross-entropy) on Omniglot instead, since MNIST is not shipped: each optimizee
                  is a 784-20-10 MLP with ReLU (metacore has no sigmoid layer; stated here as a
                  deviation), softmax cross-entropy, trained full-batch on 10 random characters
                  x 15 drawings (drawings 0..14; 15..19 are its held-out test images), ink28
                  images. pool = k > 1 averages k x k pixel blocks first (pool=2: 14 x 14
                  inputs, a 196-20-10 MLP of 4150 parameters instead of 15910: 4x cheaper
                  per step, which is what the CPU budget of the recorded run allowed). Meta-training draws characters from the MAML split's training part,
                  the validation optimizees from its validation part, `metacore eval` tunes the
                  baselines on validation characters and tests on the test characters.

One trainer step = ONE UNROLL of `unroll` (20) steps: the outer Adam updates phi after every
truncation, as truncated BPTT does in the paper, and a 100-step optimization spans
opt_steps / unroll = 5 trainer steps. What persists between unrolls (the optimizees' theta,
the LSTM hidden state of every coordinate, the optimizees themselves) is in buffers(), and
which unroll of the optimization comes next is in state(), so a resumed run continues the
same optimizations bit for bit. A new batch of optimizees is drawn from self.rng at the start
of every optimization (in sample()); gradient() then advances the persisted optimizees (the
trainer calls it exactly once per step).

Shape letters: M optimizees per meta-batch, n parameters of one optimizee, N = M n
coordinates, H hidden units, S unroll steps, P entries of phi.
"""
import math
import os

import numpy as np

from metacore.algorithms import lstm_optimizer as A
from metacore.checkpoint import rng_state, set_rng_state
from metacore.errors import UserError
from metacore.methods import MethodBase

NAMES = ("lstm_optimizer",)
TASKS = ("quadratic", "omniglot_mlp")

_SHARED = dict(unroll=20, opt_steps=100, hidden=A.HIDDEN, preproc_p=A.PREPROC_P,
               out_scale=A.OUT_SCALE, outer_opt="adam", eval_tasks=32)
# Paper: Section 3 (20 units, 2 layers, p = 10, 0.1 output scale, unrolls of 20 over 100
# steps, Adam); batch of 128 functions and theta_0 stddev 0.01 are the defaults of the authors'
# code (deepmind/learning-to-learn); iterations = its 10000 epochs x 5 unrolls.
DEFAULTS = {
    "quadratic": dict(_SHARED, dims=10, meta_batch=128, dtype="float32", outer_lr=1e-3,
                      iterations=50000, eval_every=500, log_every=100, ckpt_every=500),
    "omniglot_mlp": dict(_SHARED, n_way=10, train_per_class=15, mlp_hidden=20, pool=1,
                         meta_batch=1,
                         dtype="float32", outer_lr=1e-3, iterations=50000, eval_every=250,
                         log_every=10, ckpt_every=50, eval_tasks=4),
}
BASELINES = ("sgd", "momentum", "adagrad", "adam")
LR_GRID = tuple(float(10.0 ** e) for e in np.arange(-4.0, 1.01, 0.25))   # 1e-4 .. 10
EVAL_TASKS = {"quadratic": 100, "omniglot_mlp": 20}
TUNE_TASKS = {"quadratic": 32, "omniglot_mlp": 8}


def _posint(cfg, key):
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"make_config: {key} must be a positive int, got {v!r}")


def check_config(cfg):
    keys = ["unroll", "opt_steps", "hidden", "meta_batch", "eval_tasks"]
    keys += ["dims"] if cfg["task"] == "quadratic" else ["n_way", "train_per_class",
                                                          "mlp_hidden", "pool"]
    for key in keys:
        _posint(cfg, key)
    if cfg["opt_steps"] % cfg["unroll"]:
        raise UserError(f"make_config: opt_steps ({cfg['opt_steps']}) must be a multiple of "
                        f"unroll ({cfg['unroll']})")
    for key in ("preproc_p", "out_scale"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v <= 0:
            raise UserError(f"make_config: {key} must be a finite number > 0, got {v!r}")
        cfg[key] = float(v)
    if cfg["task"] == "omniglot_mlp":
        if cfg["train_per_class"] >= 20:
            raise UserError(f"make_config: train_per_class must be < 20 (Omniglot has 20 "
                            f"drawings per character), got {cfg['train_per_class']}")
        if 28 % cfg["pool"]:
            raise UserError(f"make_config: pool must divide the image size 28, "
                            f"got {cfg['pool']}")


def eval_options(cfg):
    """`metacore eval` options of the LSTM optimizer (held-out optimizees, steps)."""
    return ("tasks", "steps")


# ------------------------------------------------------------------------------ optimizees
class QuadraticSource:
    """Batches of the paper's random quadratics."""

    def __init__(self, cfg):
        self.dims, self.dtype = cfg["dims"], np.dtype(cfg["dtype"])

    def draw(self, rng, M, part="train"):
        """-> (problem with .loss_grad, theta_0 (M, n)); `part` does not matter here (every
        quadratic is a fresh draw; held-out sets use their own seeds)."""
        from metacore.tasks.quadratic import sample_quadratics
        return sample_quadratics(rng, M, self.dims, self.dtype)

    def to_buffers(self, prob):
        return {"W": prob.W, "y": prob.y}

    def from_buffers(self, b):
        from metacore.tasks.quadratic import Quadratics
        return Quadratics(b["W"].astype(self.dtype), b["y"].astype(self.dtype))


_IMAGES = {}


def _omniglot(dtype):
    if dtype not in _IMAGES:
        from metacore.data.omniglot import load_omniglot
        _IMAGES[dtype] = load_omniglot(version="ink28", dtype=dtype)
    return _IMAGES[dtype]


def pool_images(images, k):
    """Mean over k x k blocks: (C, D, 28, 28) -> (C, D, 28 / k, 28 / k) (k = 1: unchanged)."""
    if k == 1:
        return images
    C, D, h, w = images.shape
    return images.reshape(C, D, h // k, k, w // k, k).mean(axis=(3, 5))


def mlp_model(n_way=10, hidden=20, image=28):
    """(image^2)-20-10 MLP, ReLU, softmax cross-entropy (the optimizee of omniglot_mlp)."""
    from metacore.network import Flatten, Linear, Model, ReLU
    return Model("omniglot_mlp", [Flatten(), Linear(image * image, hidden), ReLU(),
                                  Linear(hidden, n_way)], in_shape=(image, image, 1),
                 loss="softmax_ce")


class MLPProblems:
    """M classification problems: x (M, K, 28, 28, 1), y (M, K) training images and labels,
    xt, yt the held-out ones; chars (M, n_way) the characters (class j = chars[:, j])."""

    def __init__(self, model, chars, images, n_train):
        self.model, self.chars = model, chars
        M, C = chars.shape
        lab = np.broadcast_to(np.arange(C)[:, None], (C, images.shape[1]))
        imgs = images[chars]                                           # (M, C, 20, 28, 28)
        tr, te = imgs[:, :, :n_train], imgs[:, :, n_train:]
        self.x = np.ascontiguousarray(tr.reshape(M, -1, *images.shape[2:], 1))
        self.xt = np.ascontiguousarray(te.reshape(M, -1, *images.shape[2:], 1))
        self.y = np.ascontiguousarray(np.tile(lab[:, :n_train].reshape(-1), (M, 1)))
        self.yt = np.ascontiguousarray(np.tile(lab[:, n_train:].reshape(-1), (M, 1)))

    def loss_grad(self, theta):
        return self.model.loss_and_grad(theta, self.x, self.y)

    def test_accuracy(self, theta):
        """theta: (M, n) -> accuracy on the held-out drawings (M,)."""
        out, _ = self.model.forward(theta, self.xt)                    # (M, K', C)
        return (out.argmax(axis=-1) == self.yt).mean(axis=1)


class MLPSource:
    """Optimizees of task omniglot_mlp (module docstring)."""

    def __init__(self, cfg):
        from metacore.data.omniglot import split_characters
        self.dtype = np.dtype(cfg["dtype"])
        self.data = _omniglot(self.dtype)
        self.images = pool_images(self.data.images, cfg["pool"])        # (C, D, h, h)
        self.n_way, self.n_train = cfg["n_way"], cfg["train_per_class"]
        self.model = mlp_model(cfg["n_way"], cfg["mlp_hidden"], self.images.shape[-1])
        self.pools = {part: split_characters(self.data, "maml", part)
                      for part in ("train", "val", "test")}

    def draw(self, rng, M, part="train"):
        """Draw order: characters (M, n_way) (distinct within a problem), then theta_0."""
        pool = self.pools[part]
        chars = np.stack([rng.choice(pool, self.n_way, replace=False) for _ in range(M)])
        theta0 = np.stack([self.model.init_params(rng, self.dtype) for _ in range(M)])
        return self._problem(chars), theta0

    def _problem(self, chars):
        return MLPProblems(self.model, chars, self.images, self.n_train)

    def to_buffers(self, prob):
        return {"chars": prob.chars}

    def from_buffers(self, b):
        return self._problem(b["chars"].astype(np.int64))


def make_source(cfg):
    return QuadraticSource(cfg) if cfg["task"] == "quadratic" else MLPSource(cfg)


# ------------------------------------------------------------------------------ the method
class Method(MethodBase):
    """See the module docstring. Buffers: 'theta' (M, n), 'state' (4, N, H) and the
    optimizees ('W', 'y' or 'chars') of the optimization in progress."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.layout = A.lstm_optimizer_layout(cfg["hidden"])
        self.source = make_source(cfg)
        self.n_unrolls = cfg["opt_steps"] // cfg["unroll"]
        self.segment = 0                    # which unroll of the optimization comes next
        self.prob = self.theta = self.hstate = None
        val_rng = np.random.default_rng([cfg["seed"], 1])
        self.val = self.source.draw(val_rng, cfg["eval_tasks"], "val")

    def _kw(self):
        return dict(p=self.cfg["preproc_p"], scale=self.cfg["out_scale"])

    def init_params(self, rng):
        return A.init_lstm_optimizer(rng, self.cfg["hidden"], self.dtype)

    def sample(self):
        """A fresh batch of optimizees at the start of an optimization, else the ones in
        progress: -> (problem, theta (M, n), hidden state (4, N, H))."""
        if self.segment == 0:
            prob, theta0 = self.source.draw(self.rng, self.cfg["meta_batch"])
            return prob, theta0, A.zero_state(theta0.size, self.cfg["hidden"], self.dtype)
        return self.prob, self.theta, self.hstate

    def gradient(self, params, batch):
        """One unroll: the meta-gradient of the summed losses, and the persisted optimizees
        moved on by `unroll` steps (restarted by the next sample() after the last unroll)."""
        prob, theta, hstate = batch
        L, dphi, r = A.meta_gradient(params, self.layout, theta, hstate, prob.loss_grad,
                                     self.cfg["unroll"], **self._kw())
        self.prob, self.theta, self.hstate = prob, r["theta"], r["state"]
        self.segment = (self.segment + 1) % self.n_unrolls
        return dphi, {"loss": L / self.cfg["unroll"],
                      "end_loss": float(r["losses"][-1].mean())}

    def evaluate_val(self, params):
        """The learned optimizer on the fixed validation optimizees for opt_steps steps:
        mean loss at the last step and mean over steps 1..opt_steps."""
        prob, theta0 = self.val
        losses, _ = A.run_learned(params, self.layout, theta0, prob.loss_grad,
                                  self.cfg["opt_steps"], **self._kw())
        return {"val_final_loss": float(losses[-1].mean()),
                "val_mean_loss": float(losses[1:].mean())}

    # ---------------------------------------------------------------- persistence
    def buffers(self):
        if self.prob is None:
            return {}
        b = {"theta": self.theta, "state": self.hstate}
        b.update(self.source.to_buffers(self.prob))
        return b

    def load_buffers(self, arrays):
        if not arrays:
            self.prob = self.theta = self.hstate = None
            return
        want = {"theta", "state"} | set(self.source.to_buffers(self.val[0]))
        if set(arrays) != want:
            raise ValueError(f"lstm_optimizer.load_buffers: expected buffers {sorted(want)}, "
                             f"got {sorted(arrays)}")
        self.theta = arrays["theta"].astype(self.dtype)
        self.hstate = arrays["state"].astype(self.dtype)
        self.prob = self.source.from_buffers(arrays)

    def state(self):
        return {"rng": rng_state(self.rng), "segment": self.segment}

    def load_state(self, s):
        set_rng_state(self.rng, s["rng"])
        self.segment = int(s["segment"])

    # ---------------------------------------------------------------- `metacore eval`
    def evaluate(self, params, opts):
        """Loss curves on held-out optimizees: the learned optimizer against SGD, momentum,
        AdaGrad and Adam, each with the rate of LR_GRID that gives the lowest mean loss at the
        last step on separate tuning optimizees. opts: tasks (held-out optimizees; default
        100 quadratics / 20 MLPs), steps (default opt_steps), seed (default 2017); plot: a PNG
        path (default <run>/eval_<task>_s<seed>.png when the run directory exists; skipped
        without matplotlib)."""
        from metacore.stats import mean_ci
        cfg = self.cfg
        task = cfg["task"]
        n = EVAL_TASKS[task] if opts.get("tasks") is None else opts["tasks"]
        steps = cfg["opt_steps"] if opts.get("steps") is None else opts["steps"]
        seed = 2017 if opts.get("seed") is None else opts["seed"]
        for key, v in (("tasks", n), ("steps", steps)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if key == "tasks" else 1):
                raise UserError(f"lstm_optimizer.evaluate: {key} must be an int >= "
                                f"{2 if key == 'tasks' else 1}, got {v!r}")
        test_prob, test0 = self.source.draw(np.random.default_rng([seed, 2]), n, "test")
        tune_prob, tune0 = self.source.draw(np.random.default_rng([seed, 3]),
                                            TUNE_TASKS[task], "val")
        curves, finals, lrs, thetas = {}, {}, {}, {}
        losses, thetas["lstm"] = A.run_learned(params, self.layout, test0,
                                               test_prob.loss_grad, steps, **self._kw())
        curves["lstm"], finals["lstm"] = losses, losses[-1]
        tuning = {}
        for name in BASELINES:
            lrs[name], tuning[name] = A.tune_lr(name, LR_GRID, tune0, tune_prob.loss_grad,
                                                steps)
            losses, thetas[name] = A.run_baseline(name, lrs[name], test0,
                                                  test_prob.loss_grad, steps)
            curves[name], finals[name] = losses, losses[-1]
        res = {"task": task, "tasks": n, "steps": steps, "seed": seed,
               "tune_tasks": TUNE_TASKS[task], "lr_grid": list(LR_GRID), "tuned_lr": lrs,
               "tuning_final_loss": {k: {str(lr): s for lr, s in v.items()}
                                     for k, v in tuning.items()},
               "rows": {}}
        for name in ("lstm",) + BASELINES:
            c = curves[name]
            m, ci = mean_ci(finals[name]) if np.isfinite(finals[name]).all() \
                else (float("inf"), float("inf"))
            row = {"final_mean": m, "final_ci95": ci,
                   "final_median": float(np.median(finals[name])),
                   "curve_mean": [float(v) for v in c.mean(axis=1)]}
            if hasattr(test_prob, "test_accuracy"):
                th = thetas[name]
                ok = np.isfinite(th).all()
                row["test_accuracy"] = float(test_prob.test_accuracy(th).mean()) if ok \
                    else float("nan")
            res["rows"][name] = row
        adam = res["rows"]["adam"]["final_mean"]
        res["lstm_over_adam"] = res["rows"]["lstm"]["final_mean"] / adam if adam > 0 \
            else float("nan")
        # paired over the same optimizees: Adam's final loss minus the LSTM's (> 0: LSTM
        # lower), and the fraction of optimizees on which the LSTM ends lower
        diff = finals["adam"] - finals["lstm"]
        m, ci = mean_ci(diff) if np.isfinite(diff).all() else (float("nan"), float("nan"))
        res["adam_minus_lstm"] = {"mean": m, "ci95": ci}
        res["lstm_beats_adam_frac"] = float((finals["lstm"] < finals["adam"]).mean())
        plot = opts.get("plot")
        if plot is None and os.path.isdir(cfg["out"]):
            plot = os.path.join(cfg["out"], f"eval_{task}_s{seed}.png")
        res["plot"] = loss_curve_plot(res, plot) if plot else None
        return res

    def format_result(self, r):
        lines = [f"lstm_optimizer on {r['task']}: {r['tasks']} held-out optimizees, "
                 f"{r['steps']} steps, seed {r['seed']}; baselines' rates tuned on "
                 f"{r['tune_tasks']} separate optimizees over {len(r['lr_grid'])} rates "
                 f"{r['lr_grid'][0]:g}..{r['lr_grid'][-1]:g}",
                 f"{'optimizer':<10} {'lr':>9} {'final loss (mean +- 95% CI)':>30} "
                 f"{'median':>10}" + (f" {'test acc':>9}" if "test_accuracy"
                                      in r["rows"]["lstm"] else "")]
        for name, row in r["rows"].items():
            lr = "learned" if name == "lstm" else f"{r['tuned_lr'][name]:.4g}"
            line = (f"{name:<10} {lr:>9} {row['final_mean']:>18.5g} +- {row['final_ci95']:<9.3g}"
                    f" {row['final_median']:>10.4g}")
            if "test_accuracy" in row:
                line += f" {row['test_accuracy']:>9.4f}"
            lines.append(line)
        d = r["adam_minus_lstm"]
        lines.append(f"LSTM / tuned Adam final mean loss: {r['lstm_over_adam']:.4g}; paired "
                     f"Adam - LSTM: {d['mean']:.4g} +- {d['ci95']:.3g}; LSTM lower on "
                     f"{100 * r['lstm_beats_adam_frac']:.0f}% of the optimizees")
        lines.append(f"plot: {r['plot'] or 'skipped'}")
        return "\n".join(lines)


def loss_curve_plot(res, path):
    """Mean loss against step, log scale, one line per optimizer -> path, or None without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6), dpi=90)
    for name, row in res["rows"].items():
        c = np.asarray(row["curve_mean"])
        label = "LSTM (learned)" if name == "lstm" else f"{name} (lr {res['tuned_lr'][name]:.3g})"
        ax.plot(np.arange(c.size), c, label=label, lw=2.0 if name == "lstm" else 1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean loss")
    ax.set_title(f"{res['task']}: {res['tasks']} held-out optimizees")
    ax.legend(fontsize=8)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
