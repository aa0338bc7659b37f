#!/usr/bin/env bash
# Finn et al. 2017 sinusoid runs (70,000 iterations, meta-batch 25, Adam 1e-3, alpha 0.01,
# one inner step), one per K, plus the pretrained baseline at K = 10; each evaluated on 600
# test tasks at 0..10 steps. Output under runs/ (git-ignored). Usage: scripts/sinusoid_runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ITER=${ITER:-70000}
run() {   # name, then train arguments
    local name=$1; shift
    local dir=runs/sinusoid_$name
    local t0=$(date +%s)
    python -m metacore train "$@" --task sinusoid --out "$dir" --iterations "$ITER" \
        --no-progress $( [ -f "$dir/checkpoint.npz" ] && echo --resume )
    echo "$name wall_s $(( $(date +%s) - t0 ))" | tee -a runs/sinusoid_walltime.txt
    python -m metacore eval "$dir" --tasks 600 --steps 10 --json "$dir/eval.json"
}
run maml_k10 maml --shots 10
run pretrain_k10 pretrain --shots 10
run maml_k5 maml --shots 5
run maml_k20 maml --shots 20
