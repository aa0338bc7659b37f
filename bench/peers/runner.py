"""Runs every (workload, thread count, framework) measurement in its own process pinned with
taskset to the same cores, and writes BENCHMARKS.md.

Each child gets the same float32 inputs and float64 ground truth (saved once per workload),
the thread count in every library's environment variable (OMP, OpenBLAS, MKL, Numba, XLA)
and `taskset -c 0` (1 thread) or `taskset -c 0,1` (2 threads), because XLA and PyTorch start
threads beyond their settings.

With --memory (the default of the full run) it then runs bench/peers/memory.py: the peak
memory of second-order MAML against k, one fresh process per (framework, k), reported in its
own section after the timing tables.
"""
import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from bench.peers import workloads as W

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEERS = ("torch-eager", "torch-func", "jax")
JAX_CACHE = None     # set in main: a persistent XLA compilation cache for the run
CPUS = None          # --cpus: the cores every child is pinned to (default: 0, 0-1, ...)


def is_peer(f):
    """A PyTorch or JAX row (run with --python), whichever variant."""
    return f.startswith(("torch", "jax"))


def child_env(threads):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS", "VECLIB_MAXIMUM_THREADS"):
        env[var] = str(threads)
    flags = f"--xla_cpu_multi_thread_eigen={'false' if threads == 1 else 'true'}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    env["JAX_PLATFORMS"] = "cpu"
    if JAX_CACHE and "JAX_COMPILATION_CACHE_DIR" not in os.environ:   # later rounds load the compiled program (never timed anyway)
        env["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # the same allocator settings for every framework: freed memory stays in the process
    # (what metacore's CLI does through metacore.malloc), unless the caller set them
    for var, value in (("MALLOC_MMAP_THRESHOLD_", "33554432"),
                       ("MALLOC_TRIM_THRESHOLD_", "268435456")):
        env.setdefault(var, value)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def cpus_for(threads):
    if CPUS:
        return CPUS
    n = os.cpu_count() or 1
    return ",".join(str(i) for i in range(min(threads, n)))


def run_child(python, framework, wname, data, threads, budget, timeout, max_calls=2000):
    cmd = ["taskset", "-c", cpus_for(threads), python, "-m", "bench.peers.child", framework,
           wname, data, str(threads), str(budget), str(max_calls)]
    if shutil.which("taskset") is None:
        cmd = cmd[3:]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=child_env(threads), capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(framework=framework, workload=wname, threads=threads, ok=False,
                    error=f"timed out after {timeout} s")
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return dict(framework=framework, workload=wname, threads=threads, ok=False,
                error="crashed: " + " | ".join(tail))


def merge_rounds(parts):
    """One row from a framework's rounds: the median and minimum over every round's calls.
    A failed round fails the row."""
    bad = [r for r in parts if not r.get("ok")]
    if bad:
        return bad[0]
    times = [t for r in parts for t in r["times"]]
    row = {k: v for k, v in parts[0].items() if k != "times"}
    row.update(median_s=float(np.median(times)), min_s=float(np.min(times)),
               repeats=len(times), rounds=len(parts),
               check_rel_error=max(r["check_rel_error"] for r in parts))
    return row


def measure_interleaved(frameworks, run, budget, rounds, min_rounds=1):
    """Time each framework in up to `rounds` rounds of budget / rounds seconds each, every
    round a fresh process, round 1 of every framework, then round 2, and so on: a framework
    takes another round while its timed calls so far add up to less than `budget` seconds
    (a slow one, whose 5-call minimum fills the budget, has one round). On this VM a core
    runs in phases of a few hundred milliseconds to seconds (one and the same process takes
    about 210 or about 320 us per sinusoid MAML call), so measuring each framework in one
    stretch of time can put them in different phases; interleaving spreads every framework
    over the same stretch. min_rounds: every framework takes at least this many rounds (a
    loaded machine makes even the fast ones fill the budget in one round).
    run(framework, budget, max_calls) -> a child's result dict.
    -> {framework: merged row}."""
    parts = {f: [] for f in frameworks}
    for rnd in range(rounds):
        for f in frameworks:
            done = parts[f]
            if rnd > 0 and (not done or not all(r.get("ok") for r in done)
                            or (rnd >= min_rounds
                                and sum(sum(r["times"]) for r in done) >= budget)):
                continue
            done.append(run(f, budget / rounds, max(5, 2000 // rounds)))
    return {f: merge_rounds(p) for f, p in parts.items()}


def installed(python, module):
    if python == sys.executable:
        return importlib.util.find_spec(module) is not None
    r = subprocess.run([python, "-c", f"import importlib.util as u, sys; "
                        f"sys.exit(u.find_spec({module!r}) is None)"], capture_output=True)
    return r.returncode == 0


# ---------------------------------------------------------------- machine and imports
def machine_info():
    info = {"python": platform.python_version(), "numpy": np.__version__,
            "cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
                if line.startswith("flags") and "avx512f" in line:
                    info["avx512"] = True
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
    try:
        import numba
        info["numba"] = numba.__version__
    except ImportError:
        info["numba"] = "not installed"
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = "; ".join(f"{d.get('internal_api')} {d.get('version')} "
                                 f"({d.get('architecture', '?')}, {d.get('filepath', '').split('/')[-1]})"
                                 for d in threadpool_info() if d.get("user_api") == "blas")
    except ImportError:
        cfg = np.show_config(mode="dicts") if hasattr(np, "show_config") else {}
        blas = cfg.get("Build Dependencies", {}).get("blas", {}) if cfg else {}
        info["blas"] = f"{blas.get('name', '?')} {blas.get('version', '')}"
    return info


def import_cost(python, module, dist_dirs, repeats=5):
    """Median wall time of `import module` in a fresh process (pinned to one core), and
    the size on disk of the package folders."""
    if not installed(python, module):
        return None
    code = (f"import time; t = time.perf_counter(); import {module}; "
            f"print(time.perf_counter() - t)")
    times = []
    for _ in range(repeats):
        r = subprocess.run(["taskset", "-c", cpus_for(1), python, "-c", code], cwd=ROOT,
                           env=child_env(1), capture_output=True, text=True)
        times.append(float(r.stdout.strip().splitlines()[-1]))
    loc = subprocess.run([python, "-c", f"import importlib.util as u; "
                          f"print(u.find_spec({module!r}).submodule_search_locations[0])"],
                         cwd=ROOT, env=child_env(1), capture_output=True, text=True)
    base = os.path.dirname(loc.stdout.strip())
    size = 0
    for d in dist_dirs:
        for dirpath, _, files in os.walk(os.path.join(base, d)):
            size += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files
                        if not os.path.islink(os.path.join(dirpath, f)))
    return float(np.median(times)), size


def fma_peak():
    """{"float32": GFLOP/s, "float64": GFLOP/s} of one core (bench/peers/roofline.py, in a
    child pinned to core 0), or None if it could not run."""
    cmd = ["taskset", "-c", cpus_for(1), sys.executable, "-m", "bench.peers.roofline"]
    if shutil.which("taskset") is None:
        cmd = cmd[3:]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=child_env(1), capture_output=True, text=True,
                           timeout=300)
        return json.loads(p.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        return None


def roofline_line(w, rows, threads_list, fl, peak):
    """The FMA roofline (FLOP count / measured peak of the cores used) per thread count,
    and how many times it the fastest metacore variant's median is."""
    if not peak:
        return "FMA roofline: the peak measurement did not run."
    parts = []
    for t in threads_list:
        roof = fl / (peak["float32"] * 1e9 * t)
        ok = [rows[(f, t)]["median_s"] for f in w.metacore if rows.get((f, t), {}).get("ok")]
        tail = f", metacore at {min(ok) / roof:.1f}x it" if ok else ""
        parts.append(f"{t} thread{'s' * (t > 1)}: {fmt_t(roof)}{tail}")
    return ("FMA roofline (the FLOP count at the measured float32 peak of "
            f"{peak['float32']:.1f} GFLOP/s per core): " + "; ".join(parts) + ".")


# ---------------------------------------------------------------- report
def fmt_t(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3f} ms"
    return f"{s:.2f} s"


def table(w, rows, threads_list, frameworks):
    """One markdown table: a row per framework, per thread count its median, GFLOP/s and
    the best metacore variant's speed-up over it. Baselines (w.baselines, e.g. NumPy-BLAS)
    are compared rows like the peers, never counted as metacore variants."""
    fl = W.flops(w)
    head = "| framework |" + "".join(f" {t} thread{'s' * (t > 1)}: median | GFLOP/s |"
                                    f" metacore speed-up |" for t in threads_list)
    sep = "|---|" + "---|---|---|" * len(threads_list)
    lines = [head, sep]
    best = {}
    for t in threads_list:
        ok = [rows[(f, t)]["median_s"] for f in w.metacore if rows.get((f, t), {}).get("ok")]
        best[t] = min(ok) if ok else None
    for f in frameworks:
        cells = [f"`{f}`"]
        for t in threads_list:
            r = rows.get((f, t))
            if r is None:
                cells += ["not run", "", ""]
            elif not r.get("ok"):
                cells += [r.get("error", "failed").split("(")[0].strip()
                          if r.get("error", "").startswith("not installed")
                          else "failed: " + r.get("error", "")[:120], "", ""]
            else:
                m = r["median_s"]
                sp = (f"{m / best[t]:.2f}x" if best[t] else "-") \
                    if f not in w.metacore else "(metacore)"
                cells += [f"{fmt_t(m)} (min {fmt_t(r['min_s'])}, n={r['repeats']})",
                          f"{fl / m / 1e9:.1f}", sp]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), fl


def write_report(path, args, argv, info, load_before, load_after, results, imports, elapsed,
                 memory=None):
    L = ["# metacore benchmarks against PyTorch and JAX", "",
         "Generated by `python -m bench " + " ".join(argv) + "` (bench/peers/); every cell "
         "below was measured by that command in one run. Do not edit by hand.", "",
         "## Machine", "",
         f"- CPU: {info.get('cpu')}, {info['cores']} cores visible"
         f"{', AVX-512' if info.get('avx512') else ''}",
         f"- BLAS (NumPy, via threadpoolctl): {info.get('blas')}",
         f"- Python {info['python']}, NumPy {info['numpy']}, Numba {info['numba']}, "
         f"{args.peer_versions}",
         f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after}. The "
         "machine is shared, so times are noisy; ratios are of medians measured in the same "
         "run, each framework in its own process pinned with taskset to the same cores "
         + (f"(core list {CPUS}, given by --cpus)." if CPUS else
            "(core 0 for 1 thread, cores 0-1 for 2 threads)."),
         "- FMA peak of one core, measured (bench/peers/roofline.py: 12 independent "
         "256-bit fused multiply-add chains, pinned to core " + cpus_for(1) + "): " + (
             f"{info['peak']['float32']:.1f} GFLOP/s float32, "
             f"{info['peak']['float64']:.1f} GFLOP/s float64" if info.get("peak")
             else "not measured") + ". Each table's roofline is its FLOP count at this "
         "peak (times the thread count).",
         f"- Wall time of the whole run: {elapsed / 60:.1f} min.", "",
         "## Method", "",
         "Every framework computes the same float32 function of the same inputs. Before "
         "anything is timed, each output is compared with a float64 ground truth (metacore's "
         "NumPy path in float64, itself checked against central finite differences by the "
         "test suite): rel_error = max|a - b| / (max|a| + max|b|) must be within the "
         "workload's float32 tolerance (printed in each table as `check`). Then one more "
         "warm-up call, then at least 5 timed calls (as many as fit in "
         f"{args.budget} s), median reported; `n` is the number of timed calls. The calls are "
         f"taken in up to {args.rounds} rounds of {args.budget / args.rounds:.2f} s, each a "
         "fresh process, interleaved across the frameworks (round 1 of every framework, "
         "then round 2, ...), while a framework's timed calls add up to less than "
         f"{args.budget} s; median and minimum are over all its rounds. Why: a core of this "
         "VM runs in phases of a few hundred ms to seconds in which the same process is about "
         "1.5x slower, and one stretch per framework can put two frameworks in different "
         "phases. Threads: "
         "OMP/OpenBLAS/MKL/Numba thread variables set to the count, "
         "`torch.set_num_threads`, XLA's Eigen pool off for 1 thread. Speed-up = the "
         "framework's median / the fastest metacore variant's median (> 1: metacore is "
         "faster); baselines that are not metacore (`numpy-blas`, the distance tables' "
         "NumPy BLAS expansion) are compared rows like the peers. GFLOP/s = the stated FLOP count / the median. The minimum is shown "
         "beside each median because on a loaded machine it is the better estimate of "
         "the unloaded time; ratios use medians."
         + (" Clock: every call is timed by the child's CPU time (time.process_time, --clock "
            "cpu), not wall time, because the core was shared with other work."
            if os.environ.get("METACORE_BENCH_CLOCK") == "cpu" else "")
         + (f" At least {args.min_rounds} rounds per framework (--min-rounds)."
            if getattr(args, "min_rounds", 1) > 1 else ""), ""]
    if imports:
        L += ["## Import time and installed size", "",
              "| package | `import` (median of 5, fresh process, 1 core) | installed size |",
              "|---|---|---|"]
    for name, v in imports.items():
        L.append(f"| {name} | " + ("not installed | - |" if v is None else
                                   f"{fmt_t(v[0])} | {v[1] / 2**20:.1f} MiB |"))
    if imports:
        L.append("")
    for wname, (w, rows) in results.items():
        frameworks = [f for f in list(w.metacore) + list(w.baselines) + list(w.peers)
                      if any((f, t) in rows for t in args.threads)]
        tab, fl = table(w, rows, args.threads, frameworks)
        checks = ", ".join(f"{f} {r['check_rel_error']:.1e}" for (f, t), r in rows.items()
                           if t == args.threads[0] and "check_rel_error" in r)
        L += [f"## {w.title}", "", w.note, "",
              f"FLOP count: {fl:,} ({fl / 1e6:.2f} MFLOP) per call. Check (rel_error against "
              f"float64, tolerance {w.tol:g}): {checks}.", "",
              roofline_line(w, rows, args.threads, fl, info.get("peak")), "", tab, ""]
    if memory is not None:                       # the optional section (--memory), not timed
        from bench.peers import memory as MEM
        L += MEM.report(memory, args.memory_k)
    with open(path, "w") as f:
        f.write("\n".join(L))


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench",
                                description="metacore against PyTorch and JAX; writes BENCHMARKS.md")
    p.add_argument("--quick", action="store_true",
                   help="the quick subset, 1 thread only, shorter timing budget")
    p.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 2")
    p.add_argument("--only", nargs="+", default=None, help="workload names (see --list)")
    p.add_argument("--list", action="store_true")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per measurement (default 2, quick 0.5)")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds per measurement (default 3; see "
                        "measure_interleaved)")
    p.add_argument("--python", default=sys.executable,
                   help="interpreter for the peer frameworks (one with torch and jax)")
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--frameworks", nargs="+", default=None,
                   help="only these rows (metacore variants, baselines, peer variants) of each "
                        "workload")
    p.add_argument("--min-rounds", type=int, default=1,
                   help="every framework takes at least this many interleaved rounds")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: time each call by the child's CPU time (time.process_time), for "
                        "a core shared with other work")
    p.add_argument("--no-imports", dest="imports", action="store_false",
                   help="skip the import-time section")
    p.add_argument("--cpus", default=None,
                   help="taskset core list for every child (e.g. 1 on a machine whose core 0 "
                        "is busy); default core 0 for 1 thread, cores 0-1 for 2")
    p.add_argument("--memory", action="store_true", default=None,
                   help="also measure the peak memory of second-order MAML against k "
                        "(bench/peers/memory.py); on by default in the full run, off with "
                        "--quick or --only")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--memory-only", action="store_true",
                   help="only the memory section, no timed workloads")
    p.add_argument("--memory-k", type=int, nargs="+", default=None,
                   help="inner-step counts of the memory section (default 1 5 10 20)")
    args = p.parse_args(argv)
    if args.memory_only:
        args.memory = True
    if args.memory is None:
        args.memory = not (args.quick or args.only)
    if args.memory_k is None:
        from bench.peers.memory import KS
        args.memory_k = list(KS)
    if args.threads is None:
        args.threads = [1] if args.quick else [1, 2]
    if args.budget is None:
        args.budget = 0.5 if args.quick else 2.0
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    global CPUS
    CPUS = args.cpus
    if args.clock == "cpu":
        os.environ["METACORE_BENCH_CLOCK"] = "cpu"
    if args.list:
        for w in W.WORKLOADS.values():
            print(f"{w.name:32s} {'quick ' if w.quick else '      '}{w.title}")
        return 0
    names = args.only or [n for n, w in W.WORKLOADS.items() if w.quick or not args.quick]
    if args.memory_only:
        names = []
    unknown = [n for n in names if n not in W.WORKLOADS]
    if unknown:
        raise SystemExit(f"python -m bench: unknown workload(s) {unknown}; see --list")
    start = time.perf_counter()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    have = {"torch": installed(args.python, "torch"), "jax": installed(args.python, "jax")}
    vers = []
    for m in ("torch", "jax"):
        if have[m]:
            r = subprocess.run([args.python, "-c", f"import {m}; print({m}.__version__)"],
                               capture_output=True, text=True, env=child_env(1))
            vers.append(f"{m} {r.stdout.strip()}")
        else:
            vers.append(f"{m} not installed")
    args.peer_versions = ", ".join(vers)
    info = machine_info()
    info["peak"] = fma_peak()
    # imports first, so that a partial page (an interrupted run) has them too
    imports = {} if not args.imports else {
        "metacore": import_cost(sys.executable, "metacore", ["metacore", "kernels", "reference"]),
        "torch": import_cost(args.python, "torch", ["torch"]) if have["torch"] else None,
        "jax": import_cost(args.python, "jax", ["jax", "jaxlib"]) if have["jax"] else None}
    results = {}
    with tempfile.TemporaryDirectory(prefix="metacore-bench-") as tmp:
        global JAX_CACHE
        JAX_CACHE = os.path.join(tmp, "jax-cache")
        for name in names:
            w = W.WORKLOADS[name]
            data = os.path.join(tmp, name)
            os.makedirs(data)
            inputs = W.make_inputs(w)
            np.savez(os.path.join(data, "inputs.npz"), **inputs)
            np.savez(os.path.join(data, "truth.npz"),
                     **{f"out{i}": o for i, o in enumerate(W.truth(w, inputs))})
            rows = {}
            for t in args.threads:
                present = []
                for f in list(w.metacore) + list(w.baselines) + list(w.peers):
                    if args.frameworks and f not in args.frameworks:
                        continue
                    if is_peer(f) and not have["torch" if f.startswith("torch") else "jax"]:
                        rows[(f, t)] = dict(ok=False, error="not installed")
                    else:
                        present.append(f)

                def run(f, budget, max_calls, t=t, name=name, data=data):
                    py = sys.executable if not is_peer(f) else args.python
                    return run_child(py, f, name, data, t, budget, args.timeout, max_calls)

                for f, r in measure_interleaved(present, run, args.budget, args.rounds,
                                                args.min_rounds).items():
                    rows[(f, t)] = r
                    msg = (f"{fmt_t(r['median_s'])} (check {r['check_rel_error']:.1e}, "
                           f"{r['rounds']} rounds)" if r.get("ok") else r.get("error"))
                    print(f"{name:30s} {t}t {f:15s} {msg}", flush=True)
            results[name] = (w, rows)
            # a partial page after every workload, so that an interrupted run leaves one
            write_report(args.out, args, argv, info, load_before, "(run in progress)",
                         results, imports, time.perf_counter() - start)
        memory = None
        if args.memory:
            from bench.peers import memory as MEM
            data = os.path.join(tmp, "memory")
            os.makedirs(data)
            memory = MEM.run_all(
                lambda f: sys.executable if not is_peer(f) else args.python, data,
                child_env(1), cpus_for(1), args.memory_k, args.timeout)
    load_after = " ".join(f"{x:.2f}" for x in os.getloadavg())
    write_report(args.out, args, argv, info, load_before, load_after, results, imports,
                 time.perf_counter() - start, memory)
    print(f"wrote {args.out}")
    return 0
