"""The model zoo: trained meta-parameters shipped inside the package, evaluated in seconds.

    metacore zoo [--json]                  list the entries
    metacore eval zoo:NAME [eval flags]    evaluate an entry exactly as a run directory

Files (this folder):
    index.json     {"entries": [entry, ...]}; an entry holds name, method, task, way, shot,
                   file, sha256, bytes, paper {figure, value, source}, budget {iterations,
                   paper_iterations, train_wall_s, finished, note}, command (the exact training
                   command), measured (the eval command and what it printed, in percent)
    NAME.npz       a metacore checkpoint (metacore.checkpoint: pickle-free, digest-checked)
                   holding the run's parameters and buffers and its config, without the outer
                   optimizer's state (it is for evaluation, not for resuming)

An entry's file is read only after its size and SHA-256 match the index; a mismatch raises
UserError (a ValueError) naming the file. scripts/zoo_add.py makes an entry from a run directory.
"""
import hashlib
import json
import os

from metacore.errors import UserError

ZOO_DIR = os.path.dirname(os.path.abspath(__file__))
INDEX = os.path.join(ZOO_DIR, "index.json")
PREFIX = "zoo:"


def entries():
    """The index's entries, in order (a list of dicts)."""
    with open(INDEX) as f:
        index = json.load(f)
    if not isinstance(index, dict) or not isinstance(index.get("entries"), list):
        raise UserError(f"zoo: {INDEX} is not a zoo index (no 'entries' list)")
    return index["entries"]


def entry(name):
    """The index entry called name, or ValueError listing the names there are."""
    found = [e for e in entries() if e["name"] == name]
    if not found:
        names = ", ".join(e["name"] for e in entries()) or "none"
        raise UserError(f"zoo: no entry {name!r} (entries: {names})")
    return found[0]


def verified_path(name):
    """The path of an entry's file after its size and SHA-256 are checked against the index."""
    e = entry(name)
    path = os.path.join(ZOO_DIR, e["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"zoo: {path} is missing (entry {name!r})")
    with open(path, "rb") as f:
        blob = f.read()
    sha = hashlib.sha256(blob).hexdigest()
    if len(blob) != e["bytes"] or sha != e["sha256"]:
        raise UserError(f"zoo: {path} fails its checksum: {len(blob)} bytes, sha256 {sha}; "
                         f"the index expects {e['bytes']} bytes, sha256 {e['sha256']}")
    return path


def is_ref(run):
    return isinstance(run, str) and run.startswith(PREFIX)


def name_of(run):
    name = run[len(PREFIX):]
    if not name:
        raise UserError("zoo: 'zoo:' needs an entry name, e.g. zoo:maml_omniglot_5w1s "
                         "(metacore zoo lists them)")
    return name


def read(run):
    """zoo:NAME -> (arrays, meta) of the entry's verified checkpoint."""
    from metacore.checkpoint import load_checkpoint
    return load_checkpoint(verified_path(name_of(run)))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _label(entry, r):
    """'bn ' and, where the result is not the entry's own way/shot, 'N-way K-shot '."""
    parts = [r["bn"]] if r.get("bn") else []
    if r.get("protocol", "").startswith("lake"):
        parts.append("Lake's 20 runs")
    elif (r.get("way", entry["way"]), r.get("shots", entry["shot"])) != (entry["way"],
                                                                        entry["shot"]):
        parts.append(f"{r['way']}-way {r['shots']}-shot")
    return " ".join(parts) + " " if parts else ""


def format_table(items):
    """One line per entry for `metacore zoo`."""
    lines = []
    for e in items:
        b, p, m = e["budget"], e["paper"], e.get("measured", {})
        acc = "; ".join(f"{_label(e, r)}{r['accuracy']:.2f} +- {r['ci95']:.2f}%"
                        if "accuracy" in r else f"MSE {r['mse']:.3f} +- {r['mse_ci95']:.3f}"
                        for r in m.get("results", []))
        state = ("full budget" if b.get("finished") else
                 f"{b['iterations']:,} of {b['paper_iterations']:,} it."
                 if b.get("paper_iterations") else
                 f"{b['iterations']:,} it. (the paper states no budget)")
        lines.append(f"{e['name']:28s} {e['method']} {e['task']} {e['way']}-way "
                     f"{e['shot']}-shot | measured {acc or '-'} | paper {p['value']} "
                     f"({p['figure']}) | {state}, {b['train_wall_s'] / 60:.0f} min of training")
    return "\n".join(lines) if lines else "(the zoo is empty)"
