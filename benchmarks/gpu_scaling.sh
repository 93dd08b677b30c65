#!/usr/bin/env bash
# The GPU measurements of docs/scaling.md, for a lent GPU machine (the
# `device` tool: run from the repository root, results under $OUT). A lent
# machine gives at most 10 minutes per command and about 15 in all, so the
# work comes in parts, one command each, every step with its own timeout:
#   bash benchmarks/gpu_scaling.sh inference   # ~3 min: WRN50-2 (random
#       weights) at 224 px, float32 and bfloat16 backbones, batch 64 and 256
#       (images/s) and batch 1 (latency p50/p99 over 200 calls)
#   bash benchmarks/gpu_scaling.sh together    # <= 9 min: the MVTec-AD-shaped
#       workload (15 categories, 160 passes, train + threshold + evaluation),
#       all 15 heads stepped together (train.categories_per_step=15)
#   bash benchmarks/gpu_scaling.sh alone [P]   # <= 9 min: the same one
#       category at a time, P passes (default 20; scale the training stage
#       by 160 / P to compare: a full K=1 run does not fit one command)
#   bash benchmarks/gpu_scaling.sh all [P]     # <= 9.7 min, one command:
#       inference at batch 256 (float32, bfloat16), the full workload with
#       K=15, then K=1 at P passes (default 40) with what time is left; every
#       stage logs as it ends (run.log), so a cut-off stage still reports
# Needs jax with CUDA: pip install -r requirements.txt "jax[cuda12]".
set -uo pipefail
OUT=${OUT:-runs/gpu_scaling}
PART=${1:-inference}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ nvidia-smi; python -c 'import jax, flax, optax, orbax.checkpoint as o
print("jax", jax.__version__, jax.devices())
print("flax", flax.__version__, "optax", optax.__version__)' ; python -m pip \
  show orbax-checkpoint 2>/dev/null | head -2; } > "$OUT/env.txt" 2>&1
case "$PART" in
  all)
    passes=${2:-40}
    start=$SECONDS
    for dtype in float32 bfloat16; do
      timeout 65 python -m simplenet_jax.bench --image-size 224 --batch 256 \
        --backbone-dtype "$dtype" --train-images 256 --latency 100 \
        --repeats 3 --json "$OUT/bench_${dtype}.json" >> "$OUT/run.log" 2>&1
      echo "bench $dtype exit $? at $((SECONDS - start)) s" >> "$OUT/run.log"
    done
    python -m simplenet_jax.bench --merge "$OUT"/bench_*.json \
      > "$OUT/bench_table.md" 2>&1
    timeout 270 python benchmarks/mvtec_workload.py --categories-per-step 15 \
      --eval-batch 64 --workers 16 --json "$OUT/workload_k15.json" \
      >> "$OUT/run.log" 2>&1
    echo "k15 exit $? at $((SECONDS - start)) s" >> "$OUT/run.log"
    left=$((570 - (SECONDS - start)))
    timeout "$left" python benchmarks/mvtec_workload.py \
      --categories-per-step 1 --passes "$passes" --eval-batch 64 \
      --workers 16 --json "$OUT/workload_k1_p${passes}.json" \
      >> "$OUT/run.log" 2>&1
    echo "k1 exit $? at $((SECONDS - start)) s" >> "$OUT/run.log"
    ;;
  inference)
    for dtype in float32 bfloat16; do
      for batch in 64 256; do
        timeout 170 python -m simplenet_jax.bench --image-size 224 \
          --batch "$batch" --backbone-dtype "$dtype" --train-images 256 \
          --latency 200 --json "$OUT/bench_${dtype}_b${batch}.json" \
          > "$OUT/bench_${dtype}_b${batch}.log" 2>&1
      done
    done
    python -m simplenet_jax.bench --merge "$OUT"/bench_*.json \
      > "$OUT/bench_table.md" 2>&1
    ;;
  together)
    timeout 540 python benchmarks/mvtec_workload.py --categories-per-step 15 \
      --eval-batch 64 --workers 16 --json "$OUT/workload_k15.json" \
      > "$OUT/workload_k15.log" 2>&1
    ;;
  alone)
    passes=${2:-20}
    timeout 540 python benchmarks/mvtec_workload.py --categories-per-step 1 \
      --passes "$passes" --eval-batch 64 --workers 16 \
      --json "$OUT/workload_k1_p${passes}.json" \
      > "$OUT/workload_k1_p${passes}.log" 2>&1
    ;;
  *)
    echo "usage: $0 inference | together | alone [passes] | all [passes]" >&2
    exit 2
    ;;
esac
echo "done: $PART (exit $?)"
