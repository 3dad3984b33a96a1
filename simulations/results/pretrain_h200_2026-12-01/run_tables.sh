#!/usr/bin/env bash
# #19's second H200 call, from the repo root, with the backbone that won run.sh's transfer check:
#   bash simulations/results/pretrain_h200_2026-12-01/run_tables.sh WEIGHTS...
# WEIGHTS: a directory holding resnet18.safetensors, convnext_atto.safetensors and efficientnet_b0.safetensors
# (with their .json cards), or the <source>.tar.part-* files run.sh wrote to $OUT for one source, in order.
# Runs, four sweeps at once (4 runs each at a time), every run at 64 px (the pretraining resolution):
#   seed-table from the backbone and from random init (preset seed-table, input-size=64);
#   aggregation from the backbone and from random init (preset aggregation, input-size=64).
# Writes $OUT/tables.tgz: each sweep's results.md/csv, plots, configs, logs, runs' summary.json and
# metrics.jsonl, and the backbone's cards. About 4 minutes of work; sweeps are cut at 540 s of the script.
set -u
R=$PWD
[ $# -ge 1 ] || { echo "usage: bash $0 WEIGHTS_DIR | SOURCE.tar.part-aa [SOURCE.tar.part-ab ...]" >&2; exit 2; }
if [ -z "${FEDMELD_DEVICE_READY:-}" ]; then  # set by a caller that installed already (two scripts at once)
  source .device/env.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1 \
    || echo "install failed"
fi
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
W=/dev/shm/tables; mkdir -p "$W/weights"
if [ -d "$1" ]; then
  D=$(cd "$1" && pwd)
else  # tar parts: one tar holding <source>/<model>.safetensors
  for part in "$@"; do [ -f "$part" ] || { echo "no file $part" >&2; exit 2; }; done
  cat "$@" | tar xf - -C "$W/weights" || { echo "the parts do not make a tar; give them all, in order" >&2; exit 2; }
  D=$(ls -d "$W"/weights/*/ | head -1)
fi
for m in resnet18 convnext_atto efficientnet_b0; do
  [ -f "$D/$m.safetensors" ] || { echo "$D holds no $m.safetensors" >&2; exit 2; }
done
SOURCE=$(basename "$D"); ls -la "$D"
FM="python3 -m fedmeld.simulations.cli"
cd /tmp
PIDS=""
for preset in seed-table aggregation; do
  for from in "$SOURCE" random; do
    weights=$([ "$from" = random ] && echo "" || echo "$D")
    timeout $((540 - SECONDS)) $FM sweep --preset $preset --backend inprocess --jobs 4 --out "$W/$preset-$from" \
      --set input-size=64 "weights=\"$weights\"" > "$W/$preset-$from.log" 2>&1 &
    PIDS="$PIDS $!"
  done
done
alive() { local p; for p in $PIDS; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }
while alive; do sleep 30; echo "--- ${SECONDS} s: runs finished: $(ls "$W"/*/runs/*/summary.json 2>/dev/null | wc -l) of 104"; done
wait $PIDS
for preset in seed-table aggregation; do  # the tables of every finished run, also of a sweep that was cut
  for from in "$SOURCE" random; do
    weights=$([ "$from" = random ] && echo "" || echo "$D")
    $FM sweep --preset $preset --out "$W/$preset-$from" --report-only --set input-size=64 "weights=\"$weights\"" | tail -1
  done
done
date -u
cp "$D"/*.json "$W/" 2>/dev/null
cd "$W" && tar czf "$OUT/tables.tgz" ./*.log ./*.json */results.* */*.png */configs */logs */runs/*/summary.json \
  */runs/*/metrics.jsonl
ls -la "$OUT"; for f in "$W"/*/results.md; do echo "== $f"; sed -n '5,40p' "$f"; done
