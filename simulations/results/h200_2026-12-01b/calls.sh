#!/usr/bin/env bash
# Device calls of the third H200 session of 2026-12-01 (the second one's call-1 outputs were lost with
# its machine, so call A redoes them), from the repo root (device `run`, carry [".device"]):
#   bash simulations/results/h200_2026-12-01b/calls.sh A     # backbone, exact rows, drills (start)
#   bash simulations/results/h200_2026-12-01b/calls.sh B     # drills (continued): needs .device/weights/resnet18.tar.xz
#     (fractal-med/ from A's parts) and .device/drills.tgz (drills/runs/<run>/ with summary.json, finished runs only)
# A: remakes the fractal-med ResNet-18 with the commands in its card (pretrain_h200_2026-12-01/cards/
#    fractal-med/resnet18.safetensors.json: fractal 170 s, then RetinaMNIST + PneumoniaMNIST 30 s, 64 px),
#    meanwhile the aggregation preset's exact rows (exact.toml) from random init, then the same rows from
#    the new backbone beside the drills.
# Drills: the drills preset from the new backbone at 64 px, IID blocks (3 seeds) first, then the
#    Dirichlet 0.5 blocks with seed 0 only (DIR_SEEDS=0,1: seeds 0 and 1; the preset's runs, names and configs; a later call skips the
#    finished ones carried in .device/drills/runs).
# $OUT: exact.tgz (sweeps, card, pretraining logs), drills.tgz (every finished run, logs, table) and, in
# A, resnet18.tar.part-* (the backbone and its card, for the next call's .device/weights).
set -u
CALL=$1; END=${END:-565}  # seconds of this script before everything is cut
R=$PWD; G=$R/simulations/results/h200_2026-12-01b
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1 \
  || echo "install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
P=/dev/shm/pre; L=$P/logs; W=/dev/shm/w; D=$W/drills; mkdir -p "$P" "$L" "$D/runs"
B=$P/fractal-med/resnet18.safetensors  # the same path in every call: it is part of the drills' configs
FM="python3 -m fedmeld.simulations.cli"
cd /tmp  # not the repo root: its peft/ would shadow Hugging Face's

exact() {  # FROM WEIGHTS_DIR: the exact rows, 4 at a time
  timeout $((END - SECONDS)) $FM sweep --grid "$G/exact.toml" --backend inprocess --jobs 4 --out "$W/exact-$1" \
    --set input-size=64 "weights=\"$2\"" > "$W/exact-$1.log" 2>&1
}
if [ "$CALL" = A ]; then
  exact random "" & XR=$!
  OMP_NUM_THREADS=4 $FM pretrain --model resnet18 --source fractal --seconds 170 --resolution 64 --categories 1000 \
    --fractal-augment light --batch-size 256 --lr 2e-3 --out "$P/fractal/resnet18.safetensors" > "$L/fractal_resnet18.log" 2>&1
  OMP_NUM_THREADS=4 $FM pretrain --model resnet18 --source medmnist --datasets retinamnist,pneumoniamnist \
    --target breastmnist --init "$P/fractal/resnet18.safetensors" --seconds 30 --resolution 64 --batch-size 256 --lr 1e-3 \
    --out "$B" > "$L/fractal-med_resnet18.log" 2>&1
  tail -n 2 "$L"/*.log; date -u
  [ -f "$B" ] || { echo "no backbone"; exit 1; }
  exact fractal-med "$P/fractal-med" & XF=$!
  JOBS=10
else
  tar xJf "$R/.device/weights/resnet18.tar.xz" -C "$P"  # call A's resnet18.tar.part-*, xz'd to fit the carry
  tar xzf "$R/.device/drills.tgz" -C "$W"; echo "$(ls "$D/runs" | wc -l) finished runs carried in"  # drills/runs/*
  JOBS=14
fi

without() {  # LABEL: the drills preset without its axis table labelled LABEL
  awk -v drop="$1" '
    function flush() { if (buf !~ "label = \"" drop "\"") printf "%s", buf; buf = "" }
    /^\[\[/ { flush() } /^\[\[/ || buf != "" { buf = buf $0 "\n"; next } { print } END { flush() }
  ' "$R/simulations/presets/drills.toml"
}
without dir0.5 > "$W/drills_iid.toml"  # IID, 3 seeds
without iid > "$W/drills_dir.toml"     # Dirichlet 0.5, run with seed 0 only
grep -c '^label' "$W"/drills_*.toml
( while sleep 60; do echo "[calls] ${SECONDS}s: $(ls "$D"/runs/*/summary.json 2>/dev/null | wc -l) drills runs finished"; done ) &
PROG=$!
export OMP_NUM_THREADS=1
timeout $((END - SECONDS)) $FM sweep --grid "$W/drills_iid.toml" --backend inprocess --jobs $JOBS --out "$D" \
  --set "weights=$B" input-size=64 >> "$W/drills.log" 2>&1
[ $SECONDS -lt $((END - 60)) ] && timeout $((END - SECONDS)) $FM sweep --grid "$W/drills_dir.toml" --seeds ${DIR_SEEDS:-0} \
  --backend inprocess --jobs $JOBS --out "$D" --set "weights=$B" input-size=64 >> "$W/drills.log" 2>&1
kill $PROG; wait; date -u
python3 "$R/simulations/results/drills_h200_2026-12-01/drill_table.py" "$D" > "$D/drill_table.md"; cat "$D/drill_table.md"
cd "$W"
tar czf "$OUT/drills.tgz" drills.log drills_*.toml drills/drill_table.md drills/configs drills/logs \
  drills/runs/*/summary.json drills/runs/*/metrics.jsonl
if [ "$CALL" = A ]; then
  for from in random fractal-med; do
    weights=$([ "$from" = random ] && echo "" || echo "$P/fractal-med")
    (cd /tmp && $FM sweep --grid "$G/exact.toml" --out "$W/exact-$from" --report-only --set input-size=64 \
      "weights=\"$weights\"" | tail -1; cat "$W/exact-$from/results.md")
  done
  cp -r "$L" "$W/pretrain_logs"; mkdir -p "$W/cards"
  for f in "$P"/*/*.json; do cp "$f" "$W/cards/$(basename "$(dirname "$f")")_$(basename "$f")"; done
  tar czf "$OUT/exact.tgz" exact-*.log cards pretrain_logs exact-*/results.* exact-*/configs exact-*/logs \
    exact-*/runs/*/summary.json exact-*/runs/*/metrics.jsonl
  tar cf - -C "$P" fractal-med/resnet18.safetensors fractal-med/resnet18.safetensors.json \
    | split -b 15M - "$OUT/resnet18.tar.part-"
fi
ls -la "$OUT"; date -u
