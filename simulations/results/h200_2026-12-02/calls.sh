#!/usr/bin/env bash
# Device calls of the H200 session of 2026-12-02, from the repo root (device `run`, carry [".device"]):
#   bash simulations/results/h200_2026-12-02/calls.sh A   # backbones, aggregation (3 seeds), direction drills
#   bash simulations/results/h200_2026-12-02/calls.sh B   # small backbones again, seed table (3 seeds), DP table
#   bash simulations/results/h200_2026-12-02/calls.sh C   # A's and B's sweeps continued
# A: pretrains resnet18, convnext_atto and efficientnet_b0 at once with the commands of the first cards
#    (../pretrain_h200_2026-12-01/cards/: fractal 170 s, then RetinaMNIST + PneumoniaMNIST 30 s, 64 px);
#    then, from the fractal-med resnet18, the aggregation preset with seeds 0, 1, 2 and drills_direction.toml
#    (the drills preset's IID blocks for fedavg, direction-clipped-mean and the same with direction-z 2).
# B: pretrains convnext_atto and efficientnet_b0 again (A's $OUT write of them was cut: an empty file), with
#    dp_bench (DP-SGD step against the plain one, convnext_atto at 64 px) beside; then the seed-table preset
#    with seeds 0, 1, 2 from fractal-med, and the dp preset from the fractal convnext_atto (no medical images
#    in it: PneumoniaMNIST is one of the DP table's datasets) at 64 px, 8 rounds of 2 local epochs.
# C: needs .device/weights/resnet18.tar.xz (A's fractal-med resnet18) and effnet.tar.xz (B's fractal-med
#    efficientnet_b0: the carry limit leaves B's other files out); continues A's sweeps and B's seed table.
# A and B also run the seed-table and aggregation presets from random init (seeds 1, 2) on spare cores.
# Every call: .device/runs.tgz, if there, holds finished runs of earlier calls (sweeps/<sweep>/runs/<run>/:
# summary.json, metrics.jsonl), which the sweeps skip. $OUT: runs.tgz (every sweep's finished runs, tables,
# logs, configs, the cards and pretraining logs), A: resnet18.tar.xz, B: small.tar.xz (the backbones).
# END: seconds of this script before the sweeps are cut.
set -u
CALL=$1; END=${END:-540}
R=$PWD; G=$R/simulations/results/h200_2026-12-02
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1 \
  || echo "install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
P=/dev/shm/pre; W=/dev/shm/w; S=$W/sweeps; mkdir -p "$P/logs" "$S"
FM="python3 -m fedmeld.simulations.cli"
[ -f "$R/.device/runs.tgz" ] && tar xzf "$R/.device/runs.tgz" -C "$W" && echo "$(ls -d "$S"/*/runs/* | wc -l) runs carried in"
for t in "$R"/.device/weights/*.tar.xz; do [ -f "$t" ] && tar xJf "$t" -C "$P"; done
cd /tmp  # not the repo root: its peft/ would shadow Hugging Face's

sweep() {  # NAME JOBS SEEDS GRID_ARGS SET...: one sweep in the background, cut at END; its report command kept
  local name=$1 jobs=$2 seeds=$3 grid=$4; shift 4
  printf '%q ' $FM sweep $grid --seeds "$seeds" --out "$S/$name" --report-only --set "$@" >> "$W/reports.sh"
  echo >> "$W/reports.sh"
  timeout $((END - SECONDS)) $FM sweep $grid --seeds "$seeds" --backend inprocess --jobs "$jobs" --out "$S/$name" \
    --set "$@" >> "$S/$name.log" 2>&1 &
}
pretrain() {  # MODEL: fractal (170 s), then fractal -> RetinaMNIST + PneumoniaMNIST (30 s), as the first cards
  local m=$1
  OMP_NUM_THREADS=3 $FM pretrain --model "$m" --source fractal --seconds 170 --resolution 64 --categories 1000 \
    --fractal-augment light --batch-size 256 --lr 2e-3 --out "$P/fractal/$m.safetensors" > "$P/logs/fractal_$m.log" 2>&1
  OMP_NUM_THREADS=3 $FM pretrain --model "$m" --source medmnist --datasets retinamnist,pneumoniamnist \
    --target breastmnist --init "$P/fractal/$m.safetensors" --seconds 30 --resolution 64 --batch-size 256 --lr 1e-3 \
    --out "$P/fractal-med/$m.safetensors" > "$P/logs/fractal-med_$m.log" 2>&1
}
( while sleep 60; do echo "[calls] ${SECONDS}s: $(ls "$S"/*/runs/*/summary.json 2>/dev/null | wc -l) runs finished"; done ) &
PROG=$!
export OMP_NUM_THREADS=1
RANDOM_SET=(input-size=64 'weights=""')  # the literal "": the value is read as TOML
R18=$P/fractal-med/resnet18.safetensors
SMALL=$P/fractal-med/convnext_atto.safetensors  # with efficientnet_b0's and the fractal convnext_atto
if [ "$CALL" != A ] && [ "$CALL" != B ]; then PRE=""; elif [ "$CALL" = A ]; then PRE="resnet18 convnext_atto efficientnet_b0"
else PRE="convnext_atto efficientnet_b0"; fi  # B remakes A's lost small files (its $OUT write was cut)
if [ "$CALL" != C ]; then
  sweep seed-table-random 4 1,2 "--preset seed-table" "${RANDOM_SET[@]}"; RND=$!
  sweep aggregation-random 4 1,2 "--preset aggregation" "${RANDOM_SET[@]}"; RND="$RND $!"
fi
if [ "$CALL" = B ]; then  # DP-SGD step against the plain one, beside the pretraining (each ratio within one process)
  for peft in lora norm; do
    timeout 120 python3 -m fedmeld.simulations.dp_bench --model convnext_atto --image-size 64 --batch 32 --batches 10 \
      --repeats 3 --peft $peft --out "$W/dp_step_h200_convnext_atto64_$peft.json" > "$W/dp_bench_$peft.log" 2>&1 &
  done
fi
if [ -n "$PRE" ]; then
  for m in $PRE; do pretrain $m & done
  wait $(jobs -p | tail -$(wc -w <<< "$PRE"))  # the pretraining chains
  tail -qn 1 "$P"/logs/*.log; date -u
  [ "$CALL" = B ] && kill $RND  # B: the cores go to the seed table from here; C resumes the random sweeps
fi
if [ "$CALL" != B ] && [ -f "$R18" ]; then
  sweep aggregation-fractal-med 7 0,1,2 "--preset aggregation" input-size=64 \
    "weights=$P/fractal-med"
  sweep drills-direction 5 0,1,2 "--grid $G/drills_direction.toml" input-size=64 "weights=$R18"
fi
if [ "$CALL" = C ] && [ -f "$P/fractal-med/efficientnet_b0.safetensors" ]; then  # B's unfinished rows: efficientnet_b0
  sweep seed-table-fractal-med 4 0,1,2 "--preset seed-table" input-size=64 "weights=$P/fractal-med"
fi
if [ "$CALL" = B ] && [ -f "$SMALL" ]; then
  sweep seed-table-fractal-med 12 0,1,2 "--preset seed-table" input-size=64 "weights=$P/fractal-med"
  sweep dp-fractal 4 0 "--preset dp" input-size=64 model=convnext_atto device=auto num-server-rounds=8 \
    local-epochs=2 "weights=$P/fractal/convnext_atto.safetensors" "data-root=$MEDMNIST_ROOT"
fi
wait $(jobs -p | grep -v "^$PROG$"); kill $PROG; date -u

bash "$W/reports.sh" 2>&1 | grep "runs finished"  # the tables of every finished run, also of a cut sweep
[ -d "$S/drills-direction" ] && python3 "$R/simulations/results/drills_h200_2026-12-01/drill_table.py" "$S/drills-direction" \
  > "$S/drills-direction/drill_table.md" 2>&1
[ -d "$S/dp-fractal" ] && python3 -m fedmeld.simulations.dp_table "$S/dp-fractal" "$W"/dp_step_*.json > /dev/null 2>&1
cp "$P"/logs/*.log "$W/" 2>/dev/null; for f in "$P"/*/*.json; do cp "$f" "$W/card_$(basename "$(dirname "$f")")_$(basename "$f")"; done
cd "$W" && tar czf "$OUT/runs.tgz" --exclude='*.pt' --exclude='*.safetensors' ./*.log ./*.json sweeps 2>/dev/null
[ "$CALL" = A ] && tar cf - -C "$P" fractal-med/resnet18.safetensors | xz -T0 -6 > "$OUT/resnet18.tar.xz"
[ "$CALL" = B ] && tar cf - -C "$P" fractal-med/convnext_atto.safetensors fractal-med/efficientnet_b0.safetensors \
  fractal/convnext_atto.safetensors | xz -T0 -3 > "$OUT/small.tar.xz"
ls -la "$OUT"; cat "$S"/drills-direction/drill_table.md 2>/dev/null | head -30; date -u
