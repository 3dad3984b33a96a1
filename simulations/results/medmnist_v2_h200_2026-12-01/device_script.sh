set -u
R=$PWD
source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1 || echo "install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; date -u
mkdir -p .device/sweep
cd /tmp
timeout "${1:-560}" python3 -m fedmeld.simulations.cli sweep --preset medmnist-v2 --backend inprocess --jobs 18 --out /dev/shm/sweep > "$R/.device/sweep.log" 2>&1
echo "sweep rc=$?"; date -u
cd /dev/shm/sweep && tar czf "$OUT/v2.tgz" results.* *.png runs/*/summary.json runs/*/metrics.jsonl runs/*/curves.png configs logs "$R/.device/sweep.log" 2>/dev/null
grep -c "summary" /dev/null; for f in runs/*/metrics.jsonl; do echo "$f $(wc -l < $f)"; done; tail -3 "$R/.device/sweep.log"
