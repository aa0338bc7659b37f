"""Learning curves of a run: validation (and training) accuracy against iterations and against
training wall time (elapsed_s), the paper's figure as a horizontal line. Needs matplotlib.

    python scripts/plot_curves.py RUN --paper 98.7 --label "MAML 5-way 1-shot" --out docs/img/x.png

Reads RUN/metrics.jsonl (metacore.training's log): "eval" records give val_accuracy, "train"
records give whichever training accuracy the method logs (inner_acc_last for Reptile; the MAML
family logs losses only, drawn on a second axis).
"""
import argparse
import json
import os


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--paper", type=float, required=True, help="the paper's accuracy, percent")
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    recs = read_metrics(a.run)
    ev = [r for r in recs if r["kind"] == "eval" and "val_accuracy" in r]
    tr = [r for r in recs if r["kind"] == "train"]
    acc_key = next((k for k in ("inner_acc_last", "train_accuracy", "accuracy")
                    if tr and k in tr[0]), None)
    loss_key = next((k for k in ("query_loss", "loss", "inner_loss_last")
                     if tr and k in tr[0]), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, xkey, xlabel in ((axes[0], "step", "meta-iterations"),
                             (axes[1], "elapsed_s", "training wall time (minutes; see the budget note)")):
        scale = 1 / 60 if xkey == "elapsed_s" else 1
        ax.plot([r[xkey] * scale for r in ev], [100 * r["val_accuracy"] for r in ev], "b-o",
                ms=3, label="validation accuracy")
        if acc_key:
            ax.plot([r[xkey] * scale for r in tr], [100 * r[acc_key] for r in tr], "g-",
                    alpha=0.5, label=f"training ({acc_key})")
        ax.axhline(a.paper, color="r", ls="--", label=f"paper {a.paper}%")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy (%)")
        lo = min([100 * r["val_accuracy"] for r in ev] + [a.paper]) if ev else 0
        ax.set_ylim(max(0, lo - 5), 100)
        if loss_key and not acc_key:
            ax2 = ax.twinx()
            ax2.plot([r[xkey] * scale for r in tr], [r[loss_key] for r in tr], "k-",
                     alpha=0.3, label=f"training {loss_key}")
            ax2.set_ylabel(loss_key)
            ax2.legend(loc="center right", fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
    last = ev[-1] if ev else {"step": 0}
    fig.suptitle(f"{a.label}: {last['step']:,} iterations, "
                 f"{last.get('elapsed_s', 0) / 60:.0f} min of training")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=90)
    print(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
