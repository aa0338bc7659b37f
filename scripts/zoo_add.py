"""Make (or replace) a model-zoo entry from a run directory (maintainers' tool).

    python scripts/zoo_add.py RUN --name NAME --paper-value 98.7 \
        --paper-figure "Table 1, 5-way 1-shot" --paper-source "Finn et al. 2017" \
        --paper-iterations 60000 --command "python -m metacore train ..." \
        --eval-json r.json --eval-command "python -m metacore eval zoo:NAME ..." [--finished]

Writes metacore/zoo/NAME.npz (the run's parameters, buffers and config, float32, no optimizer
state) and its index entry with size and SHA-256. --eval-json is the output of `metacore eval
RUN --json FILE` (one object or a list, with accuracy and ci95 in percent).
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from metacore import zoo                                          # noqa: E402
from metacore.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run")
    p.add_argument("--name", required=True)
    p.add_argument("--paper-value", required=True)
    p.add_argument("--paper-figure", required=True)
    p.add_argument("--paper-source", required=True)
    p.add_argument("--paper-iterations", type=int, required=True,
                   help="the paper's training budget; 0 where the paper does not state one")
    p.add_argument("--command", required=True, help="the exact training command")
    p.add_argument("--eval-json", required=True)
    p.add_argument("--eval-command", required=True)
    p.add_argument("--finished", action="store_true", help="the run had the paper's budget")
    p.add_argument("--budget-note", default="", help="the machine and what shared it")
    a = p.parse_args(argv)
    arrays, meta = load_checkpoint(os.path.join(a.run, "checkpoint.npz"))
    cfg = meta["config"]
    keep = {k: v for k, v in arrays.items() if not k.startswith("opt.")}
    fname = a.name + ".npz"
    path = os.path.join(zoo.ZOO_DIR, fname)
    save_checkpoint(path, keep, {"config": cfg, "step": meta["step"],
                                 "elapsed_s": meta["elapsed_s"],
                                 "method_state": meta["method_state"]})
    with open(a.eval_json) as f:
        res = json.load(f)
    res = res if isinstance(res, list) else [res]
    results = [{k: r[k] for k in ("protocol", "bn", "way", "shots", "queries", "tasks",
                                  "accuracy", "ci95", "mse", "mse_ci95", "protocol_steps",
                                  "steps", "seed") if k in r
                and not isinstance(r[k], list)} for r in res]
    entry = {
        "name": a.name, "method": cfg["algorithm"], "task": cfg["task"],
        "way": cfg["n_way"], "shot": cfg["shots"], "file": fname,
        "bytes": os.path.getsize(path), "sha256": zoo.file_sha256(path),
        "paper": {"value": a.paper_value, "figure": a.paper_figure, "source": a.paper_source},
        "budget": {"iterations": meta["step"], "paper_iterations": a.paper_iterations,
                   "train_wall_s": round(meta["elapsed_s"], 1), "finished": a.finished,
                   "note": a.budget_note},
        "command": a.command,
        "measured": {"command": a.eval_command, "results": results},
    }
    items = [e for e in zoo.entries() if e["name"] != a.name] + [entry]
    tmp = zoo.INDEX + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"entries": items}, f, indent=1)
        f.write("\n")
    os.replace(tmp, zoo.INDEX)
    print(f"zoo: {a.name} -> {path} ({entry['bytes']} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
