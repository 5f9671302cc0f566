#!/usr/bin/env bash
# Issue 11's GPU figures on one lent H200, in one session of under 8 minutes.
#
# Prepare here (a checkout with ../shared):   ../shared/tools/gpu-prep.sh
# Then, with the device tool: carry [".whl", ".gpu-data"] and the command
#   bash benchmarks/gpu_session.sh
# Optional: STEPS="compile loop32" (a subset, in this order), BUDGET_S=450 (the whole script).
#
# Writes under $OUT (default: ./gpu-out): STEP.jsonl (the benchmark's JSON lines), STEP.log
# (its stderr), steps.jsonl (one line per step: rc, wall seconds, its timeout; rc 124 = cut by
# the timeout, "skipped" = no time left) and env.txt. Cheap, robust figures come first; each
# step runs under `timeout` with what is left of BUDGET_S, so the script ends in time and
# whatever did not fit is named in steps.jsonl (run it again with STEPS=...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-450}
STEPS=${STEPS:-"env workers loop32 compile loop32c predict demo epochs loop64 whole"}
DATA=${DATA:-$PWD/.gpu-data/siim-sample}
CACHE=/tmp/ptxseg-gpu-cache           # compile caches of this session (cold = new folder)
rm -rf "$CACHE"

if [ -d .whl ] && [ ! -d /tmp/site ]; then
  timeout 90 python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    .whl/*.whl || { echo '{"step": "install", "rc": 1}' >> "$OUT/steps.jsonl"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD/src NO_ALBUMENTATIONS_UPDATE=1 HF_HUB_OFFLINE=1
PY=python3
T0=$SECONDS

# step NAME LIMIT_S MIN_S COMMAND...: run COMMAND under timeout min(LIMIT_S, time left - 5);
# skip it when less than MIN_S would be left
step() {
  local name=$1 limit=$2 min=$3; shift 3
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local left=$((BUDGET_S - (SECONDS - T0) - 5))
  if [ "$left" -lt "$min" ]; then
    echo "{\"step\": \"$name\", \"skipped\": \"no time left ($left s < $min s)\"}" \
      >> "$OUT/steps.jsonl"
    return 0
  fi
  local t=$((limit < left ? limit : left)) start=$SECONDS
  timeout -k 5 "$t" "$@" > "$OUT/$name.jsonl" 2> "$OUT/$name.log"
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - start)), \"timeout_s\": $t}" \
    >> "$OUT/steps.jsonl"
  tail -n 3 "$OUT/$name.jsonl" "$OUT/$name.log" 2>/dev/null | cut -c1-400
}

# the machine, versions
step env 30 10 bash -c "nvidia-smi; nproc; $PY -c 'import torch, lightning, \
segmentation_models_pytorch as smp; print(torch.__version__, lightning.__version__, \
smp.__version__, torch.cuda.get_device_name())'; uptime"
mv "$OUT/env.jsonl" "$OUT/env.txt" 2>/dev/null

# worker start cost: fork (warns with CUDA), forkserver (ptxseg's choice on CUDA), spawn
step workers 75 30 $PY benchmarks/worker_start.py --data "$DATA" --device cuda --workers 15 \
  --size 512 --batch 32 --timeout 30

# eager bare step vs the project's loop from the 1024 px PNGs, batch 32 (no compile: cheap)
step loop32 75 40 $PY benchmarks/train_throughput.py --data "$DATA" --size 512 --batch 32 \
  --steps 40 --warmup 5 --workers 15 --only bare,loop --set train.compile=false

# time to the first optimizer step, regional compile: cold (empty cache), then warm
step compile 240 90 $PY benchmarks/compile_time.py --device cuda --size 512 --batch 32 \
  --variants regional --runs cold,warm --steps 20 --warmup 3 --timeout 200 \
  --cache-root "$CACHE/compile"

# compiled (regional, the cache above: warm) bare step vs the loop, batch 32
step loop32c 100 50 $PY benchmarks/train_throughput.py --data "$DATA" --size 512 --batch 32 \
  --steps 40 --warmup 5 --workers 15 --only bare,loop --set train.compile=regional \
  --set train.compile_cache="$CACHE/compile/regional"

# predict from 1024 px PNGs against the bare compiled forward (batch 32, bf16, 512 px)
step predict 120 60 $PY benchmarks/predict_throughput.py --encoders efficientnet-b4 \
  --size 512 --n 1024 --batch-size 32 --compile --repeats 1 --backends torch \
  --sample "$DATA/png_images"

# ptxseg demo with its GPU defaults, end to end (demo.json: each step's seconds)
step demo 150 60 bash -c "rm -rf /tmp/gpu-demo; $PY -m ptxseg demo --out /tmp/gpu-demo \
  > '$OUT/demo.txt' 2>&1; rc=\$?; echo '{\"demo_wall_s\": '\$SECONDS'}'; \
  $PY -c 'import json; print(json.dumps(json.load(open(\"/tmp/gpu-demo/demo.json\"))))'; \
  exit \$rc"

# first epoch vs steady epochs of ptxseg train on the real sample (512 px, batch 32, regional
# compile from the warm cache; metrics.csv's time_s per epoch)
step epochs 120 60 bash -c "rm -rf /tmp/gpu-run && $PY -m ptxseg train --config paper \
  --data '$DATA' --out /tmp/gpu-run --set model.encoder_weights=null --set train.epochs=5 \
  --set train.compile=regional --set train.compile_cache='$CACHE/compile/regional' \
  > '$OUT/epochs.txt' 2>&1; rc=\$?; $PY -c \"import csv, json; \
rows = list(csv.DictReader(open('/tmp/gpu-run/metrics.csv'))); \
print(json.dumps({'epoch_s': [float(r['time_s']) for r in rows]}))\"; exit \$rc"

# batch 64: eager bare vs loop
step loop64 60 40 $PY benchmarks/train_throughput.py --data "$DATA" --size 512 --batch 64 \
  --steps 20 --warmup 3 --workers 15 --only bare,loop --set train.compile=false

# whole-model compile for the steady ratio regional/whole (cold: minutes; last)
step whole 240 120 $PY benchmarks/compile_time.py --device cuda --size 512 --batch 32 \
  --variants whole --runs cold --steps 20 --warmup 3 --timeout 230 \
  --cache-root "$CACHE/whole"

echo "{\"step\": \"total\", \"wall_s\": $((SECONDS - T0))}" >> "$OUT/steps.jsonl"
cat "$OUT/steps.jsonl"
