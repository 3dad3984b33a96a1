# Issue #18 on one H200 (16 cores), run from the repo root:
#   bash simulations/results/lte_h200_2026-12-01/run.sh explore          # ~4 min: LTE candidates x IID/Dir1.0/Dir0.5, seed 0
#   bash simulations/results/lte_h200_2026-12-01/run.sh final [LABEL]    # ~6 min: the fair table (lte.toml), 3 seeds
# The device bundle (`../shared/tools/device-bundle pneumoniamnist`) needs the Opacus wheel added:
# `pip download --no-deps opacus -d .device/wheels` (fedmeld.task.privacy imports it).
# LABEL (optional): a method label of explore.toml; its settings replace lte.toml's "lte" method.
# Writes $OUT/lte-<mode>.tgz (lte_compare.md/.json/.png, the sweep's results.*, grid.toml, every run's
# config, summary.json, metrics.jsonl and log) and prints the table.
set -u
MODE=${1:?usage: run.sh explore|final [LABEL]}; LABEL=${2:-}
R=$PWD; HERE=$R/simulations/results/lte_h200_2026-12-01
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm "$R" >/dev/null 2>&1 \
  || echo "fedmeld install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; date -u
cd /tmp  # not the repo root: its peft/ would shadow HF peft
case $MODE in
  explore) GRID=$HERE/explore.toml; LIMIT=210 ;;
  final)   GRID=$R/simulations/presets/lte.toml; LIMIT=${LIMIT:-330}
           if [ -n "$LABEL" ]; then
             GRID=/dev/shm/lte-final.toml
             python3 - "$R/simulations/presets/lte.toml" "$HERE/explore.toml" "$LABEL" "$GRID" <<'PY' || exit 1
import sys
from pathlib import Path
from fedmeld.simulations.lte_compare import load_grid, write_grid
final, explore = load_grid(Path(sys.argv[1])), load_grid(Path(sys.argv[2]), [sys.argv[3]])
final["axis"]["method"] = [t if t["label"] != "lte" else {**explore["axis"]["method"][0], "label": "lte"}
                           for t in final["axis"]["method"]]
write_grid(final, Path(sys.argv[4]))
print("lte row from explore.toml:", explore["axis"]["method"][0])
PY
           fi ;;
  *) echo "MODE must be explore or final"; exit 2 ;;
esac
O=/dev/shm/lte-$MODE
# the sweep under a time limit (what finished is kept), then the table from the runs that finished
# (progress: one line per finished run; everything in $O.log)
timeout $LIMIT python3 -m fedmeld.simulations.cli lte-compare --grid "$GRID" --jobs 14 --out $O 2>&1 | tee $O.log \
  | grep --line-buffered -E "finished [0-9]+ rounds|FAILED|runs finished"
echo "lte-compare rc=${PIPESTATUS[0]}"; date -u
python3 -m fedmeld.simulations.cli lte-compare --grid "$GRID" --out $O --collect-only >> $O.log 2>&1
cd $O && tar czf "$OUT/lte-$MODE.tgz" lte_compare.* results.* grid.toml accuracy_*.png runs/*/summary.json runs/*/metrics.jsonl \
  configs logs $O.log 2>/dev/null
cat lte_compare.md; tail -3 $O.log; date -u
