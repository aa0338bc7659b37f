"""The optimization-based family through the trainer: MAML, FOMAML, Meta-SGD, Reptile and the
pretrained baseline, on sinusoid regression and Omniglot (metacore.algorithms.maml, .reptile).

    maml      exact second-order MAML, scalar inner rate
    fomaml    first-order MAML
    metasgd   second-order MAML with a learned (P,) inner rate; the optimizer sees one flat
              vector [theta, alpha] of 2P entries
    reptile   outer "gradient" d = mean_t (theta - theta_k^t)
    pretrain  the baseline of Finn et al. 2017, Section 5.1: one network trained on the mean
              loss over all tasks' points, no inner loop

Shape letters: T tasks per meta-batch, N points (images) per task, P parameters.
"""
import math

import numpy as np

from metacore.algorithms.maml import _loss, _loss_grad, _maml_gradient, adapt_and_score
from metacore.algorithms.reptile import _reptile
from metacore.checkpoint import rng_state, set_rng_state
from metacore.errors import UserError
from metacore.methods import MethodBase
from metacore.params import tile_tasks

NAMES = ("maml", "fomaml", "metasgd", "reptile", "pretrain")
TASKS = ("sinusoid", "omniglot")

# Paper settings: Finn et al. 2017 (sinusoid: Section 5.1; Omniglot: Section 5.2 and the
# authors' code: 5-way 1-shot, meta-batch 32, alpha 0.4, 1 inner step in training, 3 at test).
# workers is not a paper setting: threads over the tasks of a meta-batch for maml, fomaml and
# metasgd (metacore.taskpool; --set workers=2 on two cores), the same result up to rounding.
DEFAULTS = {
    "sinusoid": dict(shots=10, meta_batch=25, inner_lr=0.01, inner_steps=1, test_steps=1,
                     outer_opt="adam", outer_lr=1e-3, iterations=70000, eval_every=1000,
                     eval_tasks=100, n_way=1, queries=None, workers=1),
    "omniglot": dict(shots=1, meta_batch=32, inner_lr=0.4, inner_steps=1, test_steps=3,
                     outer_opt="adam", outer_lr=1e-3, iterations=60000, eval_every=500,
                     eval_tasks=64, n_way=5, queries=None, workers=1),
}


# Where each Omniglot default comes from (`metacore train ... --show-config` prints these).
_FINN = "Finn et al. 2017, Section 5.2 and cbfinn/maml's Omniglot command"
SOURCES = {
    "omniglot": dict(shots=_FINN + ": --update_batch_size=1", meta_batch=_FINN +
                     ": --meta_batch_size=32", inner_lr=_FINN + ": --update_lr=0.4",
                     inner_steps=_FINN + ": --num_updates=1", test_steps="Finn et al. 2017, "
                     "Section 5.2: three gradient steps at test", outer_opt=_FINN + " (Adam)",
                     outer_lr=_FINN + " (meta_lr 0.001)", iterations=_FINN +
                     ": --metatrain_iterations=60000", n_way=_FINN + ": 5-way",
                     queries="cbfinn/maml data_generator: K query images per class"),
    "sinusoid": dict(shots="Finn et al. 2017, Section 5.1: K = 10", meta_batch="Finn et al. "
                     "2017, Section 5.1: 25 tasks", inner_lr="Finn et al. 2017, Section 5.1: "
                     "alpha = 0.01", inner_steps="Finn et al. 2017, Section 5.1: one step",
                     outer_opt="Finn et al. 2017, Section 5.1: Adam", iterations="Finn et al. "
                     "2017, Section 5.1: 70,000 iterations"),
}


def _nichol(algorithm, task):
    """Reptile on Omniglot follows Nichol et al. 2018 (methods/reptile_omniglot.py)."""
    return algorithm == "reptile" and task == "omniglot"


def defaults(algorithm, task):
    """The paper defaults of one method on one task."""
    if _nichol(algorithm, task):
        from metacore.methods import reptile_omniglot
        return dict(reptile_omniglot.DEFAULTS)
    return dict(DEFAULTS[task])


def sources(algorithm, task):
    """{setting: where its default comes from} for `--show-config`."""
    if _nichol(algorithm, task):
        from metacore.methods import reptile_omniglot
        return dict(reptile_omniglot.SOURCES)
    src = dict(SOURCES.get(task, {}))
    if algorithm == "metasgd":                   # Finn's settings; Li et al.'s not verified
        src = {k: v + " (Finn's MAML setting, used for Meta-SGD: Li et al. 2017's own "
               "schedule was not verified)" for k, v in src.items()}
        if "inner_lr" in src:
            src["inner_lr"] = ("metacore: the initial value of every learned inner rate, "
                               "Finn's alpha 0.4 (Li et al. 2017's initialisation was not "
                               "verified)")
    return src


def build_method(cfg):
    """The Method object for a run config."""
    if _nichol(cfg["algorithm"], cfg["task"]):
        from metacore.methods import reptile_omniglot
        return reptile_omniglot.Method(cfg)
    return Method(cfg)


# Settings of the family that an algorithm does not read (a warning when not at the default)
IGNORED = {"reptile": ("workers",), "pretrain": ("workers", "inner_steps")}


def ignored_settings(cfg):
    """Messages for the settings given to cfg's algorithm that it does not read."""
    algo = cfg["algorithm"]
    return [f"{key} does not apply to {algo} and is ignored"
            for key in IGNORED.get(algo, ()) if cfg[key] != DEFAULTS[cfg["task"]][key]]


def check_config(cfg):
    if _nichol(cfg["algorithm"], cfg["task"]):
        from metacore.methods import reptile_omniglot
        return reptile_omniglot.check_config(cfg)
    if cfg["queries"] is None:
        cfg["queries"] = cfg["shots"]            # K query points (per class) as in MAML's code
    for key in ("shots", "meta_batch", "inner_steps", "test_steps", "eval_tasks", "n_way",
                "queries", "workers"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"make_config: {key} must be a positive int, got {v!r}")
    v = cfg["inner_lr"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise UserError(f"make_config: inner_lr must be a finite number >= 0, got {v!r}")
    cfg["inner_lr"] = float(v)
    if cfg["task"] == "sinusoid" and cfg["n_way"] != 1:
        raise UserError(f"make_config: n_way does not apply to sinusoid regression (one "
                        f"output, no classes), got {cfg['n_way']}")
    if cfg["task"] == "omniglot":
        from metacore.data.omniglot import N_DRAWINGS, SPLIT_SIZES
        # training episodes come from the train characters, the validation tasks from val
        pool = 4 * SPLIT_SIZES["maml"]["val"]
        if cfg["n_way"] > pool:
            raise UserError(f"make_config: n_way = {cfg['n_way']} exceeds the {pool} classes "
                            f"of MAML's Omniglot validation characters "
                            f"({pool // 4} x 4 rotations)")
        if cfg["shots"] + cfg["queries"] > N_DRAWINGS:
            raise UserError(f"make_config: shots + queries = {cfg['shots'] + cfg['queries']} "
                            f"exceeds Omniglot's {N_DRAWINGS} drawings per character")


def eval_options(cfg):
    """The `metacore eval` options a run of this family takes (metacore/cli.py)."""
    if _nichol(cfg["algorithm"], cfg["task"]):    # Adam at test time: no SGD rate
        return ("tasks", "steps", "shots", "way", "bn")
    opts = ["tasks", "steps", "shots"]
    if cfg["algorithm"] != "metasgd":            # Meta-SGD's rates are learned
        opts.append("inner_lr")
    if cfg["task"] == "sinusoid":
        return tuple(opts + ["query_points", "plot_dir", "compare"])
    return tuple(opts + ["way", "bn"])           # way: only the run's n_way


def build_model(cfg):
    from metacore.models import conv4_maml, sinusoid_mlp
    if cfg["task"] == "sinusoid":
        return sinusoid_mlp()
    return conv4_maml(n_way=cfg["n_way"])


# ------------------------------------------------------------------------------ task sources
class SinusoidSource:
    """Meta-batches of sinusoid tasks: `shots` support and `queries` query points per task."""

    def __init__(self, cfg, rng):
        self.cfg, self.rng, self.dtype = cfg, rng, np.dtype(cfg["dtype"])

    def sample(self, T, rng=None):
        from metacore.tasks.sinusoid import sample_sinusoid
        tasks = sample_sinusoid(rng or self.rng, T, self.cfg["shots"] + self.cfg["queries"],
                                self.dtype)
        return tuple(np.ascontiguousarray(a) for a in tasks.split(self.cfg["shots"]))

    def state(self):
        return rng_state(self.rng)

    def set_state(self, s):
        set_rng_state(self.rng, s)


def omniglot_images(dtype):
    """MAML's version of Omniglot, loaded once per process (metacore.data.omniglot)."""
    from metacore.data.omniglot import load_omniglot_once
    return load_omniglot_once("maml", dtype)


class OmniglotSource:
    """N-way K-shot episodes from MAML's 1100/100/423 character split, with rotations."""

    def __init__(self, cfg, part="train", seed=None):
        from metacore.data.omniglot import EpisodeSampler, split_characters
        data = omniglot_images(np.dtype(cfg["dtype"]))
        self.sampler = EpisodeSampler(data.images, split_characters(data, "maml", part),
                                      cfg["n_way"], cfg["shots"], cfg["queries"], rotate=True,
                                      seed=cfg["seed"] if seed is None else seed,
                                      dtype=cfg["dtype"])

    def sample(self, T):
        ep = self.sampler.sample(T)
        return ep.support_x, ep.support_y, ep.query_x, ep.query_y

    def state(self):
        return rng_state(self.sampler.rng)

    def set_state(self, s):
        set_rng_state(self.sampler.rng, s)


# ------------------------------------------------------------------------------ one step
def meta_step_gradient(cfg, model, params, batch):
    """(query_loss (T,), support_loss (T,), grad like params, query_accuracy (T,) or None)
    for one meta-batch. params: (P,) or, for metasgd, (2P,) = [theta, alpha]."""
    sx, sy, qx, qy = batch
    algo, k, P = cfg["algorithm"], cfg["inner_steps"], model.num_params
    if algo in ("maml", "fomaml"):
        r = _maml_gradient(model, params, [sx] * k, [sy] * k, qx, qy, cfg["inner_lr"],
                           first_order=algo == "fomaml", workers=cfg["workers"])
        return r.query_loss, r.support_loss, r.grad, r.query_accuracy
    if algo == "metasgd":
        r = _maml_gradient(model, params[:P], [sx] * k, [sy] * k, qx, qy, params[P:],
                           first_order=False, workers=cfg["workers"])
        return (r.query_loss, r.support_loss, np.concatenate([r.grad, r.alpha_grad]),
                r.query_accuracy)
    if algo == "reptile":
        loss0, d = _reptile(model, params, [sx] * k, [sy] * k, cfg["inner_lr"], sx.shape[0])
        return _loss(model, tile_tasks(params, sx.shape[0]), qx, qy), loss0, d, None
    # pretrain: one model on all points of every task
    x, y = np.concatenate([sx, qx], axis=1), np.concatenate([sy, qy], axis=1)
    loss, g = _loss_grad(model, tile_tasks(params, x.shape[0]), x, y)
    return loss, loss, g.mean(axis=0), None


def split_params(cfg, model, params):
    """-> (theta (P,), inner rate: float or (P,) for metasgd)."""
    if cfg["algorithm"] == "metasgd":
        return params[:model.num_params], params[model.num_params:]
    return params, cfg["inner_lr"]


class Method(MethodBase):
    """One meta-batch of T tasks per step; the validation tasks are fixed at construction."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.model = build_model(cfg)
        if cfg["task"] == "sinusoid":
            self.source = SinusoidSource(cfg, self.rng)   # the init draws come first, as before
            self.val_batch = self.source.sample(cfg["eval_tasks"],
                                                np.random.default_rng([cfg["seed"], 1]))
        else:
            self.source = OmniglotSource(cfg, "train")
            self.val_batch = OmniglotSource(cfg, "val", seed=cfg["seed"] + 1).sample(
                cfg["eval_tasks"])

    def init_params(self, rng):
        theta = self.model.init_params(rng, self.dtype)
        if self.cfg["algorithm"] == "metasgd":
            theta = np.concatenate([theta, np.full_like(theta, self.cfg["inner_lr"])])
        return theta

    def sample(self):
        return self.source.sample(self.cfg["meta_batch"])

    def gradient(self, params, batch):
        qloss, sloss, grad, qacc = meta_step_gradient(self.cfg, self.model, params, batch)
        rec = {"query_loss": float(qloss.mean()), "support_loss": float(sloss.mean())}
        if qacc is not None:                     # post-update query accuracy, for the curves
            rec["train_accuracy"] = float(qacc.mean())
        return grad, rec

    def batch_size(self, batch):
        return batch[0].shape[0]

    def shard(self, batch, lo, hi):
        return tuple(a[lo:hi] for a in batch)

    def evaluate_val(self, params):
        """Mean post-update query loss (and accuracy) on the fixed validation tasks after
        test_steps inner steps."""
        theta, alpha = split_params(self.cfg, self.model, params)
        scores = adapt_and_score(self.model, theta, alpha, self.val_batch,
                                 self.cfg["test_steps"], transductive=True)
        rec = {"val_loss": float(scores["loss"][-1].mean())}
        if "accuracy" in scores:
            rec["val_accuracy"] = float(scores["accuracy"][-1].mean())
        return rec

    def state(self):
        return {"source_rng": self.source.state()}

    def load_state(self, s):
        self.source.set_state(s["source_rng"])
