"""Training methods: the one protocol every algorithm trains through (`metacore train NAME`).

A method module is `metacore/methods/<module>.py`. It defines

    NAMES     tuple of the names it answers to on the command line ("protonet", ...)
    TASKS     tuple of task names it trains on ("omniglot", "sinusoid", "quadratic", ...)
    DEFAULTS  {task: {config key: paper default}}; these keys, plus COMMON below, are the only
              settings a run of this method accepts (`metacore train NAME --set KEY=VALUE`)
    Method    a subclass of MethodBase, built as Method(cfg) from the full run config
    check_config(cfg)   optional: raise metacore.errors.UserError naming a bad setting
    ignored_settings(cfg)   optional: messages for given settings the method does not read
                        (make_config warns with each; harmless, so not errors)
    eval_options(cfg)   optional: the `metacore eval` options a run takes ("tasks", "way",
                        "steps", "shots", ...; metacore/cli.py's EVAL_OPTIONS); the CLI
                        refuses the others. Without it every option is passed on
    defaults(name, task), sources(name, task), build_method(cfg)   optional, for a module
                        whose methods differ on a task: their defaults (instead of
                        DEFAULTS[task]), where each default comes from (`--show-config`;
                        else SOURCES[task] if defined), and the Method object to build
    LEGACY    optional {config key: value}: settings added after runs existed whose default
              differs from what those runs did; a saved config without the key is read
              (resume, eval) with this value (legacy_settings)

and nothing else is needed: `registry()` finds every module in this folder that has NAMES.

The trainer (metacore/training.py) owns the flat parameter vector, the outer optimizer, the
step counter, the progress bar, metrics.jsonl, atomic checkpoints and exact resume. A method
owns the model, the task source and everything the trainer must not know about:

    m = Method(cfg)
    params = m.init_params(m.rng)              # (P,) flat, cfg["dtype"]
    batch = m.sample()                         # one meta-batch / episode, drawn from m.rng
    grad, metrics = m.gradient(params, batch)  # grad (P,); metrics {"loss": float, ...}
    m.evaluate_val(params)                     # {"val_...": float}: periodic validation
    m.buffers() / m.load_buffers(arrays)       # non-trained state (BN running statistics)
    m.state() / m.load_state(s)                # JSON-able state (RNG states; the default
                                               # saves m.rng)
    m.evaluate(params, opts) -> dict           # `metacore eval RUN`; opts are the CLI's
    m.format_result(result) -> str             #   (tasks, seed, shots, way, bn, ...; None:
                                               #   not given; bad values raise UserError)
    m.shard(batch, lo, hi) -> sub-batch        # --distributed: tasks [lo, hi) of the batch;
    m.batch_size(batch) -> T                   #   gradient() must be a mean over tasks, and
                                               #   its change to buffers() affine in the
                                               #   mean over tasks (BN running statistics)

Keep a method module's top level light (numpy and metacore only; numba lazily): the command
line imports every method module to list the names.

Exact resume holds as long as everything random is drawn from generators whose state
`state()` returns, and every array that changes during training is in params, the optimizer
or `buffers()`.
"""
import importlib
import json
import pkgutil

import numpy as np

from metacore.checkpoint import rng_state, set_rng_state
from metacore.errors import UserError

# Settings every run has; a method's DEFAULTS may override the values, not remove the keys.
# outer_lr_final: None keeps outer_lr; a number anneals it linearly from outer_lr at the first
# step to outer_lr_final at the last (Reptile's meta step size, Nichol et al. 2018).
COMMON = dict(seed=0, dtype="float32", iterations=1000, log_every=100, ckpt_every=1000,
              eval_every=500, outer_opt="adam", outer_lr=1e-3, lr_halve_every=0,
              outer_lr_final=None)


class MethodBase:
    """See the module docstring. Subclasses override init_params, sample and gradient."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.dtype = np.dtype(cfg["dtype"])
        self.rng = np.random.default_rng(cfg["seed"])

    def init_params(self, rng):
        raise NotImplementedError(f"{type(self).__name__}.init_params")

    def sample(self):
        raise NotImplementedError(f"{type(self).__name__}.sample")

    def gradient(self, params, batch):
        raise NotImplementedError(f"{type(self).__name__}.gradient")

    def evaluate_val(self, params):
        return {}

    def buffers(self):
        return {}

    def load_buffers(self, arrays):
        if arrays:
            raise ValueError(f"{type(self).__name__}: the checkpoint has buffers "
                             f"{sorted(arrays)}, this method keeps none")

    def state(self):
        return {"rng": rng_state(self.rng)}

    def load_state(self, s):
        set_rng_state(self.rng, s["rng"])

    def batch_size(self, batch):
        raise UserError(f"{self.cfg['algorithm']} does not support --distributed (its method "
                        f"defines no batch_size/shard)")

    def shard(self, batch, lo, hi):
        raise UserError(f"{self.cfg['algorithm']} does not support --distributed")

    def evaluate(self, params, opts):
        raise NotImplementedError(f"{type(self).__name__} has no `metacore eval` yet")

    def format_result(self, result):
        return json.dumps(result, indent=1)

    def json_result(self, result):
        """What `metacore eval --json` writes: one object per evaluated setting with at least
        way, shots, accuracy and ci95 (percent), tasks and bn where it applies (the fields
        the model zoo reads). The default: evaluate()'s result as it is."""
        return result


def registry():
    """{name: method module} for every module in this package that defines NAMES."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for name in getattr(mod, "NAMES", ()):
            if name in found:
                raise RuntimeError(f"methods: {name!r} is defined by both "
                                   f"{found[name].__name__} and {mod.__name__}")
            found[name] = mod
    return found


def paper_defaults(name, task):
    """The settings a run of method `name` on `task` gets when the user sets nothing: COMMON,
    then the method's defaults (a module may define defaults(name, task) when its methods
    differ, else DEFAULTS[task])."""
    mod = get(name)
    cfg = dict(COMMON)
    cfg.update(mod.defaults(name, task) if hasattr(mod, "defaults") else mod.DEFAULTS[task])
    return cfg


def legacy_settings(name):
    """{setting: value a saved config without it ran with} (the module's LEGACY)."""
    return dict(getattr(get(name), "LEGACY", {}))


def default_sources(name, task):
    """{setting: source of its default} where the method module states one."""
    mod = get(name)
    if hasattr(mod, "sources"):
        return mod.sources(name, task)
    return dict(getattr(mod, "SOURCES", {}).get(task, {}))


def build(cfg):
    """The Method object for a full run config (a module may define build_method(cfg))."""
    mod = get(cfg["algorithm"])
    return mod.build_method(cfg) if hasattr(mod, "build_method") else mod.Method(cfg)


def get(name):
    """The method module for `name`, with a clear error listing the known names."""
    reg = registry()
    if name not in reg:
        raise UserError(f"algorithm must be one of {tuple(sorted(reg))}, got {name!r}")
    return reg[name]
