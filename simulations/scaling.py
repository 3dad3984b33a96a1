"""Hospitals on separate GPUs: the same federated job over 1, 2, 4 ... GPUs, one client per node.

``fedmeld scaling --gpu-counts 1,2,4 --supernodes 8 [--backend deploy|inprocess] [--preset NAME]
[key=value ...]`` runs the job once per GPU count G, its clients spread over the first G GPUs
round-robin, and writes JSON with the round wall time, per-client img/s and per-process GPU memory
for each G, plus the hardware and date. ``deploy`` (default): the deployment recipe
(``simulations.deploy``), one SuperNode per client. ``inprocess``: the in-process backend with one
worker thread per GPU (``fedmeld run --backend inprocess --devices``), no SuperLink. On a machine
without GPUs, ``--gpu-counts 0`` runs everything on the CPU (``--cpu-workers K``: K in-process
workers on it). The default job is the federation-overhead one: 8 clients, PneumoniaMNIST resized to
224 px, a small ViT, LoRA, one local epoch: at one GPU its round is mostly fixed cost. ``--preset
compute-bound`` is a job whose round is mostly the clients' training (``PRESETS``), which is what
several GPUs can speed up.
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
from fedmeld.simulations.run import load_config, simulate

DEFAULTS = ["dataset=pneumoniamnist", "input-size=224", 'model="vit_small_patch16_224"', "peft=lora",
            "num-server-rounds=3", "local-epochs=1", "batch-size=64"]
PRESETS = {  # overrides on top of DEFAULTS
    # ViT-B/16 at 224 px, LoRA, 3 local epochs of batch 64, CUDA graphs: on the H200 a client's round is
    # seconds of GPU work, against a fixed cost per round under a second
    "compute-bound": ['model="vit_base_patch16_224"', "local-epochs=3", 'compile="cudagraphs"'],
}
BACKENDS = ("deploy", "inprocess")


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
    parser.add_argument("--backend", choices=BACKENDS, default="deploy",
                        help="deploy: SuperLink + one SuperNode per client (default); inprocess: the in-process "
                             "backend, one worker thread per GPU")
    parser.add_argument("--cpu-workers", type=int, default=0, metavar="K",
                        help="--backend inprocess at --gpu-counts 0: K worker threads on the CPU (0: the clients "
                             "in turn)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="a job other than the default: " + "; ".join(
        f"{name}: {' '.join(keys)}" for name, keys in PRESETS.items()))
    parser.add_argument("--output", default="runs/scaling.json", help="JSON file to write")
    parser.add_argument("--home", help="folder for each GPU count's FLWR_HOME (state, logs); default: new temp dirs")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"run-config overrides on top of the preset's keys and: {' '.join(DEFAULTS)}")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.gpu_counts.split(",") if c.strip()]
    results = []
    for gpus in counts:
        try:
            cfg = load_config(None, [*DEFAULTS, *PRESETS.get(args.preset, []), f"num-clients={args.supernodes}",
                                     f"min-clients={args.supernodes}", *args.overrides,
                                     f'run-name="scaling-{args.backend}-{gpus}gpu-{datetime.now():%H%M%S}"'])
        except ConfigError as err:
            parser.error(str(err))
        print(f"[scaling] {args.supernodes} clients ({args.backend}) over {gpus or 'no pinned'} GPU(s)", flush=True)
        if args.backend == "inprocess":
            devices = [f"cuda:{g}" for g in range(gpus)] or [f"cpu:{k}" for k in range(args.cpu_workers)]
            run_dir = simulate(cfg, "inprocess", verbose=False, devices=devices)
        else:
            home = Path(args.home) / f"{gpus}gpu" if args.home else \
                Path(tempfile.mkdtemp(prefix=f"fedmeld-scaling-{gpus}-"))
            home.mkdir(parents=True, exist_ok=True)
            run_dir = run_deployment(cfg, args.supernodes, [str(g) for g in range(gpus)], home)
        results.append({"gpus": gpus, "run_dir": str(run_dir), **measure(run_dir)})
        print(f"[scaling] {gpus} GPU(s): {results[-1]['round_seconds']:.1f} s/round, "
              f"{results[-1]['client_img_per_s']:.0f} img/s per client", flush=True)
    report = {"hardware": hardware(), "versions": versions(), "date": datetime.now().isoformat(timespec="seconds"),
              "supernodes": args.supernodes, "backend": args.backend, "preset": args.preset,
              "config": cfg.to_flower(), "results": results}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
