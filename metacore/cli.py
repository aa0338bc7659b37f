"""Command line: `metacore check` (the derivations against finite differences),
`metacore train` (meta-training with exact resume) and `metacore eval` (600-task test)."""
import argparse
import json
import os
import sys


def _add_blas(p):
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads (default 1: per-task GEMMs are small, and extra "
                        "threads spin against other processes; see metacore.blas)")


def _set_blas(args):
    from metacore.blas import set_blas_threads
    set_blas_threads(args.blas_threads)


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
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
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
    p.add_argument("--outer-opt", choices=["sgd", "momentum", "nesterov", "adagrad", "adam"],
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
            raise SystemExit(f"metacore train: --set wants KEY=VALUE, got {item!r}")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def _add_eval(sub):
    p = sub.add_parser("eval", help="post-update loss/accuracy over test tasks, 0..S steps, "
                                    "with 95%% confidence intervals")
    p.add_argument("run", help="run directory (its checkpoint.npz is evaluated)")
    p.add_argument("--tasks", type=int, default=None,
                   help="test tasks / episodes (default: 600 for the MAML family, the "
                        "method's protocol otherwise)")
    p.add_argument("--way", type=int, default=None,
                   help="classes per episode (default: the method's protocol)")
    p.add_argument("--steps", type=int, default=10, help="largest number of adaptation steps")
    p.add_argument("--shots", type=int, default=None, help="default: the training K")
    p.add_argument("--seed", type=int, default=2017)
    p.add_argument("--query-points", type=int, default=100, help="sinusoid query points")
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
    _set_blas(args)
    over = {k: getattr(args, k) for k in MAML_FLAGS + COMMON_FLAGS}
    over.update(_parse_sets(args.set))
    if args.resume and os.path.exists(os.path.join(args.out, "config.json")):
        saved = read_config(args.out)           # settings not given again come from the run
        for k, v in over.items():
            if v is None and k in saved:
                over[k] = saved[k]
        for k, v in saved.items():
            if k not in over and k not in ("algorithm", "task", "out"):
                over[k] = v
    given = {k: v for k, v in over.items() if v is not None}
    try:
        cfg = make_config(args.algorithm, args.task, args.out, **given)
    except ValueError as e:
        raise SystemExit(f"metacore train: {e}")
    from metacore.distributed import SingleProcess, abort_on_error
    comm = SingleProcess()
    if args.distributed:
        from metacore.distributed import MPIComm
        comm = MPIComm()
    with abort_on_error(comm):           # one rank failing alone must not leave the rest waiting
        trainer = Trainer(cfg, resume=args.resume, progress=not args.no_progress, comm=comm)
        try:
            trainer.train()
        except FloatingPointError as err:      # a non-finite meta-gradient: say where, exit 1
            raise SystemExit(f"metacore {err}")
    if comm.rank != 0:
        return 0
    print(f"done: {cfg['algorithm']} {cfg['task']} step {trainer.step}, "
          f"{trainer.elapsed:.1f} s of training, checkpoint {trainer.ckpt_path}")
    return 0


def _eval(args):
    from metacore import evaluation as ev
    from metacore.training import read_config
    _set_blas(args)
    cfg = read_config(args.run)
    from metacore.methods import maml_family
    if cfg["algorithm"] not in maml_family.NAMES:
        return _eval_method(args, cfg)
    if args.tasks is None:
        args.tasks = 600
    if args.bn is None:
        args.bn = "both"
    if args.bn not in ("transductive", "non-transductive", "both"):
        raise SystemExit(f"metacore eval: --bn {args.bn} is not a MAML-family mode")
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
            json.dump(result, f, indent=1)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="metacore", description=__doc__)
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
    args = parser.parse_args(argv)
    if args.command == "check":
        if args.cuda_sim and os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
            import subprocess
            argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--cuda-sim"]
            env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
            return subprocess.run([sys.executable, "-m", "metacore"] + argv, env=env).returncode
        from metacore import check
        if args.list:
            cases = check.select(check.all_cases(), args.only)
            for case in sorted(cases, key=lambda c: check.GROUPS.index(c.group)):
                print(f"{case.name:<30} {case.group}")
            return 0
        failures = check.run(args.only, tuple(args.dtype or ("float64", "float32")),
                             json_path=args.json)
        return 1 if failures else 0
    if args.command == "train":
        return _train(args)
    if args.command == "eval":
        return _eval(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
