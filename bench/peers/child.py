"""One measurement in its own process: python -m bench.peers.child FRAMEWORK WORKLOAD DATA THREADS BUDGET

Loads the workload's float32 inputs and float64 ground truth from DATA (written by the
runner), builds the framework's call, runs it once (compilation, caches), checks every
output against the truth (rel_error <= the workload's tolerance), and only then times it:
at least 5 timed calls and as many as fit in BUDGET seconds, median reported. Prints one
JSON line. Thread settings come from the environment the runner sets (and taskset).
"""
import json
import os
import sys
import time

import numpy as np


def _framework(name):
    if name.startswith("torch"):
        from bench.peers import torch_impl as impl
    elif name.startswith("jax"):
        from bench.peers import jax_impl as impl
    else:
        impl = None
    return impl


def measure(framework, wname, data, threads, budget, max_calls):
    """One round: check the result, then time calls until `budget` seconds have passed
    (at least 5, at most max_calls). -> a dict with every call's time in `times`."""
    from bench.peers import workloads as W
    from metacore.gradcheck import rel_error
    w = W.WORKLOADS[wname]
    with np.load(os.path.join(data, "inputs.npz")) as f:
        inputs = {k: f[k] for k in f.files}
    with np.load(os.path.join(data, "truth.npz")) as f:
        truth = [f[f"out{i}"] for i in range(len(f.files))]
    impl = _framework(framework)
    if impl is None:
        import numba
        numba.set_num_threads(threads)
        call = W.metacore_call(w, framework, inputs, threads=threads)
        to_numpy = lambda out: tuple(np.asarray(o) for o in out)  # noqa: E731
    else:
        impl.setup_threads(threads)
        call = impl.build(framework, w, inputs)
        to_numpy = impl.to_numpy
    t0 = time.perf_counter()
    out = to_numpy(call())                       # first call: compilation, never timed
    first = time.perf_counter() - t0
    errors = []
    for name, got, want in zip(w.outputs, out, truth):
        got = np.asarray(got, np.float64).reshape(want.shape)
        errors.append(rel_error(got, want))
    worst = max(errors)
    result = dict(framework=framework, workload=wname, threads=threads, first_call_s=first,
                  check_rel_error=worst, tol=w.tol)
    if not worst <= w.tol:
        result.update(ok=False, error=f"result differs from the float64 truth: rel_error "
                      f"{dict(zip(w.outputs, errors))} > {w.tol}")
        return result
    call()                                       # second warm-up call
    # METACORE_BENCH_CLOCK=cpu (runner --clock cpu): each call's CPU time of this process
    # (time.process_time, all its threads) in place of wall time; on a shared core the wall
    # time counts the other processes' slices, the CPU time only this one's
    clock = time.process_time if os.environ.get("METACORE_BENCH_CLOCK") == "cpu" \
        else time.perf_counter
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < max_calls):
        t0 = clock()
        call()
        times.append(clock() - t0)
    result.update(ok=True, median_s=float(np.median(times)), min_s=float(np.min(times)),
                  repeats=len(times), times=times)
    return result


def main(argv):
    framework, wname, data, threads, budget, max_calls = argv
    try:
        res = measure(framework, wname, data, int(threads), float(budget), int(max_calls))
    except ImportError as err:
        res = dict(framework=framework, workload=wname, threads=int(threads), ok=False,
                   error=f"not installed ({err})")
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
