"""The deployment round at several poll intervals (``FEDMELD_POLL_SECONDS``), one bare-client timing.

    python3 polls.py OUT.json RUNS_DIR 0.2 0.5 0.1

Runs ``fedmeld bench --federation``'s job (simulations.scaling's DEFAULTS, 8 clients, 5 rounds) under
its ``deployment_memory_eval_last`` runtime once per interval, through the bench's own functions, and
writes what ``bench --federation`` writes for a runtime, keyed ``poll_<seconds>``, after each run.
The committed JSON came from this script before it called ``bench.measure_runtime`` (same commands,
same ratios; it then wrote the runtime's command line under "runtime" and no ``round_over_sum``)."""

import json
import os
import sys
from pathlib import Path

from fedmeld.simulations import bench
from fedmeld.simulations.run import load_config
from fedmeld.simulations.scaling import DEFAULTS

out, runs, polls = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3:]
job = [*DEFAULTS, "num-clients=8", "min-clients=8", "num-server-rounds=5", f'out="{runs}"']
cfg = load_config(None, job)
result = {"job": job, "runtime": "deployment_memory_eval_last", "bare_clients": bench.bare_clients(cfg)}
for poll in polls:
    os.environ["FEDMELD_POLL_SECONDS"] = poll  # the deployment's processes inherit it
    measured = result[f"poll_{poll}"] = bench.measure_runtime("deployment_memory_eval_last", job, cfg,
                                                              result["bare_clients"], f"poll_{poll}")
    out.write_text(json.dumps(result, indent=1))
    print(f"poll_{poll}", measured.get("steady_round_s"), measured.get("round_over_slowest"), measured.get("error", ""),
          flush=True)
