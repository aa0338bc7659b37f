#!/usr/bin/env bash
# One prepared check of metacore's CUDA kernels on a machine with one NVIDIA GPU, at most
# 8 minutes, ending in a short report:
#   1. tests/test_cuda_gpu.py       both device backends against reference/ (pytest)
#   2. scripts/gpu_sweep.py         device-vs-reference agreement sweep: every device kernel
#                                   (distances, ProtoNet loss, LRUA episode and step pairs),
#                                   both backends, float32 and float64, ugly and large shapes
#   3. bench/bench_cuda.py          device medians against plain CuPy (cuBLAS matmul
#                                   distances, einsum LRUA) and the Numba CPU kernels
#                                   (scripts/gpu_bench_report.py prints the table)
# Each part has its own time limit (LIM_* below; 450 s in all), so a hang in one still
# leaves the others' results and the whole stays under 8 minutes. Full logs go to $OUT.
#
# Usage: scripts/gpu_check.sh [--simulator]
#   PYTHON=...   the interpreter with the cuda extra (default: .venv/bin/python if present,
#                else python3); install with: pip install -e ".[test,cuda]"
#   OUT=...      where the logs and benchmark JSON go (default: gpu_check_out/)
# --simulator: no GPU needed, to check this script itself: the sweep runs under Numba's CUDA
#   simulator on small shapes (numba-cuda only), the GPU tests and the benchmark show how
#   they skip. Nothing it prints is a GPU result.
# Exit status: 0 all parts passed; 1 a part failed or timed out; 2 no usable GPU (without
# --simulator: nothing was run).
set -u
cd "$(dirname "$0")/.." || exit 1
SIM=0
if [ "${1:-}" = "--simulator" ]; then SIM=1; fi
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
# seconds: GPU tests, sweep, benchmark (episodic sizes and LRUA), benchmark (large size)
LIM_TESTS=110 LIM_SWEEP=150 LIM_BENCH=130 LIM_LARGE=60
if [ $SIM -eq 1 ]; then LIM_SWEEP=1800; fi   # the simulator: a Python thread per CUDA thread
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
STATUS=0

COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (no git here)")
if git rev-parse --git-dir >/dev/null 2>&1 && ! git diff --quiet HEAD 2>/dev/null; then
    COMMIT="$COMMIT (with uncommitted changes)"
fi
echo "== metacore gpu_check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
        2>&1 | sed 's/^/   gpu: /'
else
    echo "   nvidia-smi: not found"
fi
"$PYTHON" - <<'PY' 2>&1 | sed 's/^/   /'
import importlib, importlib.metadata as md, platform
vers = []
for dist in ("numpy", "numba", "numba-cuda", "cupy-cuda13x", "cuda-bindings"):
    try:
        vers.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        vers.append(f"{dist} MISSING")
print(f"python {platform.python_version()}; " + ", ".join(vers))
try:
    import cupy as cp
    rt, drv = cp.cuda.runtime.runtimeGetVersion(), cp.cuda.runtime.driverGetVersion()
    print(f"CUDA runtime {rt // 1000}.{rt % 1000 // 10}, driver supports "
          f"{drv // 1000}.{drv % 1000 // 10}, {cp.cuda.runtime.getDeviceCount()} device(s)")
except Exception as err:
    print(f"CuPy: {type(err).__name__}: {err}")
PY
# preflight: can the device backends run here? (the dispatch's own reasons if not)
"$PYTHON" - > "$OUT/preflight.log" 2>&1 <<'PY'
import sys
import metacore  # noqa: F401
from metacore.kernels import lrua
ok = []
for name in ("numba-cuda", "cupy"):
    try:
        lrua.require_backend("gpu_check", name)
        ok.append(name)
    except ImportError as err:
        print(f"not usable: {err}")
print("usable device backends: " + (", ".join(ok) or "none"))
sys.exit(0 if ok else 2)
PY
PRE=$?
sed 's/^/   /' "$OUT/preflight.log"
if [ $PRE -ne 0 ] && [ $SIM -eq 0 ]; then
    echo "== no usable GPU here: nothing run (scripts/gpu_check.sh --simulator checks the" \
         "script itself without one)"
    exit 2
fi

part() {  # part NAME LIMIT LOG CMD...: run with a time limit, say how it ended
    local name=$1 limit=$2 log=$3
    shift 3
    local t=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t ))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        echo "-- $name: TIMEOUT after ${took} s (limit ${limit} s); log $log"
        STATUS=1
    else
        echo "-- $name: exit $rc, ${took} s; log $log"
    fi
    return $rc
}

echo
if [ $SIM -eq 1 ]; then
    echo "== 1. tests/test_cuda_gpu.py (--simulator: without a GPU every test must skip)"
else
    echo "== 1. tests/test_cuda_gpu.py"
fi
part "GPU tests" $LIM_TESTS "$OUT/tests.log" \
    "$PYTHON" -m pytest -q -rs -p no:cacheprovider -p no:randomly tests/test_cuda_gpu.py
RC=$?
grep -E "^(SKIPPED|FAILED|ERROR)" "$OUT/tests.log" | cut -c1-220 | head -20 | sed 's/^/   /'
tail -n 1 "$OUT/tests.log" | sed 's/^/   /'
if [ $SIM -eq 0 ]; then
    if [ $RC -ne 0 ] || grep -q "skipped" <(tail -n 1 "$OUT/tests.log"); then STATUS=1; fi
elif [ $RC -ne 0 ] && [ $RC -ne 5 ]; then
    STATUS=1
fi

echo
echo "== 2. device-vs-reference sweep (scripts/gpu_sweep.py)"
if [ $SIM -eq 1 ]; then
    part "sweep" $LIM_SWEEP "$OUT/sweep.log" "$PYTHON" scripts/gpu_sweep.py --simulator
else
    part "sweep" $LIM_SWEEP "$OUT/sweep.log" "$PYTHON" scripts/gpu_sweep.py
fi
RC=$?
grep -E "^gpu_sweep: STOPPED" "$OUT/sweep.log" | sed 's/^/   /'
sed -n '/^worst error/,$p' "$OUT/sweep.log" | head -60 | sed 's/^/   /'
grep -E "^(SKIP|  skipped backend)" "$OUT/sweep.log" | sed 's/^/   /'
if [ $RC -ne 0 ]; then STATUS=1; fi

echo
echo "== 3. bench/bench_cuda.py (float32, inputs already on the device)"
part "benchmark (episodic, protonet, LRUA)" $LIM_BENCH "$OUT/bench.log" \
    "$PYTHON" -m pytest bench/bench_cuda.py --benchmark-only -q -rs -p no:cacheprovider \
    -k "not large" --benchmark-json="$OUT/bench.json"
RC1=$?
part "benchmark (large, Q = N = 4096, D = 256)" $LIM_LARGE "$OUT/bench_large.log" \
    "$PYTHON" -m pytest bench/bench_cuda.py --benchmark-only -q -rs -p no:cacheprovider \
    -k "large" --benchmark-json="$OUT/bench_large.json"
RC2=$?
for log in "$OUT/bench.log" "$OUT/bench_large.log"; do
    grep -E "^(SKIPPED|FAILED|ERROR)" "$log" | cut -c1-220 | head -5 | sed 's/^/   /'
done
if [ $SIM -eq 0 ]; then
    "$PYTHON" scripts/gpu_bench_report.py "$OUT/bench.json" "$OUT/bench_large.json"
    if [ $RC1 -ne 0 ] || [ $RC2 -ne 0 ]; then STATUS=1; fi
else
    echo "   (--simulator: no GPU, so no benchmark rows)"
fi

echo
if [ $SIM -eq 1 ]; then
    echo "== gpu_check --simulator done in $(elapsed) s: status $STATUS (script check only;" \
         "nothing above ran on a GPU)"
else
    echo "== gpu_check done in $(elapsed) s: $([ $STATUS -eq 0 ] && echo PASS || echo FAIL)"
fi
exit $STATUS
