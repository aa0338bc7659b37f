"""Command line: `metacore check` (the derivations against finite differences),
`metacore train` (meta-training with exact resume), `metacore eval` (600-task test of a run
directory or a zoo entry) and `metacore zoo` (the shipped trained models).

Errors: a user error (metacore.errors.UserError, a corrupt checkpoint, a missing or
unwritable file, a non-finite result the library refused as FloatingPointError, usually a
learning rate or an input scale out of range) prints one line,
`metacore <command>: error: <message>`, on stderr and exits with status 2; the traceback
only with --debug or METACORE_DEBUG=1. Any other exception is a bug: its traceback is
printed, with a line saying so, and the exit status is 1."""
import argparse
import errno
import json
import math
import os
import sys
import traceback
import warnings

from metacore.errors import IgnoredSettingWarning, UserError

# OSErrors that describe the user's files or machine, not a bug: any with a file name, and
# these without one
_ENV_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM}


def is_user_error(e):
    """True for the exceptions the CLI reports as one line (see the module docstring)."""
    if isinstance(e, (UserError, FloatingPointError)):
        return True
    if isinstance(e, OSError):
        return e.filename is not None or e.errno in _ENV_ERRNOS \
            or isinstance(e, (FileNotFoundError, FileExistsError))
    return False


def _one_line(e):
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.strerror}: {os.fsdecode(e.filename)}"
        if e.filename2 is not None:
            text += f" -> {os.fsdecode(e.filename2)}"
    else:
        text = str(e)
    return " ".join(text.split()) or type(e).__name__


def run_command(command, fn, args, debug=False):
    """fn(args) -> exit status, with metacore's error convention (module docstring)."""
    prefix = f"metacore {command}"
    try:
        return fn(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"{prefix}: interrupted\n")
        return 130
    except BrokenPipeError:
        # the reader went away (`metacore zoo --json | head`): not an error of ours; point
        # stdout at /dev/null so that the interpreter's final flush does not fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141                                           # 128 + SIGPIPE, as a shell says
    except Exception as e:                                   # noqa: BLE001 (sorted below)
        if is_user_error(e):
            if debug:
                traceback.print_exc()
            text = _one_line(e)
            if text.startswith(command + ": "):               # "train: ..." says it twice
                text = text[len(command) + 2:]
            sys.stderr.write(f"{prefix}: error: {text}\n")
            return 2
        traceback.print_exc()
        sys.stderr.write(f"{prefix}: internal error ({type(e).__name__}): this is a bug in "
                         f"metacore; please report it with the traceback above\n")
        return 1


def _debug_wanted(args):
    return bool(getattr(args, "debug", False)) \
        or os.environ.get("METACORE_DEBUG", "").strip() not in ("", "0")


def _add_blas(p):
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads (default 1: per-task GEMMs are small, and extra "
                        "threads spin against other processes; see metacore.blas)")


def _set_up_process(args):
    """The process settings of `train` and `eval`: BLAS threads, and freed memory kept in
    the process (metacore.malloc: no page faults on every step's buffers)."""
    from metacore.blas import set_blas_threads
    from metacore.malloc import keep_freed_memory
    if args.blas_threads < 1:
        raise UserError(f"--blas-threads must be >= 1, got {args.blas_threads}")
    set_blas_threads(args.blas_threads)
    keep_freed_memory()


MAML_FLAGS = ("shots", "queries", "n_way", "meta_batch", "inner_steps", "test_steps",
              "eval_tasks", "inner_lr")
COMMON_FLAGS = ("iterations", "eval_every", "log_every", "ckpt_every", "seed", "outer_lr",
                "outer_opt", "dtype", "lr_halve_every")


def _add_train(sub):
    from metacore import methods
    names = sorted(methods.registry())
    p = sub.add_parser("train", help="meta-train (progress on stderr, metrics.jsonl, "
                                     "checkpoint.npz in --out; --resume continues exactly)")
    p.add_argument("algorithm", choices=names)
    p.add_argument("--task", required=True, help="the task (each method lists its own)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (an error if there is none)")
    p.add_argument("--resume-or-start", action="store_true",
                   help="continue the run in --out if there is one, else start it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--show-config", action="store_true",
                   help="print every effective setting with its source (the paper, your "
                        "flag, the resumed run) and exit without training")
    p.add_argument("--distributed", action="store_true",
                   help="split each meta-batch across MPI ranks (launch with mpirun -n R; "
                        "needs mpi4py: see metacore/distributed.py)")
    ints = ("iterations", "shots", "queries", "n_way", "meta_batch", "inner_steps",
            "test_steps", "eval_every", "eval_tasks", "log_every", "ckpt_every", "seed",
            "lr_halve_every")
    for name in ints:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    for name in ("inner_lr", "outer_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    p.add_argument("--outer-opt", choices=["sgd", "momentum", "nesterov", "adagrad", "rmsprop",
                                          "adam"],
                   default=None)
    p.add_argument("--dtype", choices=["float32", "float64"], default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other setting of the method (VALUE read as JSON, else as a "
                        "string); repeatable")
    _add_blas(p)
    p.epilog = ("defaults: the paper settings of the method and task (DEFAULTS in "
                "metacore/methods/<module>.py); unknown settings are refused with the list")


def _parse_sets(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set wants KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def _add_eval(sub):
    p = sub.add_parser("eval", help="post-update loss/accuracy over test tasks, 0..S steps, "
                                    "with 95%% confidence intervals")
    p.add_argument("run", help="run directory (its checkpoint.npz is evaluated), or "
                               "zoo:NAME for a model-zoo entry (metacore zoo lists them)")
    p.add_argument("--tasks", type=int, default=None,
                   help="test tasks / episodes (default: 600 for the MAML family, the "
                        "method's protocol otherwise)")
    p.add_argument("--way", type=int, default=None,
                   help="classes per episode (default: the method's protocol)")
    p.add_argument("--steps", type=int, default=None,
                   help="largest number of adaptation steps (MAML family: default 10; other "
                        "methods: their protocol's)")
    p.add_argument("--shots", type=int, default=None, help="default: the training K")
    p.add_argument("--seed", type=int, default=2017)
    p.add_argument("--query-points", type=int, default=None,
                   help="sinusoid query points (default 100)")
    p.add_argument("--inner-lr", type=float, default=None,
                   help="test-time SGD rate (default: the run's alpha)")
    p.add_argument("--bn", choices=["transductive", "non-transductive", "both", "running",
                                    "batch"], default=None,
                   help="Omniglot query batch-norm statistics (MAML family: default both; "
                        "other methods: their protocol's default)")
    p.add_argument("--json", default=None, help="write the result(s) here")
    p.add_argument("--plot-dir", default=None,
                   help="sinusoid: write Figure 2/3 style PNGs here (needs matplotlib)")
    _add_blas(p)
    p.add_argument("--compare", nargs="*", default=[], metavar="LABEL=RUN",
                   help="sinusoid plots: more runs to draw beside this one (e.g. pretrained); "
                        "LABEL=RUN@ALPHA evaluates RUN with test-time rate ALPHA")


def _train(args):
    from metacore.training import Trainer, make_config, read_config
    _set_up_process(args)
    if args.resume and args.resume_or_start:
        raise UserError("give --resume or --resume-or-start, not both")
    resume = "auto" if args.resume_or_start else args.resume
    over = {k: getattr(args, k) for k in MAML_FLAGS + COMMON_FLAGS}
    over.update(_parse_sets(args.set))
    flagged = {k for k, v in over.items() if v is not None}
    resumed = set()
    if resume and os.path.exists(os.path.join(args.out, "config.json")):
        saved = read_config(args.out)           # settings not given again come from the run
        if (saved["algorithm"], saved["task"]) != (args.algorithm, args.task):
            raise UserError(f"train --resume: {args.out} holds a {saved['algorithm']} run on "
                            f"{saved['task']}, not {args.algorithm} on {args.task}")
        from metacore import methods
        for k, v in methods.legacy_settings(args.algorithm).items():
            saved.setdefault(k, v)              # a run from before the setting existed
        for k, v in over.items():
            if v is None and k in saved:
                over[k] = saved[k]
        for k, v in saved.items():
            if k not in over and k not in ("algorithm", "task", "out"):
                over[k] = v
        resumed = {k for k in saved if k not in flagged}
    given = {k: v for k, v in over.items() if v is not None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", IgnoredSettingWarning)
        cfg = make_config(args.algorithm, args.task, args.out, **given)
    for w in caught:
        if issubclass(w.category, IgnoredSettingWarning):
            sys.stderr.write(f"metacore train: warning: {w.message}\n")
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if args.show_config:
        print(_show_config(cfg, flagged, resumed))
        return 0
    from metacore.distributed import SingleProcess, abort_on_error
    comm = SingleProcess()
    if args.distributed:
        from metacore.distributed import MPIComm
        try:
            comm = MPIComm()
        except ImportError as e:                  # what to install: the user's to fix
            raise UserError(str(e)) from e
    with abort_on_error(comm):           # one rank failing alone must not leave the rest waiting
        with Trainer(cfg, resume=resume, progress=not args.no_progress, comm=comm) as trainer:
            trainer.train()
    if comm.rank != 0:
        return 0
    print(f"done: {cfg['algorithm']} {cfg['task']} step {trainer.step}, "
          f"{trainer.elapsed:.1f} s of training, checkpoint {trainer.ckpt_path}")
    return 0


def _show_config(cfg, flagged, resumed):
    """One line per effective setting: name, value, and where it came from."""
    from metacore import methods
    paper = methods.paper_defaults(cfg["algorithm"], cfg["task"])
    sources = methods.default_sources(cfg["algorithm"], cfg["task"])
    common = methods.COMMON
    lines = [f"# metacore train {cfg['algorithm']} --task {cfg['task']}: effective settings"]
    for k in sorted(cfg):
        if k in ("algorithm", "task", "out"):
            src = "the command line"
        elif k in flagged:
            src = "your flag"
        elif k in resumed:
            src = "the resumed run"
        elif k in sources:
            # a method's own reasoned choice says "metacore: ...", a default taken from a
            # public reimplementation rather than the paper says "reimplementation ..."
            src = sources[k] if sources[k].startswith(("metacore:", "reimplementation")) \
                else "paper: " + sources[k]
        elif k in common and paper.get(k) == common[k]:
            src = "metacore default (not a paper setting)"
        else:
            src = "metacore default for this method (not a paper setting)"
        lines.append(f"{k:<16} {json.dumps(cfg[k]):<14} {src}")
    return "\n".join(lines)


def _zoo(args):
    from metacore import zoo
    items = zoo.entries()
    if args.json:
        keys = ("name", "method", "task", "way", "shot", "paper", "budget", "command",
                "measured", "file", "sha256")
        print(json.dumps([{k: e[k] for k in keys if k in e} for e in items], indent=1))
    else:
        print(zoo.format_table(items))
    return 0


# `metacore eval` options a method may take (its module's eval_options(cfg) names those that
# apply to a run); --json, --seed and --blas-threads apply to every run
EVAL_OPTIONS = ("tasks", "way", "steps", "shots", "query_points", "inner_lr", "bn", "plot_dir",
                "compare")


def _flag(name):
    return "--" + name.replace("_", "-")


def _check_eval_args(args, cfg):
    """Refuse eval options out of range, and options the run's method does not use (listing
    those it does)."""
    from metacore import methods
    lows = {"tasks": (2, "a 95% interval needs at least two"), "steps": (0, ""),
            "shots": (1, ""), "way": (2, "a classification needs two classes"),
            "query_points": (1, ""), "seed": (0, "")}
    for name, (low, why) in lows.items():
        v = getattr(args, name)
        if v is not None and v < low:
            raise UserError(f"{_flag(name)} must be >= {low}{' (' + why + ')' if why else ''}, "
                            f"got {v}")
    if args.inner_lr is not None and not (math.isfinite(args.inner_lr) and args.inner_lr >= 0):
        raise UserError(f"--inner-lr must be a finite number >= 0, got {args.inner_lr}")
    mod = methods.get(cfg["algorithm"])
    applies = mod.eval_options(cfg) if hasattr(mod, "eval_options") else EVAL_OPTIONS
    given = [k for k in EVAL_OPTIONS if getattr(args, k) not in (None, [])]
    extra = [k for k in given if k not in applies]
    if extra:
        ok = ", ".join(_flag(k) for k in EVAL_OPTIONS if k in applies)
        raise UserError(f"{', '.join(_flag(k) for k in extra)} "
                        f"{'does' if len(extra) == 1 else 'do'} not apply to a "
                        f"{cfg['algorithm']} run on {cfg['task']}; the options that do: "
                        f"{ok or '(none)'}, --seed, --json")


def _check_maml_eval_args(args, cfg):
    """The MAML family's own limits on --bn, --way, --shots and --compare."""
    if args.bn is not None and args.bn not in ("transductive", "non-transductive", "both"):
        raise UserError(f"--bn {args.bn} is not a MAML-family mode (transductive, "
                        f"non-transductive, both)")
    if args.way is not None and args.way != cfg["n_way"]:
        raise UserError(f"--way {args.way}: the run's output layer has {cfg['n_way']} classes; "
                        f"a {args.way}-way test needs a model trained for it")
    if cfg["task"] == "omniglot" and args.shots is not None and 2 * args.shots > 20:
        raise UserError(f"--shots {args.shots}: K support and K query drawings per character "
                        f"must fit Omniglot's 20 (--shots <= 10)")
    for item in args.compare:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise UserError(f"--compare wants LABEL=RUN or LABEL=RUN@ALPHA, got {item!r}")


def _eval(args):
    from metacore import evaluation as ev
    from metacore.training import read_config
    _set_up_process(args)
    cfg = read_config(args.run)
    _check_eval_args(args, cfg)
    from metacore.methods import maml_family
    if cfg["algorithm"] not in maml_family.NAMES or maml_family._nichol(cfg["algorithm"],
                                                                         cfg["task"]):
        return _eval_method(args, cfg)
    _check_maml_eval_args(args, cfg)
    if args.tasks is None:
        args.tasks = 600
    if args.steps is None:
        args.steps = 10
    if args.query_points is None:
        args.query_points = 100
    if args.bn is None:
        args.bn = "both"
    modes = [True]
    if cfg["task"] == "omniglot":
        modes = {"transductive": [True], "non-transductive": [False],
                 "both": [True, False]}[args.bn]
    results = []
    for tr in modes:
        r = ev.evaluate(args.run, n_tasks=args.tasks, max_steps=args.steps, shots=args.shots,
                        seed=args.seed, query_points=args.query_points, transductive=tr,
                        inner_lr=args.inner_lr)
        print(ev.format_result(r))
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=1)
    if args.plot_dir and cfg["task"] == "sinusoid":
        runs, res = {cfg["algorithm"]: args.run}, {cfg["algorithm"]: results[0]}
        lrs = {cfg["algorithm"]: args.inner_lr} if args.inner_lr is not None else {}
        for item in args.compare:
            label, _, path = item.partition("=")
            path, _, lr = path.partition("@")
            runs[label] = path
            if lr:
                lrs[label] = float(lr)
            res[label] = ev.evaluate(path, n_tasks=args.tasks, max_steps=args.steps,
                                     shots=args.shots, seed=args.seed,
                                     query_points=args.query_points, inner_lr=lrs.get(label))
        paths = ev.sinusoid_plots(runs, args.plot_dir, res, shots=args.shots, inner_lrs=lrs)
        print("plots: " + (", ".join(paths) if paths else "skipped (matplotlib not installed)"))
    return 0


def _eval_method(args, cfg):
    """`metacore eval` for every method outside the MAML family: its own evaluate()."""
    from metacore.training import load_run
    _, method, params, _ = load_run(args.run)
    opts = {k: getattr(args, k) for k in ("tasks", "steps", "shots", "way", "seed", "bn",
                                          "inner_lr")}
    result = method.evaluate(params, opts)
    print(method.format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(method.json_result(result), f, indent=1)
    return 0


def _dispatch(args):
    if args.command == "check":
        if args.cuda_sim and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            import subprocess
            argv = [a for a in args.argv if a != "--cuda-sim"]
            env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
            return subprocess.run([sys.executable, "-m", "metacore"] + argv, env=env).returncode
        from metacore import check
        if args.list:
            cases = check.select(check.all_cases(), args.only)
            w = max([30] + [len(c.name) for c in cases])
            for case in sorted(cases, key=lambda c: check.GROUPS.index(c.group)):
                print(f"{case.name:<{w}} {case.group}")
            return 0
        failures = check.run(args.only, tuple(args.dtype or ("float64", "float32")),
                             json_path=args.json)
        return 1 if failures else 0
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    if args.command == "zoo":
        return _zoo(args)
    return 2


def main(argv=None):
    parser = argparse.ArgumentParser(prog="metacore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    debug_help = "show the full traceback of an error (also METACORE_DEBUG=1)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="check every gradient and Hessian-vector product "
                                     "against float64 central finite differences")
    p.add_argument("only", nargs="*", help="derivations or groups to check (e.g. conv2d "
                                           "bn_mlp, or layers, losses, models, "
                                           "meta-gradients, kernels, algorithms); default all")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the rows to FILE as JSON (name, group, dtype, quantity, "
                        "error, tolerance, pass)")
    p.add_argument("--dtype", choices=["float64", "float32"], action="append",
                   help="only this dtype (repeatable); default both")
    p.add_argument("--list", action="store_true", help="list the derivations and exit")
    p.add_argument("--cuda-sim", action="store_true",
                   help="also compare the Numba CUDA kernels with the reference, under "
                        "Numba's CUDA simulator (no GPU needed; reruns the check in a child "
                        "process with NUMBA_ENABLE_CUDASIM=1, which numba reads at import)")
    _add_train(sub)
    _add_eval(sub)
    p = sub.add_parser("zoo", help="list the trained models shipped in the package "
                                   "(evaluate one with metacore eval zoo:NAME)")
    p.add_argument("--json", action="store_true", help="print the entries as a JSON list")
    for p in sub.choices.values():      # --debug after the command too: metacore train --debug
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=debug_help)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    return run_command(args.command, _dispatch, args, _debug_wanted(args))


if __name__ == "__main__":
    sys.exit(main())
