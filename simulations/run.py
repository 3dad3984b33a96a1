"""Run one federated simulation: ``fedmeld run [--config FILE.toml] [key=value ...]``.

The keys are the app's run-config keys (``[tool.flwr.app.config]`` in pyproject.toml), so this and
``flwr run .`` take the same settings. Bad keys and values, a missing or unreadable data or
weights file, an unknown model and a used run directory are refused (one line, exit 2) before
Flower or Ray start, and leave nothing behind. The console shows fedmeld's own lines (one per
round, a summary); Flower's and Ray's go to ``RUN_DIR/flower.log`` unless ``--verbose``. The last
line printed is the run directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fedmeld.server.report import LOG_FILE, default_run_name, run_dir_path, run_title
from fedmeld.task.config import ConfigError, RunConfig, describe, parse_pairs

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


def preflight(cfg: RunConfig) -> None:
    """Everything a run reads, checked before Flower or Ray start, so that a bad input costs one
    line and no run directory: the output directory, the model name, the data file (downloaded
    now if absent and the network allows) and the model with its weights and adapters. Raises
    ConfigError, OSError (DataFileError, FileExistsError) or RuntimeError (WeightsError)."""
    import timm

    from fedmeld.task.data import load_split, task_info
    from fedmeld.task.model import build_model  # also registers fedmeld's own timm models

    if not cfg.resume:
        run_dir_path(cfg.out, cfg.run_name)
    if not timm.is_model(cfg.model):
        raise ConfigError(f"model={cfg.model!r} is not a timm model; list the names with python -c \"import timm; "
                          f"print(timm.list_models('*{cfg.model[:4]}*'))\"")
    load_split(cfg.dataset, "train", cfg.image_size, cfg.data_root)
    build_model(cfg, task_info(cfg.dataset))


@contextmanager
def console(run_dir: Path, verbose: bool) -> Iterator[None]:
    """fedmeld's lines on the console; Flower's INFO records, library log lines (alembic, Ray) and
    Python warnings (Flower's deprecation of run_simulation, Ray's accelerator FutureWarning: both
    about the libraries' own futures, nothing a user can act on) into ``run_dir/flower.log``.
    ``verbose``: everything on the console, as the libraries print it."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("flwr").propagate = False  # Flower prints through its own handler
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(run_dir / LOG_FILE)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler()
    to_console.setLevel(logging.WARNING)  # a rejected reply, a failed client: the user must see those
    to_console.setFormatter(logging.Formatter("[fedmeld] %(levelname)s: %(message)s"))
    root, flwr, ours = logging.getLogger(), logging.getLogger("flwr"), logging.getLogger("fedmeld")
    saved = root.handlers, root.level, flwr.handlers, flwr.propagate, ours.handlers
    root.handlers, flwr.handlers, flwr.propagate, ours.handlers = [to_file], [to_file], False, [to_console]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers, level, flwr.handlers, flwr.propagate, ours.handlers = saved
        root.setLevel(level)
        to_file.close()


def simulate(cfg: RunConfig, backend: str = "ray", verbose: bool = True, devices: Sequence[str] = ()) -> Path:
    """Run the apps under Flower's simulation runtime (``ray``) or the in-process Grid (with
    ``devices``: one worker thread per device, clients round-robin); return the run directory.
    Not ``verbose``: Flower's and Ray's logs go to the run directory's flower.log."""
    import torch
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedmeld.client.app import app as client_app
    from fedmeld.server.app import federate

    # refuse a used directory before starting anything (unless continuing it)
    run_dir = Path(cfg.resume).expanduser().resolve() if cfg.resume else run_dir_path(cfg.out, cfg.run_name)
    if backend == "inprocess":
        with console(run_dir, verbose):
            return _simulate_inprocess(cfg, devices)

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
        "init_args": {"num_cpus": cpus, "num_gpus": gpus, "logging_level": "ERROR", "log_to_driver": verbose},
    }
    with console(run_dir, verbose):
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients,
                       backend_config=backend)
    if not (run_dir / "summary.json").is_file():
        raise RuntimeError(f"the simulation ended without writing {run_dir / 'summary.json'}; see "
                           f"{run_dir / LOG_FILE}" + (" and the log above" if verbose else ""))
    return run_dir


def _simulate_inprocess(cfg: RunConfig, devices: Sequence[str] = ()) -> Path:
    from fedmeld.client.app import app as client_app
    from fedmeld.server.app import federate
    from fedmeld.task.flower.inprocess import InProcessGrid

    grid = InProcessGrid(client_app, cfg.num_clients, devices)
    try:
        return federate(grid, cfg)
    finally:
        grid.close()


def parse_devices(value: str) -> list[str]:
    """``--devices``: comma-separated devices, or ``gpus`` for every visible GPU (none: no workers)."""
    from fedmeld.task.flower.inprocess import check_devices

    if value.strip() == "gpus":
        import torch

        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    try:
        return check_devices([d.strip() for d in value.split(",") if d.strip()])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


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
                             "process, no Ray (GPU boxes without Ray, quick runs)")
    parser.add_argument("--devices", type=parse_devices, default=[], metavar="LIST",
                        help="inprocess backend: one worker thread per device (e.g. cuda:0,cuda:1, or gpus for every "
                             "visible GPU; each device once), client i on worker i mod N (its device), the workers "
                             "training at once; default: every client in turn on the run config's device")
    parser.add_argument("--verbose", action="store_true",
                        help="print Flower's and Ray's log lines and library warnings on the console (default: "
                             "into RUN_DIR/flower.log, with fedmeld's own progress and summary on the console)")
    args = parser.parse_args(argv)
    if args.devices and args.backend != "inprocess":
        print("fedmeld run: error: --devices places clients of the in-process backend: add --backend inprocess",
              file=sys.stderr)
        return 2
    try:
        cfg = resume_config(Path(args.resume), args.overrides) if args.resume else load_config(args.config,
                                                                                                args.overrides)
        preflight(cfg)
    except (ConfigError, OSError, RuntimeError, ValueError, tomllib.TOMLDecodeError) as err:
        print(f"fedmeld run: error: {err}", file=sys.stderr)  # one line; nothing has started or been written
        return 2
    run_dir = Path(cfg.resume or Path(cfg.out) / cfg.run_name)
    print(f"[fedmeld] {run_title(cfg.to_flower())} | {cfg.num_server_rounds} rounds | {args.backend} backend"
          + ("" if args.verbose else f" | Flower's log: {run_dir / LOG_FILE}"), flush=True)
    print(simulate(cfg, args.backend, args.verbose, args.devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
