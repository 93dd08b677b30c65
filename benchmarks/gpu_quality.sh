#!/usr/bin/env bash
# One command for a lent GPU machine (the `device` tool; run from the
# repository root, results under $OUT), at most about 9.5 minutes:
#   1. benchmarks/quality.py's shipped row (gas_auto = configs/demo.py) on
#      the cookie photos, brick, grass and gravel, seeds 0-2, one process
#      per set, side by side on the one GPU (the kNN yardstick comes with
#      every run);
#   2. meanwhile the demo command (configs/demo.py) end to end, then
#      --mode=export and benchmarks/export_check.py: the exported
#      model.jaxexport run on the GPU against model.onnx on ONNX Runtime;
#   3. then benchmarks/coreset_speed.py (the kNN coreset's lazy selection
#      against one pass per selected row, 100k and 285k rows);
#   4. then MVTec-AD-shaped categories (WRN50-2, random weights) with
#      train.augment=auto: its check's time and the device's peak memory.
# Needs: pretrained/efficientnet_lite0.msgpack, the cookie photos at
# ../shared/datasets/cookies (or .devcarry/shared/datasets/cookies, linked
# there), and jax with CUDA.
#   bash benchmarks/gpu_quality.sh
# Or a sweep of benchmarks/quality.py rows (each row one process per group
# of sets, seeds in turn: the compiled functions are reused across them):
#   ROWS='gas_auto gas_auto+model.pre_proj=0' SEEDS=0,1,2,3,4 \
#     TILES80='gas_auto,gas_auto+model.pre_proj=0' \
#     bash benchmarks/gpu_quality.sh sweep
set -uo pipefail
PART=${1:-round}
OUT=${OUT:-runs/gpu_quality}
WORK=${WORK:-/tmp/gpu_quality}
SEEDS=${SEEDS:-0,1,2}
SETS=${SETS:-cookies,brick,grass,gravel}
DEMO_FLAGS=${DEMO_FLAGS:-}
QUALITY_FLAGS=${QUALITY_FLAGS:-}
WORKLOAD=${WORKLOAD:-bottle,carpet,grid}
WORKLOAD_PASSES=${WORKLOAD_PASSES:-20}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
# Several processes share the GPU: each takes memory as it needs it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*" >> "$OUT/run.log"; }
if [ ! -d ../shared/datasets/cookies ] && [ -d .devcarry/shared ]; then
  ln -s "$PWD/.devcarry/shared" ../shared
fi
{ nvidia-smi; python -c 'import jax, flax, optax
print("jax", jax.__version__, jax.devices())
print("flax", flax.__version__, "optax", optax.__version__)'
  nproc; free -g; } > "$OUT/env.txt" 2>&1
log "start: $(python -c 'import jax; print(jax.devices())' 2>&1)"

if [ "$PART" = sweep ]; then
  GROUPS_=${SET_GROUPS:-cookies,brick grass,gravel}
  pids=()
  r=0
  for row in $ROWS; do
    for sets in $GROUPS_; do
      timeout "$BUDGET" python benchmarks/quality.py --sets "$sets" \
        --rows "$row" --seeds "$SEEDS" --workdir "$WORK/s${r}_${sets//,/_}" \
        --weights-dir pretrained --out "$WORK/s${r}_${sets//,/_}.jsonl" \
        $QUALITY_FLAGS > "$WORK/s${r}_${sets//,/_}.log" 2>&1 &
      pids+=($!)
    done
    r=$((r + 1))
  done
  if [ -n "${TILES80:-}" ]; then
    timeout "$BUDGET" python benchmarks/quality.py --sets gravel \
      --train-tiles 80 --rows "$TILES80" --seeds "${TILES80_SEEDS:-0,1,2}" \
      --workdir "$WORK/t80" --weights-dir pretrained --out "$WORK/t80.jsonl" \
      $QUALITY_FLAGS > "$WORK/t80.log" 2>&1 &
    pids+=($!)
  fi
  for p in "${pids[@]}"; do wait "$p"; log "sweep process $p exit $?"; done
  cat "$WORK"/*.jsonl > "$OUT/sweep.jsonl" 2>/dev/null
  for f in "$WORK"/*.log; do echo "=== $f"; tail -n 15 "$f"; done \
    > "$OUT/logs.txt"
  log done
  exit 0
fi

pids=()
for set in ${SETS//,/ }; do
  timeout $((BUDGET - 140)) python benchmarks/quality.py --sets "$set" \
    --rows gas_auto --seeds "$SEEDS" --workdir "$WORK/q_$set" \
    --weights-dir pretrained --out "$WORK/q_$set.jsonl" $QUALITY_FLAGS \
    > "$WORK/q_$set.log" 2>&1 &
  pids+=($!)
done

t=$SECONDS
timeout 300 python main.py --config configs/demo.py \
  --workdir "$WORK/demo" $DEMO_FLAGS > "$WORK/demo.log" 2>&1
log "demo exit $? after $((SECONDS - t)) s"
timeout 90 python main.py --config configs/demo.py --workdir "$WORK/demo" \
  --mode export $DEMO_FLAGS > "$WORK/export.log" 2>&1
log "export exit $?"
timeout 60 python benchmarks/export_check.py --model "$WORK/demo/brick/export" \
  "$WORK/demo/demo_data/brick/test/*/*.png" --json "$OUT/export_check.json" \
  >> "$WORK/export.log" 2>&1
log "export_check exit $?"

for i in "${!pids[@]}"; do
  wait "${pids[$i]}"
  log "quality ${i} exit $?"
done
cat "$WORK"/q_*.jsonl > "$OUT/quality.jsonl" 2>/dev/null

# The kNN coreset, lazy vs one pass per row, alone on the GPU now.
timeout 120 python benchmarks/coreset_speed.py --rows 100000,285696 \
  --json "$OUT/coreset_speed.json" > "$WORK/coreset.log" 2>&1
log "coreset_speed exit $?"

left=$((BUDGET - (SECONDS - start)))
if [ "$left" -gt 60 ]; then
  timeout "$left" python benchmarks/mvtec_workload.py --categories "$WORKLOAD" \
    --passes "$WORKLOAD_PASSES" --augment auto --eval-batch 64 --workers 16 \
    --json "$OUT/workload_auto.json" > "$WORK/workload.log" 2>&1
  log "workload exit $?"
else
  log "workload skipped: ${left} s left"
fi

# Few files come back: the logs' tails in one.
for f in "$WORK"/demo.log "$WORK"/export.log "$WORK"/q_*.log \
         "$WORK"/coreset.log "$WORK"/workload.log; do
  [ -f "$f" ] && { echo "=== $f"; tail -n 60 "$f"; }
done > "$OUT/logs.txt"
cp "$WORK/demo/results.json" "$OUT/demo_results.json" 2>/dev/null
log "done"
