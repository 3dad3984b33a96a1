#!/usr/bin/env bash
# Second H200 session of 2026-12-01, call 1, from the repo root (device `run`, carry [".device"]):
#   bash simulations/results/h200_2026-12-01b/call1.sh
# The first session's backbone files did not survive it (weights never go into git), so:
#  1. remakes the fractal-med ResNet-18 with the commands in its card (pretrain_h200_2026-12-01/cards/
#     fractal-med/resnet18.safetensors.json: fractal 170 s, then RetinaMNIST + PneumoniaMNIST 30 s, 64 px) and,
#     at the same time, a vit_pico_patch4_28 backbone for the DP table: fractal 150 s, then RetinaMNIST only
#     30 s at 28 px (no BreastMNIST or PneumoniaMNIST image: the DP table's patients are never seen outside DP);
#  2. the aggregation preset's exact rows (exact.toml here) from the new ResNet-18 and from random init, at
#     64 px, beside the drills preset from the new ResNet-18 (drills_h200_2026-12-01/run.sh, DP part off),
#     both cut at 560 s of the script.
# $OUT: tables.md and drills_dp_h200.tgz (drills, from run.sh), exact.tgz (both exact sweeps, the cards and
# pretraining logs), resnet18.tar.part-* (fractal-med/resnet18.safetensors + card, 15 MiB parts) and
# vit_pico.tar (fractal-ret/vit_pico_patch4_28.safetensors + card), for the later calls.
set -u
R=$PWD
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1 \
  || echo "install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH FEDMELD_DEVICE_READY=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
P=/dev/shm/pre; L=/dev/shm/pre/logs; W=/dev/shm/exact; mkdir -p "$P" "$L" "$W"
FM="python3 -m fedmeld.simulations.cli"
cd /tmp  # not the repo root: its peft/ would shadow Hugging Face's

( OMP_NUM_THREADS=4 $FM pretrain --model resnet18 --source fractal --seconds 170 --resolution 64 --categories 1000 \
    --fractal-augment light --batch-size 256 --lr 2e-3 --out "$P/fractal/resnet18.safetensors" > "$L/fractal_resnet18.log" 2>&1
  OMP_NUM_THREADS=4 $FM pretrain --model resnet18 --source medmnist --datasets retinamnist,pneumoniamnist \
    --target breastmnist --init "$P/fractal/resnet18.safetensors" --seconds 30 --resolution 64 --batch-size 256 --lr 1e-3 \
    --out "$P/fractal-med/resnet18.safetensors" > "$L/fractal-med_resnet18.log" 2>&1 ) &
R18=$!
( OMP_NUM_THREADS=4 $FM pretrain --model vit_pico_patch4_28 --source fractal --seconds 150 --resolution 28 --categories 1000 \
    --fractal-augment light --batch-size 256 --lr 2e-3 --out "$P/fractal/vit_pico_patch4_28.safetensors" > "$L/fractal_vit_pico.log" 2>&1
  OMP_NUM_THREADS=4 $FM pretrain --model vit_pico_patch4_28 --source medmnist --datasets retinamnist --target breastmnist \
    --init "$P/fractal/vit_pico_patch4_28.safetensors" --seconds 30 --resolution 28 --batch-size 256 --lr 1e-3 \
    --out "$P/fractal-ret/vit_pico_patch4_28.safetensors" > "$L/fractal-ret_vit_pico.log" 2>&1 ) &
VIT=$!
while kill -0 $R18 2>/dev/null; do sleep 30; echo "--- ${SECONDS} s"; for f in "$L"/*.log; do echo "$(basename "$f"): $(tail -1 "$f")"; done; done
wait $R18; ls -la "$P"/*/; date -u
[ -f "$P/fractal-med/resnet18.safetensors" ] || { echo "no resnet18 backbone"; tail -20 "$L"/*resnet18.log; }

for from in fractal-med random; do  # the exact rows, 4 runs at a time each
  weights=$([ "$from" = random ] && echo "" || echo "$P/fractal-med")
  timeout $((560 - SECONDS)) $FM sweep --grid "$R/simulations/results/h200_2026-12-01b/exact.toml" --backend inprocess \
    --jobs 2 --out "$W/exact-$from" --set input-size=64 "weights=\"$weights\"" > "$W/exact-$from.log" 2>&1 &
done
cd "$R"
OMP_NUM_THREADS=1 DP_S=0 DRILL_S=$((560 - SECONDS)) DRILL_JOBS=12 DRILL_SET=input-size=64 \
  bash simulations/results/drills_h200_2026-12-01/run.sh "$P/fractal-med/resnet18.safetensors"
wait
cd /tmp
for from in fractal-med random; do
  weights=$([ "$from" = random ] && echo "" || echo "$P/fractal-med")
  $FM sweep --grid "$R/simulations/results/h200_2026-12-01b/exact.toml" --out "$W/exact-$from" --report-only \
    --set input-size=64 "weights=\"$weights\"" | tail -1
  sed -n '1,30p' "$W/exact-$from/results.md"
done
wait $VIT
cp -r "$L" "$W/pretrain_logs"; mkdir -p "$W/cards"
for f in "$P"/*/*.json; do cp "$f" "$W/cards/$(basename "$(dirname "$f")")_$(basename "$f")"; done
cd "$W" && tar czf "$OUT/exact.tgz" ./*.log cards pretrain_logs */results.* */configs */logs */runs/*/summary.json \
  */runs/*/metrics.jsonl
tar cf - -C "$P" fractal-med/resnet18.safetensors fractal-med/resnet18.safetensors.json | split -b 15M - "$OUT/resnet18.tar.part-"
tar cf "$OUT/vit_pico.tar" -C "$P" fractal-ret
ls -la "$OUT"; date -u
