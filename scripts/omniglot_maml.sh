#!/usr/bin/env bash
# Omniglot 5-way 1-shot MAML as Finn et al. 2017 (conv4_maml, meta-batch 32, alpha 0.4, one
# inner step in training, three at test, Adam 1e-3, float32). The paper trains 60,000
# iterations; ITER sets a shorter budget. One BLAS thread: on a small shared machine
# OpenBLAS's threads spin against each other and make the batched GEMMs up to 30x slower.
# Usage: ITER=2000 ALGO=maml scripts/omniglot_maml.sh   (rerun to resume)
set -euo pipefail
cd "$(dirname "$0")/.."
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
ITER=${ITER:-60000}
ALGO=${ALGO:-maml}
dir=runs/omniglot_${ALGO}_5w1s
t0=$(date +%s)
python -m metacore train "$ALGO" --task omniglot --out "$dir" --iterations "$ITER" \
    --ckpt-every 50 --eval-every 250 --eval-tasks 32 --log-every 10 --no-progress \
    $( [ -f "$dir/checkpoint.npz" ] && echo --resume )
echo "$ALGO wall_s $(( $(date +%s) - t0 ))" | tee -a runs/omniglot_walltime.txt
python -m metacore eval "$dir" --tasks 600 --steps 10 --bn both --json "$dir/eval.json"
