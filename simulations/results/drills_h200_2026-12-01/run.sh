# Issue #16's GPU tables on one H200 (16 cores), from the repo root (device `run`, carry [".device"]):
#
#   bash simulations/results/drills_h200_2026-12-01/run.sh [DRILL_WEIGHTS] [DP_WEIGHTS]
#
# 1. the drills preset (5 rules x 4 attacks x {1 of 5, 2 of 8} x {IID, Dirichlet 0.5} x 3 seeds = 240
#    runs of ResNet-18 on BreastMNIST 28 px, bf16), --backend inprocess --jobs 16, cut at $DRILL_S s;
#    the preset runs block by block (1 of 5 IID first), so a cut leaves whole blocks;
# 2. dp_bench: DP-SGD against plain steps on the GPU (vit_pico 28 px, lora and norm);
# 3. the dp preset (eps in {1, 3, 8, inf} x {lora, norm} x {BreastMNIST, PneumoniaMNIST subset}) on the
#    GPU with $DP_ROUNDS rounds of 2 local epochs, cut at $DP_S s.
# DRILL_WEIGHTS: a ResNet-18 backbone file (weights=FILE, e.g. from `fedmeld pretrain`); DP_WEIGHTS: one
# for the dp preset's model (vit_pico_patch4_28). Either may be omitted (or given as ""): random init.
# Writes $OUT/drills_dp_h200.tgz (tables, every run's summary.json and metrics.jsonl, configs, logs)
# and $OUT/tables.md (the drill table, the DP table, the bench JSON). Environment: DRILL_S, DRILL_JOBS (16),
# DRILL_SET (more run keys for the drills, e.g. input-size=64 for a 64 px backbone), DP_S (0: no DP part), DP_ROUNDS.
# DRILL_FROM: a drills sweep folder with runs/ (e.g. this folder's sweep/ from an earlier, cut call): its
# finished runs are copied in first and the sweep skips those whose config is the same (same weights path
# and DRILL_SET), so a second call continues where the first was cut.
set -u
R=$PWD
DRILL_WEIGHTS=${1:+$(realpath "$1")}  # absolute: the sweeps run from /tmp
DP_WEIGHTS=${2:+$(realpath "$2")}
DRILL_S=${DRILL_S:-240}
DP_S=${DP_S:-140}
DP_ROUNDS=${DP_ROUNDS:-8}
HERE=$R/simulations/results/drills_h200_2026-12-01
W=/dev/shm/fm16
if [ -z "${FEDMELD_DEVICE_READY:-}" ]; then  # set by a caller that installed already (two scripts at once)
  source .device/env.sh
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1 \
    || echo "install failed"
fi
export PYTHONPATH=/tmp/fm:$PYTHONPATH
mkdir -p $W/drills/runs
if [ -n "${DRILL_FROM:-}" ]; then  # finished runs only: a cut one has no summary.json and runs again
  for d in "$(realpath "$DRILL_FROM")"/runs/*/; do [ -f "$d/summary.json" ] && cp -r "$d" $W/drills/runs/; done
  echo "[run.sh] $(ls $W/drills/runs | wc -l) finished runs from $DRILL_FROM"
fi
cd /tmp  # not the repo root: its peft/ would shadow Hugging Face's
nvidia-smi --query-gpu=name --format=csv,noheader; date -u

bounded() {  # SECONDS CMD...: run CMD in its own process group, end the whole group after SECONDS
  local limit=$1; shift
  setsid "$@" & local pid=$!
  (sleep "$limit"; kill -TERM -- -$pid 2>/dev/null && echo "[run.sh] cut after ${limit}s: $*") & local watch=$!
  wait $pid; local rc=$?
  kill $watch 2>/dev/null
  return $rc
}
progress() {  # DIR TOTAL: finished runs every 30 s, until killed
  while sleep 30; do echo "[run.sh] $(ls $1/runs/*/summary.json 2>/dev/null | wc -l)/$2 runs finished $(date -u +%T)"; done
}

echo "== drills (weights: ${DRILL_WEIGHTS:-random init})"
progress $W/drills 240 & P=$!
SET="${DRILL_WEIGHTS:+weights=$DRILL_WEIGHTS} ${DRILL_SET:-}"  # DRILL_SET: more key=value pairs, e.g. input-size=64
bounded $DRILL_S python3 -m fedmeld.simulations.cli sweep --preset drills --backend inprocess --jobs ${DRILL_JOBS:-16} --out $W/drills \
  ${SET:+--set $SET} > $W/drills.log 2>&1
echo "drills sweep rc=$?"; kill $P; date -u
python3 -m fedmeld.simulations.cli sweep --preset drills --out $W/drills --report-only ${SET:+--set $SET}
python3 $HERE/drill_table.py $W/drills > $W/drills/drill_table.md
cat $W/drills/drill_table.md

if [ "$DP_S" -gt 0 ]; then  # DP_S=0: the drills only
  echo "== dp_bench"
  for peft in lora norm; do
    bounded 60 python3 -m fedmeld.simulations.dp_bench --model vit_pico_patch4_28 --image-size 28 --batch 32 --batches 20 \
      --repeats 3 --peft $peft --out $W/dp_step_h200_vit_pico28_$peft.json > $W/dp_bench_$peft.log 2>&1 || tail -3 $W/dp_bench_$peft.log
  done

  echo "== dp table (weights: ${DP_WEIGHTS:-random init})"
  progress $W/dp 16 & P=$!
  SET="device=auto num-server-rounds=$DP_ROUNDS local-epochs=2 ${DP_WEIGHTS:+weights=$DP_WEIGHTS}"
  bounded $DP_S python3 -m fedmeld.simulations.cli sweep --preset dp --backend inprocess --jobs 16 --out $W/dp \
    --set $SET > $W/dp.log 2>&1
  echo "dp sweep rc=$?"; kill $P; date -u
  python3 -m fedmeld.simulations.cli sweep --preset dp --out $W/dp --report-only --set $SET
  python3 -m fedmeld.simulations.dp_table $W/dp $W/dp_step_h200_vit_pico28_*.json > /dev/null
fi

cd $W
{ echo "# drills"; cat drills/drill_table.md; echo "# dp"; cat dp/dp_table.md; echo "# dp_bench"; cat dp_step_*.json; } \
  > $OUT/tables.md 2>&1
tar czf $OUT/drills_dp_h200.tgz drills.log dp.log dp_bench_*.log dp_step_*.json \
  drills/results.* drills/drill_table.md drills/configs drills/logs drills/runs/*/summary.json drills/runs/*/metrics.jsonl \
  dp/results.* dp/dp_table.* dp/configs dp/logs dp/runs/*/summary.json dp/runs/*/metrics.jsonl 2>/dev/null
ls -la $OUT; tail -3 drills.log dp.log
