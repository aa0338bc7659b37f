"""Before/after timing of the Conv-4 MAML step between two checkouts (issue 17, item 3).

    taskset -c 1 python -m bench.ab_conv4_step OTHER_ROOT [--T 4] [--rounds 7] [--calls 3]
        [--first-order] [--check]

Times metacore.algorithms.maml.maml_gradient on conv4_maml (5-way 1-shot, 15 queries per
class, k = 1, alpha = 0.4, float32, bench/peers/workloads.py's Omniglot episodes) in this
checkout ("this") and in OTHER_ROOT ("other", e.g. an unpacked `git archive main`), each
round a fresh process per checkout, the two alternated (other, this, other, this, ...), so
that both see the same phases of a shared core. Each process warms up with one call, then
times `calls` calls by its thread's CPU time (time.thread_time: other processes' time
slices on a shared core are not counted). Reports each side's median and minimum over all
its calls and the median of the per-round ratios other / this (> 1: this is faster).

--check first compares the float64 meta-gradients (and query losses) of the two checkouts
on the same inputs: rel_error = max|a - b| / (max|a| + max|b|), printed.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

CHILD = r"""
import json, sys, time
import numpy as np
from bench.peers import workloads as W
from metacore.algorithms.maml import maml_gradient
from metacore.models import conv4_maml
T, calls, fo, dump = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
a = W.make_conv4(dict(T=T, k=1, n_way=5, shots=1, queries=15, alpha=0.4))
model = conv4_maml(n_way=5)
if dump != "-":
    a64 = {k: (v.astype(np.float64) if v.dtype.kind == "f" else v) for k, v in a.items()}
    r = maml_gradient(model, a64["theta"], a64["sx"], a64["sy"], a64["qx"], a64["qy"], 0.4,
                      steps=1, first_order=fo)
    np.savez(dump, grad=r.grad, loss=np.asarray(r.query_loss))
    sys.exit(0)
step = lambda: maml_gradient(model, a["theta"], a["sx"], a["sy"], a["qx"], a["qy"], 0.4,
                             steps=1, first_order=fo)
step()
ts = []
for _ in range(calls):
    t0 = time.thread_time()
    step()
    ts.append(time.thread_time() - t0)
print("TIMES " + json.dumps(ts))
"""


def _run(root, T, calls, fo, dump="-"):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               NUMBA_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", CHILD, str(T), str(calls), "1" if fo else "0",
                          dump], cwd=root, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"child in {root} failed:\n{out.stderr}")
    if dump != "-":
        return None
    line = [x for x in out.stdout.splitlines() if x.startswith("TIMES ")][-1]
    return json.loads(line[6:])


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / max(1e-300, np.max(np.abs(a)) + np.max(np.abs(b))))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.ab_conv4_step")
    ap.add_argument("other")
    ap.add_argument("--T", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    other = os.path.abspath(args.other)
    name = f"conv4 {'FOMAML' if args.first_order else 'SO-MAML'} step, T = {args.T}"
    if args.check:
        with tempfile.TemporaryDirectory() as d:
            fa, fb = os.path.join(d, "a.npz"), os.path.join(d, "b.npz")
            _run(other, args.T, 0, args.first_order, fa)
            _run(here, args.T, 0, args.first_order, fb)
            a, b = np.load(fa), np.load(fb)
            print(f"{name}, float64: gradient rel_error {_rel(a['grad'], b['grad']):.2e}, "
                  f"query loss rel_error {_rel(a['loss'], b['loss']):.2e}")
    times = {"other": [], "this": []}
    ratios = []
    for _ in range(args.rounds):
        o = _run(other, args.T, args.calls, args.first_order)
        t = _run(here, args.T, args.calls, args.first_order)
        times["other"] += o
        times["this"] += t
        ratios.append(np.median(o) / np.median(t))
    for k in ("other", "this"):
        v = np.array(times[k]) * 1e3
        print(f"{name}, {k:5s} ({other if k == 'other' else here}): median {np.median(v):.1f} "
              f"ms CPU (min {v.min():.1f}, n = {v.size})")
    print(f"other / this, median of {args.rounds} per-round ratios: {np.median(ratios):.3f}x "
          f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
