"""The deployment round at several poll intervals (``FEDMELD_POLL_SECONDS``), one bare-client timing.

    python3 polls.py OUT.json RUNS_DIR 0.2 0.5 0.1

Runs ``fedmeld bench --federation``'s job (simulations.scaling's DEFAULTS, 8 clients, 5 rounds) under
its ``deployment_memory_eval_last`` runtime once per interval, through the bench's own functions, and
writes what ``bench --federation`` writes for a runtime, keyed ``poll_<seconds>``, after each run."""

import json
import os
import sys
from pathlib import Path

from fedmeld.simulations import bench
from fedmeld.simulations.run import load_config
from fedmeld.simulations.scaling import DEFAULTS

out, runs, polls = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), sys.argv[3:]
job = [*DEFAULTS, "num-clients=8", "min-clients=8", "num-server-rounds=5", f'out="{runs}"']
command, _ = bench.FEDERATION_RUNTIMES["deployment_memory_eval_last"]
result = {"job": job, "runtime": [*command, "--supernodes", "8", "client-eval-every=5"],
          "bare_clients": bench.bare_clients(load_config(None, job))}
for poll in polls:
    os.environ["FEDMELD_POLL_SECONDS"] = poll
    name = f"poll_{poll}"
    measured = bench.federated_rounds([*command, "--supernodes", "8", *job, "client-eval-every=5",
                                       f'run-name="{name}"'], runs / name, runs / f"{name}.trace.jsonl")
    if "steady_round_s" in measured:
        measured["round_over_slowest"] = round(measured["steady_round_s"] / result["bare_clients"]["slowest_s"], 2)
    result[name] = measured
    out.write_text(json.dumps(result, indent=1))
    print(name, measured.get("steady_round_s"), measured.get("round_over_slowest"), measured.get("error", ""), flush=True)
