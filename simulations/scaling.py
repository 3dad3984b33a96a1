"""Hospitals on separate GPUs: the same federated job over 1, 2, 4 ... GPUs, one SuperNode per client.

``fedmeld scaling --gpu-counts 1,2,4 --supernodes 8 [key=value ...]`` runs the
deployment recipe (``simulations.deploy``) once per GPU count, spreading the SuperNodes over the
first G GPUs round-robin, and writes JSON with the round wall time, per-client img/s and per-process
GPU memory for each G, plus the hardware and date. On a machine without GPUs, ``--gpu-counts 0``
runs everything on the one device (the CPU). The defaults are the issue's job: 8 clients,
PneumoniaMNIST resized to 224 px, a small ViT, LoRA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import datetime
from pathlib import Path

from fedmeld.task.config import ConfigError, describe
from fedmeld.server.report import hardware, versions
from fedmeld.simulations.deploy import run_deployment
from fedmeld.simulations.run import load_config

DEFAULTS = ["dataset=pneumoniamnist", "input-size=224", 'model="vit_small_patch16_224"', "peft=lora",
            "num-server-rounds=3", "local-epochs=1", "batch-size=64"]


def measure(run_dir: Path) -> dict[str, float]:
    """Steady-state figures: medians over rounds after the first (which pays start-up)."""
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rounds[1:] or rounds
    return {
        "round_seconds": statistics.median(r["round_seconds"] for r in steady),
        "first_round_seconds": rounds[0]["round_seconds"],
        "slowest_client_train_seconds": statistics.median(r["slowest_client_train_seconds"] for r in steady),
        "client_img_per_s": statistics.median(r["client_img_per_s"] for r in steady),
        "client_peak_memory_mb": max(r["client_peak_memory_mb"] for r in rounds),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmeld scaling", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="run-config keys (key = default {choices}):\n" + describe())
    parser.add_argument("--gpu-counts", default="1,2,4",
                        help="comma-separated GPU counts to run with (0: no GPU pinning, the default device)")
    parser.add_argument("--supernodes", type=int, default=8, help="SuperNodes (clients); default 8")
    parser.add_argument("--output", default="runs/scaling.json", help="JSON file to write")
    parser.add_argument("--home", help="folder for each GPU count's FLWR_HOME (state, logs); default: new temp dirs")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"run-config overrides on top of: {' '.join(DEFAULTS)}")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.gpu_counts.split(",") if c.strip()]
    results = []
    for gpus in counts:
        try:
            cfg = load_config(None, [*DEFAULTS, f"num-clients={args.supernodes}", f"min-clients={args.supernodes}",
                                     *args.overrides, f'run-name="scaling-{gpus}gpu-{datetime.now():%H%M%S}"'])
        except ConfigError as err:
            parser.error(str(err))
        home = Path(args.home) / f"{gpus}gpu" if args.home else Path(tempfile.mkdtemp(prefix=f"fedmeld-scaling-{gpus}-"))
        home.mkdir(parents=True, exist_ok=True)
        print(f"[scaling] {args.supernodes} SuperNodes over {gpus or 'no pinned'} GPU(s)", flush=True)
        run_dir = run_deployment(cfg, args.supernodes, [str(g) for g in range(gpus)], home)
        results.append({"gpus": gpus, "run_dir": str(run_dir), **measure(run_dir)})
        print(f"[scaling] {gpus} GPU(s): {results[-1]['round_seconds']:.1f} s/round, "
              f"{results[-1]['client_img_per_s']:.0f} img/s per client", flush=True)
    report = {"hardware": hardware(), "versions": versions(), "date": datetime.now().isoformat(timespec="seconds"),
              "supernodes": args.supernodes, "config": cfg.to_flower(), "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
