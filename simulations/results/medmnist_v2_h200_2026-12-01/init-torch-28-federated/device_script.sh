# #13's (28) row: central ResNet-18 (28), timm's init against PyTorch's defaults (init=torch), 3 seeds each, HEAD
set -u
R=$PWD
source .device/env.sh
mkdir -p /tmp/snap && tar -xzf .device/head.tgz -C /tmp/snap
(cd /tmp/snap && python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1) || echo "install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
cd /tmp
timeout "${1:-400}" python3 -m fedmeld.simulations.cli sweep --grid "$R/.device/v2e.toml" --backend inprocess --jobs 6 --out /dev/shm/v2e > /dev/shm/v2e.log 2>&1
echo "sweep rc=$?"; date -u
cd /dev/shm/v2e && tar czf "$OUT/v2e.tgz" results.* *.png runs/*/summary.json runs/*/metrics.jsonl runs/*/curves.png configs logs /dev/shm/v2e.log 2>/dev/null
cat results.md | head -30; tail -3 /dev/shm/v2e.log
