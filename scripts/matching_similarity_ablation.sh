#!/usr/bin/env bash
# Matching Nets similarity ablation at an equal training budget (issue 16, item 1):
# {support_cosine, cosine, scaled_cosine with a learned scale starting at 10} x {FCE, no FCE},
# EPISODES training episodes each (5-way 1-shot, 5 queries/class: the method's defaults),
# run one at a time on one core, then 5-way 1-shot evaluation on the Vinyals test
# characters (600 episodes, `metacore eval`) and on the validation characters (600
# episodes, same protocol, for the val column). Results: docs/RESULTS_METRIC.md.
#   usage: scripts/matching_similarity_ablation.sh [EPISODES] [OUT_ROOT] [CORE]
set -euo pipefail
EPISODES=${1:-800}
ROOT=${2:-runs/matching_ablation}
CORE=${3:-1}
VAL=${4:-100}
export OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1
mkdir -p "$ROOT"
for fce in true false; do
  for form in support_cosine cosine scaled_cosine; do
    extra=()
    [ "$form" = scaled_cosine ] && extra=(--set learn_scale=true --set cosine_scale=10)
    out="$ROOT/${form}_fce-${fce}"
    if [ ! -s "$out.eval.txt" ]; then
    t0=$(date +%s.%N)
    taskset -c "$CORE" python -m metacore train matching --task omniglot --out "$out" \
      --iterations "$EPISODES" --eval-every "$EPISODES" --log-every 50 --no-progress \
      --set similarity="$form" --set fce="$fce" "${extra[@]}" > "$out.train.log" 2>&1
    t1=$(date +%s.%N)
    echo "$form fce=$fce wall_s=$(echo "$t1 - $t0" | bc)" >> "$ROOT/walltimes.txt"
    taskset -c "$CORE" python -m metacore eval "$out" --tasks 600 --way 5 --shots 1 \
      > "$out.eval.tmp" 2>&1 && mv "$out.eval.tmp" "$out.eval.txt"
    fi
    [ -s "$out.val.txt" ] && continue
    taskset -c "$CORE" python - "$out" "$VAL" > "$out.val.txt" 2>&1 <<'PY'
import sys
from metacore.training import load_run
cfg, method, params, meta = load_run(sys.argv[1])
n = int(sys.argv[2])
r = method.episodes_accuracy(params, "val", 5, 1, 15, n, cfg["seed"] + 2, "running")
print(f"val 5-way 1-shot {n} episodes: {100 * r['accuracy']:.2f} +- {100 * r['ci95']:.2f} %")
PY
  done
done
