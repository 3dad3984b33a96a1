# Issue #18's target check on one device GPU with the preset's LTE at lr 3e-3: federated full and LTE,
# seeds 0-2, IID and Dirichlet 1.0 (12 runs at once), then SETTINGS=dir0.5 (6 runs), from the repo root,
# carrying .device: `../shared/tools/device-bundle pneumoniamnist`, plus the Opacus wheel the bundle
# lacks (`pip download --no-deps opacus -d .device/wheels`; without it every run fails at import).
# The whole table (central and LoRA rows too) is ../lte_h200_2026-12-01/run.sh final.
# Writes $OUT/lte-target-<settings>.tgz (lte_compare.*, every run's summary, metrics and log).
set -u
R=$PWD
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm "$R" >/dev/null 2>&1 \
  || echo "fedmeld install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; date -u
cd /tmp  # not the repo root: its peft/ would shadow HF peft
O=/dev/shm/lte-target-${SETTINGS:-iid,dir1.0}; A=(--gpu --methods full,lte --settings ${SETTINGS:-iid,dir1.0} --out $O)
timeout ${LIMIT:-190} python3 -m fedmeld.simulations.cli lte-compare "${A[@]}" --jobs 12 > $O.log 2>&1
echo "lte-compare rc=$?"; date -u
python3 -m fedmeld.simulations.cli lte-compare "${A[@]}" --collect-only >> $O.log 2>&1
cd $O && tar czf "$OUT/lte-target-${SETTINGS:-iid,dir1.0}.tgz" lte_compare.* results.* grid.toml runs/*/summary.json runs/*/metrics.jsonl \
  logs $O.log 2>/dev/null
grep -E "finished [0-9]+ rounds|FAILED" $O.log | cut -c1-160; cat lte_compare.md
