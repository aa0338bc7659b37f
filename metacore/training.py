"""The generic training loop behind `metacore train NAME`: progress bar on stderr, periodic
evaluation, JSONL metrics, atomic checkpoints, and exact resume, for every method of
metacore.methods (see its docstring for the protocol a method implements).

Run directory (config["out"]):
    config.json       the full configuration (written once)
    metrics.jsonl     one JSON object a line: {"kind": "train", "step", <method metrics>} every
                      log_every steps (means over the interval) and {"kind": "eval", ...} every
                      eval_every steps; "elapsed_s" is the training wall time summed over resumes
    checkpoint.npz    the latest checkpoint (metacore.checkpoint: atomic, SHA-256 checked)
    run.lock          flock'ed by the training process (metacore.rundir): one process per run

A new run refuses a directory that holds any of config.json, metrics.jsonl, checkpoint.npz;
--resume refuses one without checkpoint.npz (with config.json or metrics.jsonl left by a run
that cannot be resumed, it touches neither). The directory's path is not a setting: a run
may be moved or copied and resumed from its new place.

Exact resume: the checkpoint holds the parameter vector, the optimizer's state, the method's
buffers (e.g. batch-norm running statistics) and JSON state (its RNG states), the step and the
running log accumulators. Resuming truncates metrics.jsonl to the checkpoint's step, so a run
killed at any moment (SIGKILL included) and resumed produces the same parameters, bit for bit,
and the same metrics as one never stopped.

Outer learning rate: outer_lr, halved every lr_halve_every steps when that is > 0, or annealed
linearly to outer_lr_final over the run when that is set (a function of the step alone, so it
needs no state of its own).
"""
import errno
import json
import math
import os
import sys
import time
import warnings

import numpy as np

from metacore import methods
from metacore.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from metacore.errors import IgnoredSettingWarning, RunDirError, RunExistsError, UserError
from metacore.nonfinite import all_finite, likely_cause
from metacore.optim import make_optimizer
from metacore.rundir import open_run_dir, run_files

OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam")


def make_config(algorithm, task, out, **overrides):
    """The full run configuration: COMMON, then the method's paper defaults for the task, then
    the non-None overrides; every value checked."""
    mod = methods.get(algorithm)
    if task not in mod.TASKS:
        raise UserError(f"make_config: task must be one of {mod.TASKS} for {algorithm}, "
                        f"got {task!r}")
    cfg = dict(algorithm=algorithm, task=task, out=os.fspath(out))
    cfg.update(methods.paper_defaults(algorithm, task))
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise UserError(f"make_config: unknown settings {sorted(unknown)} for {algorithm} "
                        f"(known: {sorted(set(cfg) - {'algorithm', 'task', 'out'})})")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("iterations", "log_every", "ckpt_every", "eval_every", "lr_halve_every"):
        v = cfg[key]
        lo = 0 if key in ("iterations", "lr_halve_every") else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise UserError(f"make_config: {key} must be a positive int, got {v!r}")
    v = cfg["outer_lr"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise UserError(f"make_config: outer_lr must be a finite number >= 0, got {v!r}")
    cfg["outer_lr"] = float(v)
    v = cfg["outer_lr_final"]
    if v is not None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"make_config: outer_lr_final must be None or a finite number "
                             f">= 0, got {v!r}")
        if cfg["lr_halve_every"]:
            raise ValueError("make_config: set lr_halve_every or outer_lr_final, not both")
        cfg["outer_lr_final"] = float(v)
    if cfg["outer_opt"] not in OPTIMIZERS:
        raise UserError(f"make_config: outer_opt must be one of {OPTIMIZERS}, "
                        f"got {cfg['outer_opt']!r}")
    if cfg["dtype"] not in ("float32", "float64"):
        raise UserError(f"make_config: dtype must be 'float32' or 'float64', got {cfg['dtype']!r}")
    if isinstance(cfg["seed"], bool) or not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise UserError(f"make_config: seed must be an int >= 0, got {cfg['seed']!r}")
    if hasattr(mod, "check_config"):
        mod.check_config(cfg)
    for message in getattr(mod, "ignored_settings", lambda c: [])(cfg):
        warnings.warn(f"make_config: {message}", IgnoredSettingWarning, stacklevel=2)
    return cfg


def build_method(cfg):
    return methods.build(cfg)


class Trainer:
    """Builds (or resumes) a run from a config and trains it; see the module docstring."""

    def __init__(self, cfg, resume=False, progress=True, comm=None):
        """resume: False (a new run; refused if the directory holds one), True (continue the
        run in cfg["out"]; refused if there is none) or "auto" (continue it if there is one,
        else start one). The lead process locks the run directory (metacore.rundir) until
        train() returns, close(), the end of a `with Trainer(...)` block, or its exit."""
        from metacore.distributed import SingleProcess
        if resume not in (False, True, "auto"):
            raise ValueError(f"train: resume must be False, True or 'auto', got {resume!r}")
        self.comm = comm or SingleProcess()
        self.lead = self.comm.rank == 0                  # writes metrics and checkpoints
        self.cfg, self.progress = cfg, progress and self.lead
        self.out = cfg["out"]
        self.ckpt_path = os.path.join(self.out, "checkpoint.npz")
        self.metrics_path = os.path.join(self.out, "metrics.jsonl")
        if resume is True and not (os.path.isdir(self.out) and run_files(self.out)):
            self._check_run_state(resume)          # nothing to resume: say so, create nothing
        self.lock = open_run_dir(self.out) if self.lead else None
        try:
            self._open(resume)
        except BaseException:
            self.close()
            raise

    def _open(self, resume):
        from metacore.distributed import check_same_start
        cfg = self.cfg
        exists = os.path.exists(self.ckpt_path)
        if self.lead:
            self._check_run_state(resume)
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
        self._ckpt_sig = None
        if exists:
            self._load()
            self._ckpt_sig = _file_sig(self.ckpt_path)
        elif self.lead:
            self._write_config()
            open(self.metrics_path, "w").close()
        self.comm.barrier()
        check_same_start(self.comm, self.step, self.params)

    def _check_run_state(self, resume):
        """Refuse, before anything is written, a start that would overwrite a run and a
        resume that has nothing to continue (under the lock: nothing changes meanwhile)."""
        present = run_files(self.out) if os.path.isdir(self.out) else []
        if "checkpoint.npz" in present:
            if not resume:
                raise RunExistsError(f"train: {self.ckpt_path} exists; pass --resume to "
                                     f"continue it or choose another --out")
            return
        if present:
            # config.json / metrics.jsonl without a checkpoint: a run killed before its first
            # checkpoint, or one whose checkpoint was removed. Starting over would overwrite
            # its history, so neither a new run nor --resume may touch it.
            raise RunDirError(
                f"train{' --resume' if resume else ''}: {self.out} holds {' and '.join(present)} "
                f"of a run but no checkpoint.npz to continue from; move them away (starting "
                f"over would overwrite them) or choose another --out")
        if resume is True:
            raise RunDirError(f"train --resume: no run to resume in {self.out} (no "
                              f"checkpoint.npz); leave out --resume to start one, or pass "
                              f"--resume-or-start")

    def close(self):
        """Release the run directory's lock (the lead process); idempotent."""
        if getattr(self, "lock", None) is not None:
            self.lock.release()

    def _hold(self):
        """Take the lock again after close() (a Trainer that trains more than once), refusing
        if another process changed the checkpoint meanwhile: this Trainer's state is then
        stale, and saving it would overwrite the other's steps."""
        if not self.lead or self.lock.held:
            return
        self.lock = open_run_dir(self.out)
        if _file_sig(self.ckpt_path) != self._ckpt_sig:
            self.close()
            raise RunDirError(f"train: {self.ckpt_path} changed since this Trainer last saved "
                              f"or loaded it (another process trained the run); build a new "
                              f"Trainer with resume=True")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

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
        self._hold()
        save_checkpoint(self.ckpt_path, arrays, meta)
        self._ckpt_sig = _file_sig(self.ckpt_path)
        self.ckpt_step = self.step

    def _load(self):
        arrays, meta = load_checkpoint(self.ckpt_path)
        try:
            old = dict(meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"train --resume: {self.ckpt_path} has no run configuration "
                                  f"({type(e).__name__}: {e})") from e
        mine = dict(self.cfg)
        # a run may be extended; and moved or copied: its directory is not one of its settings
        for k in ("iterations", "out"):
            old.pop(k, None), mine.pop(k, None)
        # a setting added to the method after this checkpoint was written, at its default
        # (which must reproduce the old behaviour), is no difference
        defaults = methods.paper_defaults(self.cfg["algorithm"], self.cfg["task"])
        legacy = methods.legacy_settings(self.cfg["algorithm"])
        for k in set(mine) - set(old):
            if k in legacy:                      # its default changed: the run had this
                old[k] = legacy[k]
            elif k in defaults and mine[k] == defaults[k]:
                old[k] = mine[k]
        if old != mine:
            diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
            what = ", ".join(f"{k} {mine.get(k)!r} (checkpoint: {old.get(k)!r})" for k in diff)
            raise UserError(f"train --resume: the settings {diff} differ from the checkpoint's "
                            f"({self.ckpt_path}): {what}; resume with the run's settings or "
                            f"start a new run in another --out")
        try:
            self._restore(arrays, meta)
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"train --resume: {self.ckpt_path} does not fit this run "
                                  f"({type(e).__name__}: {e})") from e
        if self.lead:
            self._truncate_metrics()
            try:
                saved_out = read_config(self.out).get("out")
            except UserError:                    # config.json lost: the checkpoint has it
                saved_out = None
            if saved_out != self.cfg["out"]:
                self._write_config()             # the run was moved or copied here

    def _restore(self, arrays, meta):
        p = arrays["params"]
        check_params(self.ckpt_path, p, self.params)
        self.params = p
        state = dict(meta["opt"])
        state.update({k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})
        self.opt.load_state_dict(state)
        self.method.load_buffers({k[4:]: v for k, v in arrays.items() if k.startswith("buf.")})
        self.method.load_state(meta["method_state"])
        self.step, self.elapsed, self.acc = meta["step"], meta["elapsed_s"], meta["log_acc"]
        self.ckpt_step = self.step

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
        """The outer rate of the step about to be taken (self.step of them done): halved every
        lr_halve_every steps, or linear from outer_lr to outer_lr_final over the run as
        Reptile's code anneals it (frac = step / iterations)."""
        lr, final = self.cfg["outer_lr"], self.cfg["outer_lr_final"]
        if final is not None:
            frac = self.step / self.cfg["iterations"]
            return frac * final + (1.0 - frac) * lr
        h = self.cfg["lr_halve_every"]
        return lr * (0.5 ** (self.step // h) if h else 1.0)

    # ------------------------------------------------------------------ the loop
    def train(self):
        """Train to cfg["iterations"] under the run directory's lock, released at the end (a
        later train() or save() takes it again)."""
        self._hold()
        bar = _Progress(self.cfg["iterations"], self.step) if self.progress else None
        try:
            self._loop(bar)
        finally:
            if bar:
                bar.close()                 # an error's message starts on a line of its own
            self.close()
        return self.params

    def _loop(self, bar):
        cfg, total = self.cfg, self.cfg["iterations"]
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


def _file_sig(path):
    """(inode, size, mtime) of a file, or None: tells whether another process replaced it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


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


def _check_run_dir(run_dir):
    """A run directory to read: refuse a missing one or a file, naming it."""
    run_dir = os.fspath(run_dir)
    if not os.path.exists(run_dir):
        raise FileNotFoundError(errno.ENOENT, "no such run directory", run_dir)
    if not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} is not a run directory (it is a file)")
    return run_dir


def read_config(run_dir):
    """The run's config.json as a dict (or a zoo entry's config, run_dir = "zoo:NAME"); a
    missing, unreadable or invalid file is refused with an error naming it."""
    from metacore import zoo
    if zoo.is_ref(run_dir):
        return zoo.read(run_dir)[1]["config"]
    path = os.path.join(_check_run_dir(run_dir), "config.json")
    if not os.path.exists(path):
        raise RunDirError(f"no run in {run_dir}: {path} does not exist")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{path} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or not isinstance(cfg.get("algorithm"), str) \
            or not isinstance(cfg.get("task"), str):
        raise RunDirError(f"{path} is not a run configuration (a JSON object with "
                          f"'algorithm' and 'task')")
    return cfg


def check_params(path, p, like):
    """A checkpoint's parameter vector must have the shape and dtype of a fresh one (`like`)
    and be finite; refused as a CheckpointError naming the file."""
    if not isinstance(p, np.ndarray) or p.shape != like.shape or p.dtype != like.dtype:
        raise CheckpointError(f"{path}: params {getattr(p, 'shape', None)} "
                              f"{getattr(p, 'dtype', type(p).__name__)}, expected {like.shape} "
                              f"{like.dtype} for this run's settings")
    bad = p.size - int(np.count_nonzero(np.isfinite(p)))
    if bad:
        raise CheckpointError(f"{path}: params hold {bad} non-finite value(s) (NaN or Inf)")


def load_run(run_dir):
    """-> (config, method, params, meta) from a run directory's latest checkpoint (or a zoo
    entry, run_dir = "zoo:NAME"), with the method's buffers restored. config["out"] is run_dir
    (the run may have been moved). A checkpoint that does not fit the run's method is refused
    naming the file."""
    from metacore import zoo
    if zoo.is_ref(run_dir):
        path = zoo.verified_path(zoo.name_of(run_dir))
    else:
        path = os.path.join(_check_run_dir(run_dir), "checkpoint.npz")
        if not os.path.exists(path):
            raise RunDirError(f"no checkpoint in {run_dir}: {path} does not exist (a run not "
                              f"yet at its first checkpoint, or not a run directory)")
    arrays, meta = load_checkpoint(path)
    try:
        cfg = dict(meta["config"], out=os.fspath(run_dir))
        for k, v in methods.legacy_settings(cfg["algorithm"]).items():
            cfg.setdefault(k, v)                 # a run from before the setting existed
        method = build_method(cfg)
        check_params(path, arrays["params"], method.init_params(np.random.default_rng(0)))
        method.load_buffers({k[4:]: v for k, v in arrays.items() if k.startswith("buf.")})
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise CheckpointError(f"{path} does not fit its run ({type(e).__name__}: {e})") from e
    return cfg, method, arrays["params"], meta
