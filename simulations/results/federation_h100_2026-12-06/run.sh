# Issue #20 on one GPU (device `run`, carry [".device"]), from the repo root:
#   bash simulations/results/federation_h100_2026-12-06/run.sh rows CARD DATE        # ~4 min: every model, mode, loop
#   bash simulations/results/federation_h100_2026-12-06/run.sh federation CARD DATE [RUNTIME ...]
#        # the federation job; all five runtimes take ~9 min on an H100 (each deployment ~2 min), so
#        # split them over two calls, e.g. "simulation simulation_eval_last deployment", then the rest
# The device bundle: ../shared/tools/device-bundle pneumoniamnist, plus
# `pip download --no-deps opacus -d .device/wheels` (fedmeld.task.privacy imports it).
# Writes $OUT/bench_CARD_DATE.json (rows) or $OUT/bench_CARD_DATE_federation.json and $OUT/fed-runs.tgz
# (traces, metrics, summaries, the log).
set -u
PART=$1; NAME=bench_$2_$3; shift 3; R=$PWD
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm "$R" >/dev/null 2>&1 || echo "fedmeld install failed"
export PYTHONPATH=/tmp/fm:/tmp/site  # not the repo root that env.sh adds: its peft/ would shadow HF peft
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; date -u
mkdir -p /tmp/b && cd /tmp/b
if [ "$PART" = rows ]; then
  timeout 240 python3 -m fedmeld.simulations.bench --data-flag pneumoniamnist --warmup 5 --repeats 2 --out $OUT/$NAME.json > rows.log 2>&1
  echo "bench rc=$?"; tail -70 rows.log; tar czf $OUT/rows-logs.tgz rows.log
else
  timeout 500 python3 -m fedmeld.simulations.bench --models --federation num-server-rounds=5 'out="/tmp/b/fed-runs"' \
    ${1:+--federation-runtimes "$@"} --out $OUT/${NAME}_federation.json > fed.log 2>&1
  echo "bench rc=$?"; tail -30 fed.log
  tar czf $OUT/fed-runs.tgz fed.log fed-runs/*/metrics.jsonl fed-runs/*/summary.json fed-runs/*.trace.jsonl 2>/dev/null
fi
date -u
