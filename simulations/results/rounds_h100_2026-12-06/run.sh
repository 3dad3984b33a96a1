# Issue #20, where a deployment round's time goes (device `run`, carry [".device"]), from the repo root:
#   bash simulations/results/rounds_h100_2026-12-06/run.sh CARD DATE
# 1. polls.py: the deployment round (SuperLink state in memory, client-eval-every) at poll intervals
#    0.2 (the default), 0.5 and 0.1 s, one bare-client timing, one process tree at a time;
# 2. the same deployment at 0.2 s under py-spy (--subprocesses --idle --nonblocking, raw stacks of every
#    process: ServerApp, SuperLink, SuperNodes, executors), traced.
# The device bundle: ../shared/tools/device-bundle pneumoniamnist, plus the opacus and py-spy wheels
# (`pip download --no-deps opacus py-spy -d .device/wheels`). Writes $OUT/rounds.tgz.
set -u
R=$PWD; D=$(dirname "$0")
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm "$R" >/dev/null 2>&1 || echo "fedmeld install failed"
export PYTHONPATH=/tmp/fm:/tmp/site  # not the repo root that env.sh adds: its peft/ would shadow HF peft
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; nproc; date -u
mkdir -p /tmp/b && cd /tmp/b
timeout ${POLLS_LIMIT:-330} python3 "$R/$D/polls.py" polls_$1_$2.json /tmp/b/runs ${POLLS:-0.2 0.5 0.1} > polls.log 2>&1
echo "polls rc=$?"; tail -8 polls.log; date -u
JOB=(dataset=pneumoniamnist input-size=224 'model="vit_small_patch16_224"' peft=lora num-server-rounds=5 local-epochs=1
     batch-size=64 num-clients=8 min-clients=8 'out="/tmp/b/runs"' client-eval-every=5 'run-name="spy"')
FEDMELD_TRACE=/tmp/b/runs/spy.trace.jsonl timeout ${SPY_LIMIT:-170} py-spy record --subprocesses --idle --nonblocking -r 50 -f raw \
  -o spy_$1_$2.txt -- python3 -m fedmeld.simulations.deploy --superlink-state memory --supernodes 8 "${JOB[@]}" > spy.log 2>&1
echo "spy rc=$?"; tail -3 spy.log; date -u
tar czf $OUT/rounds.tgz polls_*.json polls.log spy_*.txt spy.log runs/*.trace.jsonl runs/*/metrics.jsonl runs/*/summary.json 2>/dev/null
ls -la $OUT
