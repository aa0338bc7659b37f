"""Peak memory of second-order MAML against the number of inner steps k (issue 8 point 4):
Omniglot Conv-4, 5-way 1-shot, 15 queries per class, meta-batch T = 4, metacore
(metacore.algorithms.maml.maml_gradient, exact second order through Hessian-vector products,
keeping the k (T, P) iterates and no graph) against PyTorch eager with create_graph=True
(torch_impl.conv4_maml, the timing table's implementation).

One fresh process per (framework, k):
    python -m bench.peers.memory FRAMEWORK K DATA
DATA holds the float32 inputs (inputs.npz, written by the runner). The child builds the
framework's meta-gradient call, runs it once at k = 1 (imports, Numba compilation, lazy
initialisation; never measured), drops the result, then measures one call at k:

    peak = VmHWM after the call - VmRSS just before it

with the high-water mark reset to the current RSS just before the call (writing 5 to
/proc/self/clear_refs, Linux >= 4.0). So it is the peak resident memory the call adds on top
of what the process already holds: everything it allocates, NumPy and PyTorch alike, and
the autograd graph, whatever allocator. glibc would keep freed heap memory resident (and
hide reuse); the runner sets MALLOC_MMAP_THRESHOLD_=65536 so that every block of 64 KiB or
more is its own mapping, returned to the system when freed. Where clear_refs cannot be
written the child falls back to ru_maxrss (the lifetime peak) minus the RSS before the
measured call, which can only over-state the call's peak (the warm-up's peak may be higher),
and says so in `method`.

Each child also returns the mean query loss, so the runner can check that both frameworks
computed the same function at every k (the float64 check of the timing table covers k = 1).
"""
import gc
import json
import os
import resource
import sys
import time

import numpy as np

KS = (1, 5, 10, 20)
CFG = dict(T=4, n_way=5, shots=1, queries=15, alpha=0.4)
FRAMEWORKS = ("metacore", "torch-eager")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_hwm():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _build(framework, k, inputs):
    from bench.peers import workloads as W
    cfg = dict(CFG, k=k)
    if framework == "metacore":
        return W.metacore_conv4(inputs, np.float32, k, cfg["alpha"], cfg["n_way"]), np.asarray
    from bench.peers import torch_impl
    torch_impl.setup_threads(1)
    return (torch_impl.conv4_maml("torch-eager", cfg, inputs),
            lambda o: o.detach().numpy())


def measure(framework, k, data):
    with np.load(os.path.join(data, "inputs.npz")) as f:
        inputs = {n: f[n] for n in f.files}
    warm, to_np = _build(framework, 1, inputs)
    warm()                                       # imports, compilation: not measured
    call, _ = _build(framework, k, inputs)
    del warm
    gc.collect()
    base = _status_kb("VmRSS")
    exact = _reset_hwm()
    t0 = time.perf_counter()
    out = call()
    wall = time.perf_counter() - t0
    if exact:
        peak = _status_kb("VmHWM")
        method = "VmHWM (reset by clear_refs) - VmRSS before the call"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        method = "ru_maxrss (lifetime peak) - VmRSS before the call: an upper bound"
    loss = float(np.mean(to_np(out[0])))
    return dict(framework=framework, k=k, ok=True, peak_bytes=(peak - base) * 1024,
                base_bytes=base * 1024, wall_s=wall, mean_query_loss=loss, method=method)


def main(argv):
    framework, k, data = argv
    try:
        res = measure(framework, int(k), data)
    except ImportError as err:
        res = dict(framework=framework, k=int(k), ok=False, error=f"not installed ({err})")
    print("RESULT " + json.dumps(res))


# ---------------------------------------------------------------- runner side
def run_all(python_for, data_dir, env, cpus, ks=KS, timeout=600):
    """-> {(framework, k): result}; python_for(framework) gives the interpreter."""
    import subprocess
    from bench.peers import workloads as W
    inputs = W.make_conv4(CFG)
    np.savez(os.path.join(data_dir, "inputs.npz"), **inputs)
    env = dict(env, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="131072")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = {}
    for k in ks:
        for fw in FRAMEWORKS:
            cmd = ["taskset", "-c", cpus, python_for(fw), "-m", "bench.peers.memory", fw,
                   str(k), data_dir]
            try:
                p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                   timeout=timeout)
                lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
                r = (json.loads(lines[-1][7:]) if lines else
                     dict(ok=False, error="crashed: " + " | ".join(
                         (p.stderr or p.stdout).strip().splitlines()[-3:])))
            except subprocess.TimeoutExpired:
                r = dict(ok=False, error=f"timed out after {timeout} s")
            out[(fw, k)] = r
            msg = (f"peak +{r['peak_bytes'] / 2**20:.1f} MiB ({r['wall_s']:.2f} s)"
                   if r.get("ok") else r.get("error"))
            print(f"memory conv4-maml-T{CFG['T']} k={k:<3d} {fw:12s} {msg}", flush=True)
    return out


def _slope(ks, ys):
    """Least-squares slope of ys against ks (bytes per step)."""
    ks, ys = np.asarray(ks, float), np.asarray(ys, float)
    return float(((ks - ks.mean()) * (ys - ys.mean())).sum() / ((ks - ks.mean()) ** 2).sum())


def report(results, ks=KS):
    """Markdown lines for BENCHMARKS.md."""
    from metacore.gradcheck import rel_error
    from metacore.models import conv4_maml
    P = conv4_maml(n_way=CFG["n_way"]).layout.size
    T = CFG["T"]
    unit = P * 4 * T
    mib = lambda b: f"{b / 2**20:.1f}"             # noqa: E731
    L = ["## Peak memory of second-order MAML against k", "",
         f"Omniglot Conv-4 (conv4_maml, P = {P:,}), 5-way 1-shot, 15 queries per class, "
         f"meta-batch T = {T}, alpha = {CFG['alpha']}, float32, 1 thread; one meta-gradient "
         "call at each k. `metacore` is metacore.algorithms.maml.maml_gradient (exact "
         "second order through Hessian-vector products, keeping the k (T, P) iterates, no "
         "graph), `torch-eager` the timing table's PyTorch eager loop with "
         "create_graph=True. Measured in a fresh process per (framework, k), after a "
         "warm-up call at k = 1 (imports, compilation): the peak resident memory the call "
         "adds, VmHWM after the call (the high-water mark reset through "
         "/proc/self/clear_refs just before it) minus VmRSS before it, with "
         "MALLOC_MMAP_THRESHOLD_=65536 so that glibc returns every freed block of 64 KiB "
         "or more. It counts everything the call allocates (NumPy, Numba, PyTorch, the "
         "autograd graph) at page granularity. MiB = 2^20 bytes. The last column compares "
         "the two frameworks' mean query losses at that k (rel_error); the float64 check "
         "of the timing table covers k = 1.", "",
         "| k | metacore peak MiB | torch-eager peak MiB | metacore / torch | "
         "loss agreement |", "|---|---|---|---|---|"]
    have = {fw: [(k, results[(fw, k)]["peak_bytes"]) for k in ks
                 if results.get((fw, k), {}).get("ok")] for fw in FRAMEWORKS}
    methods = set()
    for k in ks:
        cells = [str(k)]
        rs = [results.get((fw, k), {}) for fw in FRAMEWORKS]
        for r in rs:
            if r.get("ok"):
                cells.append(mib(r["peak_bytes"]))
                methods.add(r["method"])
            else:
                cells.append("failed: " + r.get("error", "not run")[:100])
        ok = all(r.get("ok") for r in rs)
        cells.append(f"{rs[0]['peak_bytes'] / rs[1]['peak_bytes']:.2f}"
                     if ok and rs[1]["peak_bytes"] > 0 else "-")
        cells.append(f"{rel_error(np.array([rs[0]['mean_query_loss']]), np.array([rs[1]['mean_query_loss']])):.1e}"
                     if ok else "-")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    if len(methods) > 1 or any("upper bound" in m for m in methods):
        L += ["Methods used: " + "; ".join(sorted(methods)) + ".", ""]
    for fw in FRAMEWORKS:
        pts = have[fw]
        if len(pts) >= 2:
            s = _slope(*zip(*pts))
            L.append(f"- `{fw}`: growth per inner step (least-squares slope over k = "
                     f"{', '.join(str(k) for k, _ in pts)}) {mib(s)} MiB = {s / unit:.2f} x "
                     f"P * 4 * T bytes ({mib(unit)} MiB, one float32 parameter vector per "
                     f"task).")
    L.append("")
    return L


if __name__ == "__main__":
    main(sys.argv[1:])
