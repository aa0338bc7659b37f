"""Meta-test evaluation: adapt to each of n test tasks with 0..S inner SGD steps and report the
query loss (and accuracy) per step, mean and 95% confidence interval 1.96 * std / sqrt(n)
over the tasks (std with ddof=0, as MAML's code).

Shape letters: T tasks, N support points, M query points, P parameters, S steps.

Batch norm at test time (Omniglot, conv4_maml in batch mode):
    transductive      the query batch of a task is normalised with its own statistics, all M
                      queries together (as the MAML code does)
    non-transductive  each query image alone (a batch of one image; statistics over its
                      pixels only), so no query sees another

The scoring of one batch of tasks, adapt_and_score, lives beside the inner loop in
metacore.algorithms.maml (the MAML family's validation uses it too); it is also importable
from here. This module stands above metacore.methods.maml_family (its task sources and
split_params), never below it.
"""
import json
import math
import os

import numpy as np

from metacore.algorithms.maml import _loss_grad, adapt_and_score  # noqa: F401  (re-exported)
from metacore.errors import UserError
from metacore.stats import mean_ci  # noqa: F401  (re-exported)


def evaluate(run_dir, n_tasks=600, max_steps=10, shots=None, seed=2017, query_points=100,
             chunk=100, transductive=True, inner_lr=None):
    """Evaluate a run's latest checkpoint on n_tasks fresh test tasks.

    Sinusoid: `shots` support points (default: the training K), `query_points` query points
    drawn from the same task (default 100: the expected MSE is the same as with K, the
    variance lower). inner_lr: the test-time SGD rate (default the run's; e.g. a tuned rate for
    the pretrained baseline; not used for metasgd, whose rates are learned). Omniglot: MAML's 423 test characters with rotations, the training
    n_way/shots, K query images per class. Returns a dict with per-step lists "loss_mean",
    "loss_ci95" (and "accuracy_mean", "accuracy_ci95"), plus the run's settings."""
    from metacore.methods.maml_family import OmniglotSource, SinusoidSource, split_params
    from metacore.training import load_run
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 2:
        raise UserError(f"evaluate: n_tasks must be an int >= 2, got {n_tasks!r}")
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise UserError(f"evaluate: max_steps must be an int >= 0, got {max_steps!r}")
    for name, v, low in (("shots", shots, 1), ("query_points", query_points, 1)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise UserError(f"evaluate: {name} must be an int >= {low}, got {v!r}")
    if inner_lr is not None and (isinstance(inner_lr, bool) or not isinstance(
            inner_lr, (int, float)) or not math.isfinite(inner_lr) or inner_lr < 0):
        raise UserError(f"evaluate: inner_lr must be a finite number >= 0, got {inner_lr!r}")
    cfg, method, params, meta = load_run(run_dir)
    model = method.model
    theta, alpha = split_params(cfg, model, params)
    if inner_lr is not None and cfg["algorithm"] != "metasgd":
        alpha = float(inner_lr)
    ecfg = dict(cfg, shots=cfg["shots"] if shots is None else shots)
    if cfg["task"] == "sinusoid":
        ecfg["queries"] = query_points
        source = SinusoidSource(ecfg, np.random.default_rng(seed))
    else:
        ecfg["queries"] = ecfg["shots"]
        source = OmniglotSource(ecfg, "test", seed=seed)
    scores = {"loss": [[] for _ in range(max_steps + 1)],
              "accuracy": [[] for _ in range(max_steps + 1)]}
    done = 0
    while done < n_tasks:
        T = min(chunk, n_tasks - done)
        s = adapt_and_score(model, theta, alpha, source.sample(T), max_steps, transductive)
        for key, per_step in s.items():
            for i, v in enumerate(per_step):
                scores[key][i].append(v)
        done += T
    result = {"run": os.fspath(run_dir), "step": meta["step"], "algorithm": cfg["algorithm"],
              "task": cfg["task"], "shots": ecfg["shots"], "n_way": cfg["n_way"],
              "n_tasks": n_tasks, "seed": seed,
              "inner_lr": "learned" if isinstance(alpha, np.ndarray) else alpha,
              "steps": list(range(max_steps + 1))}
    if cfg["task"] == "sinusoid":
        result["query_points"] = query_points
    else:
        result["bn"] = "transductive" if transductive else "non-transductive"
    for key, per_step in scores.items():
        if per_step[0]:
            for i, v in enumerate(per_step):
                v = np.concatenate(v)
                bad = v.size - int(np.count_nonzero(np.isfinite(v)))
                if bad:
                    raise FloatingPointError(
                        f"evaluate: the query {key} after {i} step(s) is non-finite on {bad} "
                        f"of {v.size} tasks (test-time alpha {result['inner_lr']}): the "
                        f"adapted parameters diverged")
            stats = [mean_ci(np.concatenate(v)) for v in per_step]
            result[f"{key}_mean"] = [m for m, _ in stats]
            result[f"{key}_ci95"] = [c for _, c in stats]
    # the headline number: at the paper protocol's test-time steps (or the most evaluated)
    s = min(cfg["test_steps"], max_steps)
    result.update(tasks=n_tasks, protocol_steps=s)
    if "accuracy_mean" in result:
        result.update(way=cfg["n_way"], accuracy=100 * result["accuracy_mean"][s],
                      ci95=100 * result["accuracy_ci95"][s])
    else:
        result.update(mse=result["loss_mean"][s], mse_ci95=result["loss_ci95"][s])
    return result


def format_result(r):
    lines = [f"{r['algorithm']} {r['task']} {r['shots']}-shot"
             + (f" {r['n_way']}-way, BN {r['bn']}" if r["task"] == "omniglot" else "")
             + f", {r['n_tasks']} test tasks, test-time alpha {r['inner_lr']}, "
             f"checkpoint step {r['step']}"]
    for i in r["steps"]:
        s = f"  steps {i:2d}: loss {r['loss_mean'][i]:.4f} +- {r['loss_ci95'][i]:.4f}"
        if "accuracy_mean" in r:
            s += (f"   accuracy {100 * r['accuracy_mean'][i]:.2f}% "
                  f"+- {100 * r['accuracy_ci95'][i]:.2f}")
        lines.append(s)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ plots
def sinusoid_plots(run_dirs, out_dir, results=None, shots=None, seed=7, n_examples=3,
                   inner_lrs=None):
    """Figure 2 style (one test task per panel: truth, support points, prediction before and
    after 1 and 10 steps for each run) and Figure 3 style (MSE vs gradient steps, every run)
    PNGs in out_dir. run_dirs: {label: run directory}; results: {label: evaluate() result};
    inner_lrs: {label: test-time SGD rate} overriding a run's own.
    Returns the written paths, or [] when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    from metacore.tasks.sinusoid import sample_sinusoid, sinusoid_curve
    from metacore.methods.maml_family import split_params
    from metacore.training import load_run
    os.makedirs(out_dir, exist_ok=True)
    runs = {label: load_run(d) for label, d in run_dirs.items()}
    rng = np.random.default_rng(seed)
    K = shots or next(iter(runs.values()))[0]["shots"]
    tasks = sample_sinusoid(rng, n_examples, K, np.float64)
    grid = np.linspace(-5, 5, 200)[None, :, None].repeat(n_examples, 0)    # (T, 200, 1)
    paths = []
    fig, axes = plt.subplots(len(runs), n_examples, figsize=(4 * n_examples, 3 * len(runs)),
                             squeeze=False)
    for row, (label, (cfg, method, params, _)) in enumerate(runs.items()):
        model = method.model
        theta, alpha = split_params(cfg, model, params)
        if inner_lrs and label in inner_lrs and cfg["algorithm"] != "metasgd":
            alpha = inner_lrs[label]
        dt = theta.dtype
        th = np.repeat(theta[None], n_examples, 0)
        sx, sy = tasks.x.astype(dt), tasks.y.astype(dt)
        preds = {}
        for step in range(11):
            if step in (0, 1, 10):
                preds[step] = model.forward(th, grid.astype(dt), _checked=True)[0]
            th = th - alpha * _loss_grad(model, th, sx, sy)[1]
        truth = sinusoid_curve(tasks.amplitude, tasks.phase, grid)
        for t in range(n_examples):
            ax = axes[row, t]
            ax.plot(grid[t, :, 0], truth[t, :, 0], "r-", label="ground truth")
            for step, style in ((0, "g:"), (1, "b--"), (10, "c-.")):
                ax.plot(grid[t, :, 0], preds[step][t, :, 0], style,
                        label=f"{step} grad step{'s' if step != 1 else ''}")
            ax.plot(tasks.x[t, :, 0], tasks.y[t, :, 0], "k^", label="used for grad")
            ax.set_title(f"{label}, K={K}")
        axes[row, 0].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "sinusoid_fig2.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    if results:
        fig, ax = plt.subplots(figsize=(5, 4))
        for label, r in results.items():
            m, c = np.array(r["loss_mean"]), np.array(r["loss_ci95"])
            ax.errorbar(r["steps"], m, yerr=c, marker="o", capsize=3, label=label)
        ax.set_xlabel("number of gradient steps")
        ax.set_ylabel("mean squared error")
        ax.set_title(f"k-shot regression, k={K}")
        ax.legend()
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "sinusoid_fig3.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def save_result(result, path):
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
