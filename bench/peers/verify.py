"""Check every peer variant of a workload against metacore before anything is timed:

    python -m bench.peers.verify WORKLOAD [VARIANT ...]

Builds the float32 inputs, metacore's float32 result and the float64 ground truth, then runs
each PyTorch / JAX variant once (no timing) and prints, per output, rel_error = max|a - b| /
(max|a| + max|b|) against metacore float32 and against the float64 truth, and the first
call's wall time (compilation included). Pin it (taskset) and set the thread variables as
the runner does (runner.child_env) for a fair first-call time.
"""
import sys
import time

import numpy as np

from bench.peers import workloads as W


def main(argv):
    from metacore.gradcheck import rel_error
    w = W.WORKLOADS[argv[0]]
    variants = argv[1:] or list(w.peers)
    inputs = W.make_inputs(w)
    truth = W.truth(w, inputs)
    mine = tuple(np.asarray(o, np.float64) for o in W.metacore_call(w, "metacore", inputs)())
    print(f"{w.name}: metacore float32 vs float64: "
          + ", ".join(f"{n} {rel_error(a.reshape(b.shape), b):.1e}"
                      for n, a, b in zip(w.outputs, mine, truth)), flush=True)
    for v in variants:
        if v.startswith("torch"):
            from bench.peers import torch_impl as impl
        else:
            from bench.peers import jax_impl as impl
        impl.setup_threads(1)
        t0 = time.perf_counter()
        out = impl.to_numpy(impl.build(v, w, inputs)())
        first = time.perf_counter() - t0
        cells = []
        for n, a, m, t in zip(w.outputs, out, mine, truth):
            a = np.asarray(a, np.float64).reshape(t.shape)
            cells.append(f"{n}: vs metacore {rel_error(a, m):.1e}, vs float64 "
                         f"{rel_error(a, t):.1e}")
        print(f"  {v:22s} first call {first:7.2f} s; " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
