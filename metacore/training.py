"""Meta-training loop: progress bar on stderr, periodic evaluation, JSONL metrics, atomic
checkpoints, and exact resume.

Shape letters: T tasks per meta-batch, N points (images) per task, P parameters.

Algorithms (config["algorithm"]):
    maml      exact second-order MAML, scalar inner rate            (metacore.algorithms.maml)
    fomaml    first-order MAML
    metasgd   second-order MAML with a learned (P,) inner rate; the optimizer sees one flat
              vector [theta, alpha] of 2P entries
    reptile   outer "gradient" d = mean_t (theta - theta_k^t)          (..algorithms.reptile)
    pretrain  the baseline of Finn et al. 2017, Section 5.1: one network trained on the mean
              loss over all tasks' points, no inner loop

Run directory (config["out"]):
    config.json       the full configuration (written once)
    metrics.jsonl     one JSON object a line: {"kind": "train", "step", "query_loss", ...} every
                      log_every steps (means over the interval) and {"kind": "eval", ...} every
                      eval_every steps; "elapsed_s" is the training wall time summed over resumes
    checkpoint.npz    the latest checkpoint (metacore.checkpoint: atomic, SHA-256 checked)

Exact resume: the checkpoint holds the parameter vector, the optimizer's state, the step,
the task generator's RNG state and the running log accumulators. Resuming truncates
metrics.jsonl to the checkpoint's step, so a run killed at any moment (SIGKILL included) and
resumed produces the same parameters, bit for bit, and the same metrics as one never stopped.
"""
import json
import math
import os
import sys
import time

import numpy as np

from metacore.algorithms.maml import _loss, _loss_grad, _maml_gradient
from metacore.algorithms.reptile import _reptile
from metacore.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from metacore.optim import make_optimizer
from metacore.params import tile_tasks

ALGORITHMS = ("maml", "fomaml", "metasgd", "reptile", "pretrain")
TASKS = ("sinusoid", "omniglot")

# Paper settings: Finn et al. 2017 (sinusoid: Section 5.1; Omniglot: Section 5.2 and the
# authors' code: 5-way 1-shot, meta-batch 32, alpha 0.4, 1 inner step in training, 3 at test).
DEFAULTS = {
    "sinusoid": dict(shots=10, meta_batch=25, inner_lr=0.01, inner_steps=1, test_steps=1,
                     outer_opt="adam", outer_lr=1e-3, iterations=70000, eval_every=1000,
                     eval_tasks=100, n_way=1, queries=None),
    "omniglot": dict(shots=1, meta_batch=32, inner_lr=0.4, inner_steps=1, test_steps=3,
                     outer_opt="adam", outer_lr=1e-3, iterations=60000, eval_every=500,
                     eval_tasks=64, n_way=5, queries=None),
}
COMMON = dict(seed=0, dtype="float32", log_every=100, ckpt_every=1000)


def make_config(algorithm, task, out, **overrides):
    """The full run configuration: the task's paper defaults, then the non-None overrides."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"make_config: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if task not in TASKS:
        raise ValueError(f"make_config: task must be one of {TASKS}, got {task!r}")
    cfg = dict(algorithm=algorithm, task=task, out=os.fspath(out))
    cfg.update(DEFAULTS[task])
    cfg.update(COMMON)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"make_config: unknown settings {sorted(unknown)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    if cfg["queries"] is None:
        cfg["queries"] = cfg["shots"]            # K query points (per class) as in MAML's code
    for key in ("shots", "meta_batch", "inner_steps", "test_steps", "iterations", "eval_every",
                "eval_tasks", "n_way", "queries", "log_every", "ckpt_every"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "iterations" else 1):
            raise ValueError(f"make_config: {key} must be a positive int, got {v!r}")
    for key in ("inner_lr", "outer_lr"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"make_config: {key} must be a finite number >= 0, got {v!r}")
        cfg[key] = float(v)
    if cfg["dtype"] not in ("float32", "float64"):
        raise ValueError(f"make_config: dtype must be 'float32' or 'float64', got {cfg['dtype']!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ValueError(f"make_config: seed must be an int >= 0, got {cfg['seed']!r}")
    return cfg


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


_OMNIGLOT = {}


def omniglot_images(dtype):
    """MAML's version of Omniglot, loaded once per process."""
    if dtype not in _OMNIGLOT:
        from metacore.data.omniglot import load_omniglot
        _OMNIGLOT[dtype] = load_omniglot(version="maml", dtype=dtype)
    return _OMNIGLOT[dtype]


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
    """(query_loss (T,), support_loss (T,), grad like params) for one meta-batch.
    params: (P,) or, for metasgd, (2P,) = [theta, alpha]."""
    sx, sy, qx, qy = batch
    algo, k, P = cfg["algorithm"], cfg["inner_steps"], model.num_params
    if algo in ("maml", "fomaml"):
        r = _maml_gradient(model, params, [sx] * k, [sy] * k, qx, qy, cfg["inner_lr"],
                           first_order=algo == "fomaml")
        return r.query_loss, r.support_loss, r.grad
    if algo == "metasgd":
        r = _maml_gradient(model, params[:P], [sx] * k, [sy] * k, qx, qy, params[P:],
                           first_order=False)
        return r.query_loss, r.support_loss, np.concatenate([r.grad, r.alpha_grad])
    if algo == "reptile":
        loss0, d = _reptile(model, params, [sx] * k, [sy] * k, cfg["inner_lr"], sx.shape[0])
        return _loss(model, tile_tasks(params, sx.shape[0]), qx, qy), loss0, d
    # pretrain: one model on all points of every task
    x, y = np.concatenate([sx, qx], axis=1), np.concatenate([sy, qy], axis=1)
    loss, g = _loss_grad(model, tile_tasks(params, x.shape[0]), x, y)
    return loss, loss, g.mean(axis=0)


def split_params(cfg, model, params):
    """-> (theta (P,), inner rate: float or (P,) for metasgd)."""
    if cfg["algorithm"] == "metasgd":
        return params[:model.num_params], params[model.num_params:]
    return params, cfg["inner_lr"]


# ------------------------------------------------------------------------------ trainer
class Trainer:
    """Builds (or resumes) a run from a config and trains it; see the module docstring."""

    def __init__(self, cfg, resume=False, progress=True):
        self.cfg, self.progress = cfg, progress
        self.out = cfg["out"]
        self.ckpt_path = os.path.join(self.out, "checkpoint.npz")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.dtype = np.dtype(cfg["dtype"])
        self.model = build_model(cfg)
        rng = np.random.default_rng(cfg["seed"])
        theta = self.model.init_params(rng, self.dtype)
        if cfg["algorithm"] == "metasgd":
            theta = np.concatenate([theta, np.full_like(theta, cfg["inner_lr"])])
        self.params = theta
        self.opt = make_optimizer(cfg["outer_opt"], theta.size, self.dtype, lr=cfg["outer_lr"])
        if cfg["task"] == "sinusoid":
            self.source = SinusoidSource(cfg, rng)
            self.val_batch = self.source.sample(cfg["eval_tasks"],
                                                np.random.default_rng([cfg["seed"], 1]))
        else:
            self.source = OmniglotSource(cfg, "train")
            self.val_batch = OmniglotSource(cfg, "val", seed=cfg["seed"] + 1).sample(
                cfg["eval_tasks"])
        self.step, self.elapsed = 0, 0.0
        self.acc = {"n": 0, "query_loss": 0.0, "support_loss": 0.0}
        exists = os.path.exists(self.ckpt_path)
        if exists and not resume:
            raise FileExistsError(f"train: {self.ckpt_path} exists; pass --resume to continue "
                                  f"it or choose another --out")
        os.makedirs(self.out, exist_ok=True)
        if exists:
            self._load()
        else:
            self._write_config()
            open(self.metrics_path, "w").close()

    # ------------------------------------------------------------------ persistence
    def _write_config(self):
        tmp = os.path.join(self.out, ".config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.cfg, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.out, "config.json"))

    def save(self):
        opt_state = self.opt.state_dict()
        arrays = {"params": self.params}
        arrays.update({f"opt.{k}": v for k, v in opt_state.items() if isinstance(v, np.ndarray)})
        meta = {"config": self.cfg, "step": self.step, "elapsed_s": self.elapsed,
                "source_rng": self.source.state(), "log_acc": self.acc,
                "opt": {k: v for k, v in opt_state.items() if not isinstance(v, np.ndarray)}}
        save_checkpoint(self.ckpt_path, arrays, meta)

    def _load(self):
        arrays, meta = load_checkpoint(self.ckpt_path)
        old = dict(meta["config"])
        mine = dict(self.cfg)
        old.pop("iterations"), mine.pop("iterations")          # a run may be extended
        if old != mine:
            diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
            raise ValueError(f"train --resume: the settings {diff} differ from the checkpoint's "
                             f"({self.ckpt_path})")
        p = arrays["params"]
        if p.shape != self.params.shape or p.dtype != self.params.dtype:
            raise ValueError(f"train --resume: checkpoint params {p.shape} {p.dtype}, expected "
                             f"{self.params.shape} {self.params.dtype}")
        self.params = p
        state = dict(meta["opt"])
        state.update({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
        self.opt.load_state_dict(state)
        self.source.set_state(meta["source_rng"])
        self.step, self.elapsed, self.acc = meta["step"], meta["elapsed_s"], meta["log_acc"]
        self._truncate_metrics()

    def _truncate_metrics(self):
        """Drop metric lines written after the checkpoint (a run killed between the two)."""
        keep = []
        if os.path.exists(self.metrics_path):
            with open(self.metrics_path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        break                                  # a line cut by the kill
                    if rec["step"] > self.step:
                        break
                    keep.append(line)
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.metrics_path)

    def _log(self, rec):
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ evaluation
    def evaluate_val(self):
        """Mean post-update query loss (and accuracy) on the fixed validation tasks after
        test_steps inner steps."""
        from metacore.evaluation import adapt_and_score
        theta, alpha = split_params(self.cfg, self.model, self.params)
        scores = adapt_and_score(self.model, theta, alpha, self.val_batch,
                                 self.cfg["test_steps"], transductive=True)
        rec = {"val_loss": float(scores["loss"][-1].mean())}
        if "accuracy" in scores:
            rec["val_accuracy"] = float(scores["accuracy"][-1].mean())
        return rec

    # ------------------------------------------------------------------ the loop
    def train(self):
        cfg, total = self.cfg, self.cfg["iterations"]
        T = cfg["meta_batch"]
        bar = _Progress(total, self.step) if self.progress else None
        t_last = time.perf_counter()
        while self.step < total:
            batch = self.source.sample(T)
            qloss, sloss, grad = meta_step_gradient(cfg, self.model, self.params, batch)
            if not np.isfinite(grad).all():
                raise FloatingPointError(f"train: non-finite meta-gradient at step {self.step}")
            self.opt.step(self.params, grad, check=False)   # shapes fixed by construction
            self.step += 1
            self.acc["n"] += 1
            self.acc["query_loss"] += float(qloss.mean())
            self.acc["support_loss"] += float(sloss.mean())
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            if self.step % cfg["log_every"] == 0 or self.step == total:
                n = self.acc["n"]
                self._log({"kind": "train", "step": self.step, "elapsed_s": self.elapsed,
                           "query_loss": self.acc["query_loss"] / n,
                           "support_loss": self.acc["support_loss"] / n})
                self.acc = {"n": 0, "query_loss": 0.0, "support_loss": 0.0}
            if self.step % cfg["eval_every"] == 0 or self.step == total:
                rec = {"kind": "eval", "step": self.step, "elapsed_s": self.elapsed}
                rec.update(self.evaluate_val())
                self._log(rec)
                if bar:
                    bar.note = " ".join(f"{k} {v:.4g}" for k, v in rec.items()
                                        if k.startswith("val_"))
            if self.step % cfg["ckpt_every"] == 0 or self.step == total:
                self.save()
            t_last = time.perf_counter()                # evaluation and saving not counted
            if bar:
                bar.update(self.step, float(qloss.mean()))
        if bar:
            bar.close()
        return self.params


class _Progress:
    """A one-line progress bar on stderr, redrawn at most every 0.5 s."""

    def __init__(self, total, start):
        self.total, self.start, self.t0, self.last, self.note = total, start, time.time(), 0.0, ""

    def update(self, step, loss, force=False):
        now = time.time()
        if not force and now - self.last < 0.5 and step < self.total:
            return
        self.last = now
        frac = step / max(self.total, 1)
        rate = (step - self.start) / max(now - self.t0, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        sys.stderr.write(f"\r[{bar}] {step}/{self.total} loss {loss:.4g} {rate:.0f} it/s "
                         f"eta {eta:.0f}s {self.note}   ")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def read_config(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return json.load(f)


def load_run(run_dir):
    """-> (config, model, params) from a run directory's latest checkpoint."""
    arrays, meta = load_checkpoint(os.path.join(run_dir, "checkpoint.npz"))
    cfg = meta["config"]
    return cfg, build_model(cfg), arrays["params"], meta
