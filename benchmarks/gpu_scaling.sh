#!/usr/bin/env bash
# Every GPU measurement of docs/scaling.md in one run, for a lent GPU machine
# (the `device` tool: run it from the repository root, results under $OUT):
#   1. inference at 224 px, WRN50-2 (random weights), float32 and bfloat16
#      backbones, large batches (throughput) and batch 1 (latency p50/p99);
#   2. the whole MVTec-AD-shaped workload (15 categories, 160 passes, train +
#      threshold + evaluation), one category at a time and 15 at a time.
# Needs jax with CUDA: pip install -r requirements.txt "jax[cuda12]".
set -uo pipefail
OUT=${OUT:-runs/gpu_scaling}
mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
python - <<'PY' > "$OUT/jax.txt" 2>&1
import jax; print(jax.__version__, jax.devices())
PY
for dtype in float32 bfloat16; do
  for batch in 64 256; do
    timeout 300 python -m simplenet_jax.bench --image-size 224 --batch $batch \
      --backbone-dtype $dtype --train-images 256 --latency 200 \
      --json "$OUT/bench_${dtype}_b${batch}.json" > "$OUT/bench_${dtype}_b${batch}.log" 2>&1
  done
done
for k in 15 1; do
  timeout 1500 python benchmarks/mvtec_workload.py --categories-per-step $k \
    --eval-batch 64 --workers 16 --json "$OUT/workload_k${k}.json" \
    > "$OUT/workload_k${k}.log" 2>&1
done
python -m simplenet_jax.bench --merge "$OUT"/bench_*.json > "$OUT/bench_table.md" 2>&1
echo done
