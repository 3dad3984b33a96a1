source .device/env.sh
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/fm . >/dev/null 2>&1 || echo "install failed"
export PYTHONPATH=/tmp/fm:/tmp/site
mkdir -p /tmp/b && cd /tmp/b && date -u
timeout 80 python3 -m fedmeld.simulations.bench --models --federation num-server-rounds=5 'out="/tmp/b/fed-runs"' --federation-runtimes simulation --out $OUT/bench_h100_2026-12-06b_federation.json > fed.log 2>&1; echo "fed rc=$?"
timeout 75 python3 -m fedmeld.simulations.bench --models convnext_tiny --modes full lora lora-frozen-a --product-compile off --data-flag pneumoniamnist --warmup 5 --repeats 2 --out $OUT/bench_h100_2026-12-06b_convnext.json > rows.log 2>&1; echo "rows rc=$?"
tail -12 rows.log; date -u
tar czf $OUT/b.tgz fed.log rows.log fed-runs/*.trace.jsonl fed-runs/*/metrics.jsonl 2>/dev/null
