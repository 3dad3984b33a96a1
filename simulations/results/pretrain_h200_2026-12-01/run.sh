#!/usr/bin/env bash
# #19 on one H200 (16 cores), from the repo root:  bash simulations/results/pretrain_h200_2026-12-01/run.sh
#  1. pretrains resnet18, convnext_atto and efficientnet_b0 at 64 px, one grayscale channel, at once on the
#     GPU: fractal (1000 IFS categories, light augmentation, 170 s each), then fractal -> medmnist
#     (RetinaMNIST + PneumoniaMNIST train splits, 30 s from the fractal file); meanwhile the transfer
#     preset's random-init arms run;
#  2. the transfer preset's pretrained arms (BreastMNIST at 64 px, centralized, 30 epochs, val-AUC selection,
#     3 seeds), then the whole preset's tables from every finished run;
#  3. $OUT/pretrain_transfer.tgz: the sweep's results.md/csv, plots, configs, logs, every run's summary.json
#     and metrics.jsonl, the cards (pretrained/*/*.json), the pretraining logs; $OUT/<source>.tar.part-aa,
#     -ab, ...: each source's three .safetensors in one tar cut into 15 MiB parts (resnet18 in bf16 is 22 MB),
#     for run_tables.sh (`cat fractal.tar.part-* | tar x` gives fractal/<model>.safetensors).
# About 7 minutes of work; the pretrained arms are cut at 530 s of the script so that $OUT is always written.
set -u
R=$PWD
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1 \
  || echo "install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
W=/dev/shm/work; P=/dev/shm/work/pretrained; S=/dev/shm/work/transfer; L=/dev/shm/work/logs
mkdir -p "$P" "$S" "$L"
export FEDMELD_PRETRAINED=$P
FM="python3 -m fedmeld.simulations.cli"
MODELS="resnet18 convnext_atto efficientnet_b0"

pretrain() {  # one model: fractal, then fractal -> medmnist
  local m=$1
  OMP_NUM_THREADS=3 $FM pretrain --model "$m" --source fractal --seconds 170 --resolution 64 --categories 1000 \
    --fractal-augment light --batch-size 256 --lr 2e-3 --out "$P/fractal/$m.safetensors" > "$L/fractal_$m.log" 2>&1
  OMP_NUM_THREADS=3 $FM pretrain --model "$m" --source medmnist --datasets retinamnist,pneumoniamnist \
    --target breastmnist --init "$P/fractal/$m.safetensors" --seconds 30 --resolution 64 --batch-size 256 --lr 1e-3 \
    --out "$P/fractal-med/$m.safetensors" > "$L/fractal-med_$m.log" 2>&1
}
arms() {  # the transfer preset with only the arms whose label matches $1 (a Python regex), as a grid file
  python3 -c '
import json, re, sys, tomllib
grid = tomllib.loads(open(sys.argv[1]).read())
arms = [a for a in grid["axis"]["arm"] if re.match(sys.argv[2], a["label"])]
lines = []
for section in ("sweep", "base", "grid"):
    lines += [f"[{section}]"] + [f"{k} = {json.dumps(v)}" for k, v in grid[section].items()]
for arm in arms:
    lines += ["[[axis.arm]]"] + [f"{k} = {json.dumps(v)}" for k, v in arm.items()]
print("\n".join(lines))' "$R/simulations/presets/transfer.toml" "$1"
}
left() { local t=$(($1 - SECONDS)); echo $((t > 10 ? t : 10)); }  # seconds until $1 s into the script
alive() { local p; for p in $PIDS; do kill -0 "$p" 2>/dev/null && return 0; done; return 1; }

PIDS=""
for m in $MODELS; do pretrain "$m" & PIDS="$PIDS $!"; done
arms 'random-' > "$W/random.toml"; arms '(?!random-)' > "$W/pretrained.toml"
cd /tmp
$FM sweep --grid "$W/random.toml" --backend inprocess --jobs 8 --out "$S" > "$L/sweep_random.log" 2>&1 &
RANDOM_SWEEP=$!
while alive; do  # progress every 30 s while any pretraining runs
  sleep 30
  echo "--- ${SECONDS} s; runs finished: $(ls "$S"/runs/*/summary.json 2>/dev/null | wc -l)"
  for f in "$L"/fractal*_*.log; do echo "$(basename "$f"): $(tail -1 "$f")"; done
done
wait $PIDS
ls -la "$P"/*/; date -u
timeout "$(left 530)" $FM sweep --grid "$W/pretrained.toml" --backend inprocess --jobs 14 --out "$S" \
  > "$L/sweep_pretrained.log" 2>&1
echo "pretrained arms rc=$? at ${SECONDS} s"; wait $RANDOM_SWEEP; echo "random arms rc=$?"
$FM sweep --preset transfer --out "$S" --report-only  # the whole preset, from every run that finished
date -u
cd "$W" && tar czf "$OUT/pretrain_transfer.tgz" transfer/results.* transfer/*.png transfer/configs transfer/logs \
  transfer/runs/*/summary.json transfer/runs/*/metrics.jsonl pretrained/*/*.json logs ./*.toml
for source in fractal fractal-med; do
  [ -d "$P/$source" ] && tar cf - -C "$P" "$source" | split -b 15M - "$OUT/$source.tar.part-"
done
ls -la "$OUT"; sed -n '1,22p' "$S/results.md"
