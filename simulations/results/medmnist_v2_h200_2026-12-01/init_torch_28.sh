# #13's (28) rows on the H200, run from the repo root with carry [".device"] as
#   bash init_torch_28.sh v2d 300   (init-torch-28-central: grid.toml there was .device/v2d.toml)
#   bash init_torch_28.sh v2e 330   (init-torch-28-federated: .device/v2e.toml)
# HEAD 5c336f4 packed with `git archive HEAD | gzip > .device/head.tgz`, installed on the device.
set -u
R=$PWD; G=$1
source .device/env.sh
mkdir -p /tmp/snap && tar -xzf .device/head.tgz -C /tmp/snap
(cd /tmp/snap && python3 -m pip install -q --no-deps --no-build-isolation --no-index --upgrade --target /tmp/fm . >/dev/null 2>&1) || echo "install failed"
export PYTHONPATH=/tmp/fm:$PYTHONPATH
nvidia-smi --query-gpu=name --format=csv,noheader; date -u
cd /tmp
timeout "${2:-400}" python3 -m fedmeld.simulations.cli sweep --grid "$R/.device/$G.toml" --backend inprocess --jobs 6 --out /dev/shm/$G > /dev/shm/$G.log 2>&1
echo "sweep rc=$?"; date -u
cd /dev/shm/$G && tar czf "$OUT/$G.tgz" results.* *.png runs/*/summary.json runs/*/metrics.jsonl runs/*/curves.png configs logs /dev/shm/$G.log 2>/dev/null
cat results.md | head -30; tail -3 /dev/shm/$G.log
