"""The generic training loop behind `metacore train NAME`: progress bar on stderr, periodic
evaluation, JSONL metrics, atomic checkpoints, and exact resume, for every method of
metacore.methods (see its docstring for the protocol a method implements).

Run directory (config["out"]):
    config.json       the full configuration (written once)
    metrics.jsonl     one JSON object a line: {"kind": "train", "step", <method metrics>} every
                      log_every steps (means over the interval) and {"kind": "eval", ...} every
                      eval_every steps; "elapsed_s" is the training wall time summed over resumes
    checkpoint.npz    the latest checkpoint (metacore.checkpoint: atomic, SHA-256 checked)

Exact resume: the checkpoint holds the parameter vector, the optimizer's state, the method's
buffers (e.g. batch-norm running statistics) and JSON state (its RNG states), the step and the
running log accumulators. Resuming truncates metrics.jsonl to the checkpoint's step, so a run
killed at any moment (SIGKILL included) and resumed produces the same parameters, bit for bit,
and the same metrics as one never stopped.

Outer learning rate: outer_lr, halved every lr_halve_every steps when that is > 0 (a function of
the step alone, so it needs no state of its own).
"""
import json
import math
import os
import sys
import time

import numpy as np

from metacore import methods
from metacore.checkpoint import load_checkpoint, save_checkpoint
from metacore.nonfinite import all_finite, likely_cause
from metacore.optim import make_optimizer

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam")


def make_config(algorithm, task, out, **overrides):
    """The full run configuration: COMMON, then the method's paper defaults for the task, then
    the non-None overrides; every value checked."""
    mod = methods.get(algorithm)
    if task not in mod.TASKS:
        raise ValueError(f"make_config: task must be one of {mod.TASKS} for {algorithm}, "
                         f"got {task!r}")
    cfg = dict(algorithm=algorithm, task=task, out=os.fspath(out))
    cfg.update(methods.COMMON)
    cfg.update(mod.DEFAULTS[task])
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ValueError(f"make_config: unknown settings {sorted(unknown)} for {algorithm} "
                         f"(known: {sorted(set(cfg) - {'algorithm', 'task', 'out'})})")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("iterations", "log_every", "ckpt_every", "eval_every", "lr_halve_every"):
        v = cfg[key]
        lo = 0 if key in ("iterations", "lr_halve_every") else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"make_config: {key} must be a positive int, got {v!r}")
    v = cfg["outer_lr"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"make_config: outer_lr must be a finite number >= 0, got {v!r}")
    cfg["outer_lr"] = float(v)
    if cfg["outer_opt"] not in OPTIMIZERS:
        raise ValueError(f"make_config: outer_opt must be one of {OPTIMIZERS}, "
                         f"got {cfg['outer_opt']!r}")
    if cfg["dtype"] not in ("float32", "float64"):
        raise ValueError(f"make_config: dtype must be 'float32' or 'float64', got {cfg['dtype']!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise ValueError(f"make_config: seed must be an int >= 0, got {cfg['seed']!r}")
    if hasattr(mod, "check_config"):
        mod.check_config(cfg)
    return cfg


def build_method(cfg):
    return methods.get(cfg["algorithm"]).Method(cfg)


class Trainer:
    """Builds (or resumes) a run from a config and trains it; see the module docstring."""

    def __init__(self, cfg, resume=False, progress=True, comm=None):
        from metacore.distributed import SingleProcess, check_same_start
        self.comm = comm or SingleProcess()
        self.lead = self.comm.rank == 0                  # writes metrics and checkpoints
        self.cfg, self.progress = cfg, progress and self.lead
        self.out = cfg["out"]
        self.ckpt_path = os.path.join(self.out, "checkpoint.npz")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        self.dtype = np.dtype(cfg["dtype"])
        self.method = build_method(cfg)
        self.params = self.method.init_params(self.method.rng)
        if self.params.ndim != 1 or self.params.dtype != self.dtype:
            raise TypeError(f"train: {cfg['algorithm']}.init_params returned "
                            f"{self.params.shape} {self.params.dtype}, expected (P,) {self.dtype}")
        self.opt = make_optimizer(cfg["outer_opt"], self.params.size, self.dtype,
                                  lr=cfg["outer_lr"])
        self.step, self.elapsed = 0, 0.0
        self.ckpt_step = None                            # step of the checkpoint on disk
        self.acc = {"n": 0}
        exists = os.path.exists(self.ckpt_path)
        if exists and not resume:
            raise FileExistsError(f"train: {self.ckpt_path} exists; pass --resume to continue "
                                  f"it or choose another --out")
        if self.lead:
            os.makedirs(self.out, exist_ok=True)
        if exists:
            self._load()
        elif self.lead:
            self._write_config()
            open(self.metrics_path, "w").close()
        self.comm.barrier()
        check_same_start(self.comm, self.step, self.params)

    @property
    def model(self):
        return getattr(self.method, "model", None)

    # ------------------------------------------------------------------ persistence
    def _write_config(self):
        tmp = os.path.join(self.out, ".config.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.cfg, f, indent=1, sort_keys=True)
        os.replace(tmp, os.path.join(self.out, "config.json"))

    def save(self):
        if not self.lead:
            return
        opt_state = self.opt.state_dict()
        arrays = {"params": self.params}
        arrays.update({f"opt.{k}": v for k, v in opt_state.items() if isinstance(v, np.ndarray)})
        arrays.update({f"buf.{k}": v for k, v in self.method.buffers().items()})
        meta = {"config": self.cfg, "step": self.step, "elapsed_s": self.elapsed,
                "method_state": self.method.state(), "log_acc": self.acc,
                "opt": {k: v for k, v in opt_state.items() if not isinstance(v, np.ndarray)}}
        save_checkpoint(self.ckpt_path, arrays, meta)
        self.ckpt_step = self.step

    def _load(self):
        arrays, meta = load_checkpoint(self.ckpt_path)
        old = dict(meta["config"])
        mine = dict(self.cfg)
        old.pop("iterations"), mine.pop("iterations")          # a run may be extended
        # a setting added to the method after this checkpoint was written, at its default
        # (which must reproduce the old behaviour), is no difference
        defaults = methods.get(self.cfg["algorithm"]).DEFAULTS[self.cfg["task"]]
        for k in set(mine) - set(old):
            if k in defaults and mine[k] == defaults[k]:
                old[k] = mine[k]
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
        self.method.load_buffers({k[4:]: v for k, v in arrays.items() if k.startswith("buf.")})
        self.method.load_state(meta["method_state"])
        self.step, self.elapsed, self.acc = meta["step"], meta["elapsed_s"], meta["log_acc"]
        self.ckpt_step = self.step
        if self.lead:
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
        if not self.lead:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")

    def evaluate_val(self):
        return self.method.evaluate_val(self.params)

    def _gradient(self, batch):
        """The method's mean gradient over the meta-batch; with R > 1 ranks each computes the
        mean over its block of tasks, and one Allreduce of w_r * g_r (w_r = T_r / T) sums
        them; a second, small one sums the metrics and buffers (metacore.distributed)."""
        if self.comm.size == 1:
            return self.method.gradient(self.params, batch)
        from metacore.distributed import task_blocks
        T = self.method.batch_size(batch)
        b = task_blocks(T, self.comm.size)
        lo, hi = b[self.comm.rank], b[self.comm.rank + 1]
        grad, metrics = self.method.gradient(self.params, self.method.shard(batch, lo, hi))
        w = (hi - lo) / T
        grad = self.comm.allreduce_sum(grad * grad.dtype.type(w))
        # the metrics and the buffers (BN running statistics) ride in one small float64
        # Allreduce: each rank moved its buffers toward its block's mean statistics, an
        # affine update, so the w_r-weighted sum is the single-process update
        keys = sorted(metrics)
        bufs = self.method.buffers()
        names = sorted(bufs)
        flat = [np.array([metrics[k] for k in keys], np.float64)]
        flat += [np.asarray(bufs[k], np.float64).ravel() for k in names]
        vals = self.comm.allreduce_sum(np.concatenate(flat) * w)
        if names:
            ends = np.cumsum([len(keys)] + [bufs[k].size for k in names])
            self.method.load_buffers({k: vals[a:b].reshape(bufs[k].shape)
                                      for k, a, b in zip(names, ends[:-1], ends[1:])})
        return grad, dict(zip(keys, vals[:len(keys)].tolist()))

    def _stop_nonfinite(self, cause):
        """Stop before the update of step self.step + 1: the parameters and the checkpoint
        on disk stay those of the last good step (a 'stopped' metrics line says where)."""
        bad = self.step + 1
        if self.ckpt_step is None:
            kept = "no checkpoint was written yet"
        else:
            kept = (f"the last good checkpoint, {self.ckpt_path} at step {self.ckpt_step}, is "
                    f"kept unchanged (continue with --resume, e.g. with --dtype float64 or "
                    f"smaller rates)")
        self._log({"kind": "stopped", "step": bad, "elapsed_s": self.elapsed,
                   "reason": "non-finite meta-gradient"})
        raise FloatingPointError(f"train: non-finite meta-gradient at step {bad} "
                                 f"({self.cfg['algorithm']}, {self.cfg['dtype']}); stopped "
                                 f"before applying it, {kept}. Cause: {cause}")

    def _learning_rate(self):
        h = self.cfg["lr_halve_every"]
        return self.cfg["outer_lr"] * (0.5 ** (self.step // h) if h else 1.0)

    # ------------------------------------------------------------------ the loop
    def train(self):
        cfg, total = self.cfg, self.cfg["iterations"]
        bar = _Progress(total, self.step) if self.progress else None
        t_last = time.perf_counter()
        while self.step < total:
            batch = self.method.sample()
            try:
                grad, metrics = self._gradient(batch)
            except FloatingPointError as err:         # an op's non-finite check (policy raise)
                self._stop_nonfinite(str(err))
            if not all_finite(grad):                  # policy warn, or a method's own sum
                self._stop_nonfinite(f"{np.size(grad) - np.count_nonzero(np.isfinite(grad))} "
                                     f"of {np.size(grad)} entries are NaN or Inf "
                                     f"({grad.dtype}); likely cause: "
                                     f"{likely_cause(grad.dtype, 'outer or inner rate')}")
            self.opt.lr = self._learning_rate()
            self.opt.step(self.params, grad, check=False)   # shapes fixed by construction
            self.step += 1
            self.acc["n"] += 1
            for k, v in metrics.items():
                self.acc[k] = self.acc.get(k, 0.0) + float(v)
            now = time.perf_counter()
            self.elapsed += now - t_last
            t_last = now
            if self.step % cfg["log_every"] == 0 or self.step == total:
                n = self.acc.pop("n")
                rec = {"kind": "train", "step": self.step, "elapsed_s": self.elapsed}
                rec.update({k: v / n for k, v in self.acc.items()})
                self._log(rec)
                self.acc = {"n": 0}
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
                shown = metrics.get("loss", next(iter(metrics.values()), float("nan")))
                bar.update(self.step, float(shown))
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
    """-> (config, method, params, meta) from a run directory's latest checkpoint, with the
    method's buffers restored."""
    arrays, meta = load_checkpoint(os.path.join(run_dir, "checkpoint.npz"))
    cfg = meta["config"]
    method = build_method(cfg)
    method.load_buffers({k[4:]: v for k, v in arrays.items() if k.startswith("buf.")})
    return cfg, method, arrays["params"], meta
