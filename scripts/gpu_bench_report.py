#!/usr/bin/env python
"""Short table of bench/bench_cuda.py's results from pytest-benchmark JSON files (the
--benchmark-json output), for scripts/gpu_check.sh.

Run: python scripts/gpu_bench_report.py RESULTS.json [MORE.json ...]

One line per device row (backends 'numba-cuda' and 'cupy'; the 'plain' CuPy rows are the
baseline inside them): the op and size, the device median in microseconds, and the ratios
that bench_cuda.py stores in extra_info: time / plain CuPy time (time_over_plain), time /
Numba CPU time (time_over_numba_cpu; below 1 the device kernel is faster), GFLOP/s and
GB/s (formulas in bench/bench_cuda.py's docstring). A missing file or an empty one is
reported, not an error: a benchmark part that timed out writes none.
"""
import json
import os
import re
import sys


def rows(paths):
    out, missing = [], []
    for path in paths:
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            missing.append(path)
            continue
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        machine = data.get("machine_info", {})
        for b in data.get("benchmarks", []):
            m = re.match(r"test_bench_(\w+)\[(.*)\]", b["name"])
            if not m:
                continue
            params = b.get("params") or {}
            backend = params.get("backend", m.group(2).split("-")[0])
            if backend == "plain":
                continue
            what = m.group(1) + " " + params.get("op", "")
            if "size" in params:
                what += " " + params["size"]
            out.append((what.strip(), backend, b["stats"]["median"], b.get("extra_info", {}),
                        machine))
    return out, missing


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main(paths):
    got, missing = rows(paths)
    for p in missing:
        print(f"  (no benchmark results in {p}: that part did not finish)")
    if not got:
        print("  no benchmark rows")
        return 1
    threads = {r[3].get("numba_cpu_threads") for r in got} - {None}
    cpu = got[0][4].get("cpu", {}).get("brand_raw", "?")
    print(f"  medians; x plain = time / plain CuPy time, x cpu = time / Numba CPU time "
          f"({cpu}, {', '.join(map(str, sorted(threads))) or '?'} threads); below 1 the "
          f"device kernel is faster")
    width = max(len(r[0]) for r in got)
    print(f"  {'op':<{width}}  {'backend':<10} {'median us':>10} {'x plain':>8} "
          f"{'x cpu':>8} {'GFLOP/s':>8} {'GB/s':>7}")
    for what, backend, med, extra, _ in sorted(got, key=lambda r: (r[0], r[1])):
        print(f"  {what:<{width}}  {backend:<10} {med * 1e6:>10.1f} "
              f"{fmt(extra.get('time_over_plain'), '.3f'):>8} "
              f"{fmt(extra.get('time_over_numba_cpu'), '.3f'):>8} "
              f"{fmt(extra.get('gflops'), '.1f'):>8} {fmt(extra.get('gbs'), '.1f'):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
