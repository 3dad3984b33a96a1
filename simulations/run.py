"""Run one federated simulation: ``fedmeld run [--config FILE.toml] [key=value ...]``.

The keys are the app's run-config keys (``[tool.flwr.app.config]`` in pyproject.toml), so this and
``flwr run .`` take the same settings. Bad keys and values are refused before anything starts.
The last line printed is the run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from fedmeld.task.config import ConfigError, RunConfig, describe, parse_pairs
from fedmeld.server.report import default_run_name, run_dir_path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def load_config(config_file: str | None, pairs: list[str]) -> RunConfig:
    """Defaults, then the TOML file (a flat table of run-config keys), then key=value pairs."""
    overrides: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as f:
            overrides.update(tomllib.load(f))
    overrides.update(parse_pairs(pairs))
    cfg = RunConfig.from_mapping(overrides)
    run_name = cfg.run_name or default_run_name(cfg)
    return RunConfig.from_mapping({**cfg.to_flower(), "out": str(Path(cfg.out).expanduser().resolve()),
                                   "run-name": run_name})


def resume_config(run_dir: Path, pairs: list[str]) -> RunConfig:
    """The config of the interrupted run in ``run_dir``, to continue it (checked before anything starts)."""
    from fedmeld.server.checkpoint import Checkpoint

    run_dir = run_dir.expanduser().resolve()
    checkpoint = Checkpoint.load(run_dir)
    cfg = RunConfig.from_mapping({**checkpoint.config, **parse_pairs(pairs), "resume": str(run_dir),
                                  "out": str(run_dir.parent), "run-name": run_dir.name})
    checkpoint.check(cfg)
    return cfg


def simulate(cfg: RunConfig, backend: str = "ray") -> Path:
    """Run the apps under Flower's simulation runtime (``ray``) or the in-process Grid; return the
    run directory."""
    import torch
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmeld.client.app import app as client_app
    from fedmeld.server.app import federate

    # refuse a used directory before starting anything (unless continuing it)
    run_dir = Path(cfg.resume).expanduser().resolve() if cfg.resume else run_dir_path(cfg.out, cfg.run_name)
    if backend == "inprocess":
        return _simulate_inprocess(cfg)

    # run_simulation() hands the ServerApp an empty run config, so this one closes over ours;
    # clients receive it with every instruction, exactly as under `flwr run`.
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        federate(grid, cfg)

    gpus = torch.cuda.device_count()
    cpus = os.cpu_count() or 1
    parallel = max(1, min(cfg.num_clients, cpus))
    backend = {
        "client_resources": {"num_cpus": max(1, cpus // parallel), "num_gpus": 1.0 / parallel if gpus else 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "logging_level": "ERROR", "log_to_driver": True},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients,
                   backend_config=backend)
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'summary.json'}; see the log above")
    return run_dir


def _simulate_inprocess(cfg: RunConfig) -> Path:
    from fedmeld.client.app import app as client_app
    from fedmeld.server.app import federate
    from fedmeld.task.flower.inprocess import InProcessGrid

    return federate(InProcessGrid(client_app, cfg.num_clients), cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmeld run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a federated fedmeld simulation and write its run directory "
                    "(metrics.jsonl, summary.json, curves.png, adapter and merged-model safetensors).",
        epilog="run-config keys (key = default {choices}):\n" + describe(),
    )
    parser.add_argument("--config", metavar="FILE.toml", help="TOML file with a flat table of run-config keys")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="run-config overrides, TOML values")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run after its last completed "
                                                            "round, with its config (key=value may set only "
                                                            "data-root and device)")
    parser.add_argument("--backend", choices=("ray", "inprocess"), default="ray",
                        help="ray: Flower's simulation runtime (default); inprocess: every client in this "
                             "process, one after another, no Ray (GPU boxes without Ray, quick runs)")
    args = parser.parse_args(argv)
    try:
        cfg = resume_config(Path(args.resume), args.overrides) if args.resume else load_config(args.config,
                                                                                                args.overrides)
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
    run_dir = simulate(cfg, args.backend)
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
