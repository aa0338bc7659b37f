"""MANN (Santoro et al. 2016) through the trainer: Omniglot episodes of N = 5 classes x 10
instances (T = 50 steps) in random order, the label shown one step late
(metacore.algorithms.mann), a batch of B episodes per step.

Data, as the paper describes it (section 4.1) and where it differs:
  * images: the shipped "ink28" Omniglot (Lanczos-resized grayscale 28x28, ink = 1) is
    downscaled to 20 x 20 by area averaging (each output pixel the mean of the 1.4 x 1.4
    input pixels it covers, `area_matrix`), then flattened to D = 400. The paper
    downscaled the original 105 x 105 drawings to 20 x 20 directly; the shipped data is
    28 x 28, so this is a second resampling.
  * classes: MAML's split of the characters (1100 train / 100 val / 423 test; the paper
    used 1200 training and 423 test characters, and MAML's 1100 + 100 are those 1200), each
    (character, quarter turn) its own class (rotations as the paper's augmentation; the
    paper's translations are not applied). Training draws from the train characters,
    validation from val, `metacore eval` from test.
  * each episode: 5 distinct classes with random labels 0..4, 10 distinct drawings per
    class, the 50 (image, label) pairs shuffled.

Optimizer: RMSProp at 1e-4, as the paper states (metacore.optim.RMSProp: rho 0.9 and eps
1e-8 outside the sqrt, values the paper does not give; see that class). Runs before this
default used Adam at 1e-4 (their config says so, and resuming keeps it).

Memory (docs/RESULTS_MANN.md): write_rule="per_head" (default; head h writes at its own
h-th least-used slot, as tristandeleu/ntm-one-shot) or "shared" (the paper's one n-hot
least-used vector, read literally, which every head writes into); add_vector=False
(default: the key is written, as the paper's text) or True (a separate add vector
a_t = tanh(h_t W_a + b_a), as ntm-one-shot; host backends only). A run from before these
settings existed ran write_rule="shared", add_vector=False, and is read back so (LEGACY).

Accuracy by instance (the paper's Table 1): the accuracy of the prediction at the steps
that show a class for the 1st, 2nd, ..., 10th time, per episode, then the mean and 95%
confidence interval over episodes (metacore.stats.mean_ci).

Backend (`--set backend=NAME`): that of the LRUA step pair (metacore.kernels.lrua): 'auto'
(the host's fastest, numba), 'numba', 'reference', or on an NVIDIA GPU 'numba-cuda' or
'cupy', which keep the memory on the device for the whole episode while the LSTM controller
stays on the host. make_config refuses a device backend that cannot run here (no GPU, no
driver, the cuda extra missing), saying which.

Shape letters: T steps, B episodes, D = 400 features, N classes, P parameters.
"""
import numpy as np

from metacore.algorithms.mann import MANN, accuracy_by_instance
from metacore.errors import UserError
from metacore.methods import MethodBase
from metacore.stats import mean_ci

NAMES = ("mann",)
TASKS = ("omniglot",)
SIDE = 20                          # the paper's image side

# Santoro et al. 2016: LSTM controller of 200 units, 4 read heads, memory 128 x 40, 5-way
# episodes of 10 instances per class, batch 16, RMSProp 1e-4.
# iterations: the paper's Figure 2 runs to 100,000 episodes; here a step is a batch of 16.
DEFAULTS = {
    "omniglot": dict(n_way=5, instances=10, batch=16, hidden=200, heads=4, slots=128,
                     width=40, gamma=0.95, write_rule="per_head", add_vector=False,
                     outer_opt="rmsprop", outer_lr=1e-4,
                     iterations=100000 // 16, eval_every=100, eval_tasks=160, log_every=10,
                     ckpt_every=100, backend="auto"),
}

# Where each default comes from (`metacore train mann omniglot --show-config`).
_SANTORO = "Santoro et al. 2016"
SOURCES = {
    "omniglot": dict(
        n_way=_SANTORO + ", section 4.1: 5-way episodes", instances=_SANTORO +
        ", section 4.1: 10 instances of each class", batch=_SANTORO + ": batch of 16 episodes",
        hidden=_SANTORO + ": LSTM controller of 200 hidden units", heads=_SANTORO +
        ": 4 read heads", slots=_SANTORO + ": memory of 128 slots", width=_SANTORO +
        ": slots of width 40", outer_opt=_SANTORO + ": RMSProp (rho, eps not stated; "
        "metacore.optim.RMSProp's 0.9, 1e-8)", outer_lr=_SANTORO + ": learning rate 1e-4",
        write_rule="reimplementation, not the paper's text: tristandeleu/ntm-one-shot "
        "(argsort(w_u)[:, :n]: head h writes at the h-th least-used slot); the paper's "
        "equation reads as one shared n-hot vector, write_rule=shared",
        add_vector=_SANTORO + ", section 'Least Recently Used Access': its write equation "
        "adds w^w_t(i) k_t, the key (ntm-one-shot writes a separate tanh(W_a h_t + b_a): "
        "add_vector=true)"),
}

# Settings added after runs existed, with the value those runs used: a config without the key
# is read (eval, resume) with this value, not the new default.
LEGACY = {"write_rule": "shared", "add_vector": False}

_INT_KEYS = ("n_way", "instances", "batch", "hidden", "heads", "slots", "width", "eval_tasks")


def check_config(cfg):
    for key in _INT_KEYS:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"make_config: {key} must be a positive int, got {v!r}")
    if cfg["instances"] > 20:
        raise UserError(f"make_config: instances must be <= 20 (Omniglot has 20 drawings "
                        f"per character), got {cfg['instances']}")
    g = cfg["gamma"]
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= 1:
        raise UserError(f"make_config: gamma must be a number in [0, 1], got {g!r}")
    cfg["gamma"] = float(g)
    from metacore.kernels import lrua
    if cfg["write_rule"] not in lrua.WRITE_RULES:
        raise UserError(f"make_config: write_rule must be one of {lrua.WRITE_RULES}, got "
                        f"{cfg['write_rule']!r}")
    if not isinstance(cfg["add_vector"], bool):
        raise UserError(f"make_config: add_vector must be true or false, got "
                        f"{cfg['add_vector']!r}")
    name = cfg["backend"]
    if cfg["add_vector"] and lrua.is_device_backend(name):
        raise UserError(f"make_config: backend {name!r} does not support add_vector=true "
                        f"(the separate add vector runs on the host backends 'numba' and "
                        f"'reference' only)")
    if name != "auto" and name not in lrua.backend_names():
        raise UserError(f"make_config: backend must be 'auto' or one of "
                         f"{lrua.backend_names()}, got {name!r}")
    if lrua.is_device_backend(name):
        # fail now, with the reason, rather than at the first step of training
        try:
            lrua.require_backend("make_config", name)
        except ImportError as err:
            raise UserError(str(err)) from err       # "make_config: backend ... cannot run"


def area_matrix(n_in, n_out):
    """A: (n_out, n_in), row o averaging the input cells [o s, (o + 1) s), s = n_in / n_out,
    each weighted by its overlap; rows sum to 1. An image resizes as A img A^T."""
    s = n_in / n_out
    A = np.zeros((n_out, n_in))
    for o in range(n_out):
        lo, hi = o * s, (o + 1) * s
        for i in range(int(np.floor(lo)), min(int(np.ceil(hi)), n_in)):
            A[o, i] = (min(hi, i + 1) - max(lo, i)) / s
    return A


_IMAGES = {}


def omniglot20(dtype):
    """(data, images (C, 20, 20, 20)): every drawing area-resized to 20 x 20, once per
    process and dtype."""
    if dtype not in _IMAGES:
        from metacore.data.omniglot import load_omniglot
        data = load_omniglot(version="ink28", dtype=np.float64)
        A = area_matrix(data.images.shape[-1], SIDE)                   # (20, 28)
        img = (A @ data.images @ A.T).astype(dtype)                    # (C, D, 20, 20)
        img.flags.writeable = False
        _IMAGES[dtype] = (data, img)
    return _IMAGES[dtype]


def eval_options(cfg):
    """`metacore eval` options of MANN: its episodes are fixed by training."""
    return ("tasks",)


class EpisodeSource:
    """Episodes of `n_way` classes x `instances` drawings from one part of MAML's split, in
    shuffled order; draws only from its sampler's rng (checkpointed by the method)."""

    def __init__(self, cfg, part, seed):
        from metacore.data.omniglot import EpisodeSampler, split_characters
        data, images = omniglot20(np.dtype(cfg["dtype"]))
        self.sampler = EpisodeSampler(images, split_characters(data, "maml", part),
                                      cfg["n_way"], cfg["instances"], 0, rotate=True,
                                      seed=seed, dtype=cfg["dtype"])

    def sample(self, B):
        """-> x (T, B, D) time-major flattened images, y (T, B) int64 labels."""
        ep = self.sampler.sample(B)
        x = ep.support_x.reshape(B, -1, SIDE * SIDE)                   # (B, T, D)
        T = x.shape[1]
        order = self.sampler.rng.permuted(np.tile(np.arange(T), (B, 1)), axis=1)  # (B, T)
        x = np.take_along_axis(x, order[..., None], axis=1)
        y = np.take_along_axis(ep.support_y, order, axis=1)            # (B, T)
        return np.ascontiguousarray(x.transpose(1, 0, 2)), np.ascontiguousarray(y.T)


def build_model(cfg):
    return MANN(d_in=SIDE * SIDE, n_way=cfg["n_way"], hidden=cfg["hidden"],
                heads=cfg["heads"], slots=cfg["slots"], width=cfg["width"],
                gamma=cfg["gamma"], write_rule=cfg.get("write_rule", LEGACY["write_rule"]),
                add_vector=cfg.get("add_vector", LEGACY["add_vector"]))


def score(model, params, source, n_episodes, batch, backend):
    """Forward passes only -> (loss per batch (list), accuracy (n_episodes, instances))."""
    losses, accs = [], []
    done = 0
    while done < n_episodes:
        b = min(batch, n_episodes - done)
        x, y = source.sample(b)
        logits, _ = model.forward(params, x, y, backend)
        loss, prob = model.loss(logits, y)
        losses.append(loss)
        accs.append(accuracy_by_instance(prob.argmax(-1) == y, y, source.sampler.k_shot))
        done += b
    return losses, np.concatenate(accs)


class Method(MethodBase):
    """One batch of `batch` episodes per step; validation episodes are fixed (seed + 1)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = build_model(cfg)
        self.source = EpisodeSource(cfg, "train", cfg["seed"])

    def init_params(self, rng):
        return self.model.init_params(rng, self.dtype)

    def sample(self):
        return self.source.sample(self.cfg["batch"])

    def gradient(self, params, batch):
        x, y = batch
        loss, correct, grad = self.model.loss_grad(params, x, y, self.cfg["backend"])
        acc = accuracy_by_instance(correct, y, self.cfg["instances"])
        rec = {"loss": loss, "acc": float(correct.mean())}
        for i in (1, 2, 5, 10):
            if i <= self.cfg["instances"]:
                rec[f"acc_{i}"] = float(np.nanmean(acc[:, i - 1]))
        return grad, rec

    def evaluate_val(self, params):
        """Mean loss and accuracy by instance on eval_tasks validation episodes, the same
        episodes at every evaluation (a fresh sampler with seed + 1)."""
        src = EpisodeSource(self.cfg, "val", self.cfg["seed"] + 1)
        losses, acc = score(self.model, params, src, self.cfg["eval_tasks"],
                            self.cfg["batch"], self.cfg["backend"])
        rec = {"val_loss": float(np.mean(losses))}
        for i in (1, 2, 5, 10):
            if i <= self.cfg["instances"]:
                rec[f"val_acc_{i}"] = float(np.nanmean(acc[:, i - 1]))
        return rec

    def state(self):
        from metacore.checkpoint import rng_state
        return {"source_rng": rng_state(self.source.sampler.rng)}

    def load_state(self, s):
        from metacore.checkpoint import set_rng_state
        set_rng_state(self.source.sampler.rng, s["source_rng"])

    def evaluate(self, params, opts):
        """`metacore eval RUN [--tasks E] [--seed S]`: accuracy by instance on E test
        episodes (default 1000) of the test characters, mean and 95% CI over episodes.
        MANN has no adaptation steps: opts["steps"] is ignored (the CLI refuses --steps)."""
        for key in ("shots", "way", "bn", "inner_lr"):
            if opts.get(key) is not None:
                raise UserError(f"metacore eval: --{key.replace('_', '-')} does not apply to "
                                f"MANN (its episodes are {self.cfg['n_way']}-way x "
                                f"{self.cfg['instances']} instances, fixed by training)")
        n = 1000 if opts.get("tasks") is None else opts["tasks"]
        seed = 12345 if opts.get("seed") is None else int(opts["seed"])
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise UserError(f"mann eval: tasks must be an int >= 2 for a confidence "
                            f"interval, got {n!r}")
        src = EpisodeSource(self.cfg, "test", seed)
        losses, acc = score(self.model, params, src, n, self.cfg["batch"],
                            self.cfg["backend"])
        out = {"episodes": n, "seed": seed, "split": "maml test characters x 4 rotations",
               "loss": float(np.mean(losses)), "accuracy_by_instance": {}}
        for i in range(1, acc.shape[1] + 1):
            m, ci = mean_ci(acc[:, i - 1])
            out["accuracy_by_instance"][str(i)] = {"mean": m, "ci95": ci}
        return out

    def json_result(self, result):
        """The result with the issue's list fields: accuracy_by_instance and
        ci95_by_instance, in percent, instance 1 first (the dict form stays as by_instance)."""
        by = result["accuracy_by_instance"]
        keys = sorted(by, key=int)
        out = {k: v for k, v in result.items() if k != "accuracy_by_instance"}
        out.update(tasks=result["episodes"], way=self.cfg["n_way"], by_instance=by,
                   accuracy_by_instance=[100 * by[k]["mean"] for k in keys],
                   ci95_by_instance=[100 * by[k]["ci95"] for k in keys])
        return out

    def format_result(self, result):
        lines = [f"MANN on {result['episodes']} test episodes ({result['split']}, seed "
                 f"{result['seed']}), loss {result['loss']:.4f}; accuracy by instance:"]
        for i, r in result["accuracy_by_instance"].items():
            lines.append(f"  instance {i:>2}: {100 * r['mean']:6.2f} +- {100 * r['ci95']:.2f} %")
        return "\n".join(lines)
