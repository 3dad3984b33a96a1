"""Run a grid of federated simulations and turn it into a table and plots.

``fedmeld sweep --grid FILE.toml`` or ``--preset NAME`` (files in
``simulations/presets/``). A grid file holds::

    [base]                      # run-config keys shared by every run
    num-server-rounds = 5
    [grid]                      # key = [values]: one axis per key
    model = ["resnet10t", "efficientnet_b0"]
    [[axis.split]]              # named axes of whole override tables, for values that go together
    label = "iid"
    partition = "iid"
    [[axis.split]]
    label = "dir0.1"
    partition = "dirichlet"
    dirichlet-alpha = 0.1

Runs are the product of all axes, repeated for each seed of ``--seeds 0,1,2`` (or a grid file's
``[sweep] seeds = [0, 1, 2]``) as ``<name>_seed<k>``; the tables then report mean ± std (sample
standard deviation) over the seeds of each config. Every config is checked before the first run starts. Each run
is a separate ``fedmeld run`` process writing ``<out>/runs/<name>/``; a run whose
summary.json exists is skipped, so an interrupted sweep resumes where it stopped (a half-written
run directory is kept aside as ``<name>.incomplete-<time>``, one whose config has since changed as
``<name>.stale-<time>``; nothing is deleted; a folder moved elsewhere keeps its finished runs). The sweep writes ``results.csv``, ``results.md``,
``accuracy_per_round.png`` and ``accuracy_vs_bytes.png`` every 30 s while it runs and at its end;
``--report-only`` writes them from the finished runs without running anything.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fedmeld.simulations.report import read_run, runs_table
from fedmeld.task.config import ConfigError, RunConfig, defaults, parse_pairs

PRESETS = Path(__file__).resolve().parent / "presets"
RESULT_KEYS = ("final_test_accuracy", "final_test_auc", "selected_round", "selected_test_accuracy",
               "selected_test_auc", "majority_class_accuracy", "trainable_params", "bytes_up_total", "bytes_down_total",
               "wall_seconds")
SCORES = ("final_test_accuracy", "final_test_auc", "selected_test_accuracy", "selected_test_auc")
SEED_SUFFIX = re.compile(r"_seed\d+$")
REPORT_EVERY = 30.0  # seconds between rewrites of the tables while a sweep runs (and once at its end)


def expand(grid: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, run-config overrides) of every run of a grid file, in a stable order. A name joins
    the values of the grid keys that have several and the ``label`` of every axis table, so a grid
    cut to one method (``fedmeld lte-compare --methods lte``) names its runs as the whole grid does."""
    unknown = set(grid) - {"base", "grid", "axis", "sweep"}
    if unknown:
        raise ConfigError(f"unknown grid section(s) {sorted(unknown)}; valid: base, grid, axis, sweep")
    axes = [(len(values) > 1, [(str(value), {key: value}) for value in values])
            for key, values in grid.get("grid", {}).items()]
    for axis_name, tables in grid.get("axis", {}).items():
        axes.append((True, [(t.get("label") or f"{axis_name}{i}", {k: v for k, v in t.items() if k != "label"})
                            for i, t in enumerate(tables)]))
    runs = []
    for combo in itertools.product(*(entries for _, entries in axes)):
        name = "_".join(label for (label, _), (named, _) in zip(combo, axes) if named) or "run"
        runs.append((re.sub(r"[^A-Za-z0-9=._+-]", "-", name),
                     {**grid.get("base", {}), **{k: v for _, part in combo for k, v in part.items()}}))
    return runs


def plan(grid: dict[str, Any], out: Path, seeds: list[int] | None = None) -> list[tuple[str, RunConfig]]:
    """(name, config) per run, all validated before anything runs; with ``seeds`` (default: the grid
    file's ``[sweep] seeds``), every config once per seed."""
    seeds = seeds if seeds is not None else grid.get("sweep", {}).get("seeds")
    planned = []
    for config_name, overrides in expand(grid):
        for name, seeded in ([(f"{config_name}_seed{s}", {**overrides, "seed": s}) for s in seeds] if seeds
                             else [(config_name, overrides)]):
            try:
                cfg = RunConfig.from_mapping({**seeded, "out": str(out / "runs"), "run-name": name})
            except ConfigError as err:
                raise ConfigError(f"grid run {name}: {err}") from None
            planned.append((name, cfg))
    names = [n for n, _ in planned]
    if len(set(names)) != len(names):
        raise ConfigError("two grid runs got the same name; give the axis tables distinct labels")
    return planned


def same_run(done: dict[str, Any], planned: dict[str, Any]) -> bool:
    """Whether a finished run's config is the planned one. ``out`` (where the sweep folder lay when the run
    wrote it) is left out, so a sweep folder copied to another path or machine still skips its finished runs;
    a key added to fedmeld since the run counts with its default (as a resumed checkpoint does)."""
    done = {**defaults(), **done}
    return {k: v for k, v in done.items() if k != "out"} == {k: v for k, v in planned.items() if k != "out"}


def run_one(name: str, cfg: RunConfig, out: Path, backend: str = "ray", threads: int = 0) -> bool:
    """One simulation in its own process (fresh Ray, fresh memory); True if it finished. ``threads``
    caps its CPU threads (0: torch's default, every core), so parallel runs do not oversubscribe."""
    run_dir = out / "runs" / name
    summary = run_dir / "summary.json"
    if summary.is_file() and same_run(json.loads(summary.read_text())["config"], cfg.to_flower()):
        print(f"[sweep] {name}: done before, skipped", flush=True)
        return True
    if run_dir.exists():  # cut off, or run with another config: keep it aside, never delete
        why = "stale" if summary.is_file() else "incomplete"
        run_dir.rename(run_dir.with_name(f"{name}.{why}-{time.strftime('%Y%m%d-%H%M%S')}"))
    config_file = out / "configs" / f"{name}.toml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in cfg.to_flower().items()))
    log_file = out / "logs" / f"{name}.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {name}: running (log: {log_file})", flush=True)
    with log_file.open("w", buffering=1) as log:  # line by line: a killed sweep keeps its runs' logs
        proc = subprocess.Popen([sys.executable, "-m", "fedmeld.simulations.run", "--config", str(config_file),
                                 "--backend", backend],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=Path(__file__).resolve().parent.parent,
                                env={**os.environ, "PYTHONUNBUFFERED": "1",  # progress as it happens
                                     **({"OMP_NUM_THREADS": str(threads)} if threads else {})})
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[fedmeld]"):
                print(f"[sweep] {name}: {line[10:].rstrip()}", flush=True)
    if proc.wait() != 0:
        print(f"[sweep] {name}: FAILED (exit {proc.returncode}); see {log_file}", flush=True)
        return False
    return True


def collect(planned: list[tuple[str, RunConfig]], out: Path) -> list[dict[str, Any]]:
    rows = []
    for name, cfg in planned:
        run_dir = out / "runs" / name
        if not (run_dir / "summary.json").is_file():
            continue
        run = read_run(run_dir)
        replies = sum(r["num_clients_ok"] for r in run["rounds"])
        rows.append({**run, "config_name": SEED_SUFFIX.sub("", name), "seed": cfg.seed,
                     "bytes_up_per_client_round": round(run["bytes_up_total"] / max(replies, 1)),
                     "weights": cfg.weights or ("pretrained" if cfg.pretrained else f"random init (seed {cfg.seed})"),
                     "accuracy_per_round": [r["test_accuracy"] for r in run["rounds"]]})
    return rows


def mean_std(values: list[float]) -> str:
    """``mean ± std`` (sample standard deviation) of several runs, the value of one."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def by_config(rows: list[dict[str, Any]]) -> list[str]:
    """One markdown table row per config: mean ± std over its seeds."""
    lines = ["| config | seeds | last test ACC | last test AUC | selected test ACC | selected test AUC | majority | "
             "trainable params | bytes up/client-round | wall s (mean) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for config in dict.fromkeys(r["config_name"] for r in rows):
        runs = [r for r in rows if r["config_name"] == config]
        scores = [mean_std([float(r[k]) for r in runs]) for k in SCORES]
        lines.append(f"| {config} | {','.join(str(r['seed']) for r in runs)} | {' | '.join(scores)} | "
                     f"{runs[0]['majority_class_accuracy']:.3f} | {runs[0]['trainable_params']:,} | "
                     f"{runs[0]['bytes_up_per_client_round']:,} | {statistics.mean(r['wall_seconds'] for r in runs):.0f} |")
    return lines


def write_reports(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    columns = ["run", "config", "seed", *RESULT_KEYS, "bytes_up_per_client_round", "weights", "hardware", "date"]
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({**r, "config": r["config_name"]} for r in rows)
    lines = [f"# {title}", ""]
    if any(r["config_name"] != r["run"] for r in rows):
        lines += ["Mean ± sample std over seeds; \"selected\": the round the official validation split "
                  "selects (`select-metric`).", "", *by_config(rows), "", "Every run:", ""]
    lines += runs_table(rows)
    if rows:
        weights = sorted({r["weights"] for r in rows})
        lines += ["", f"Weights: {'; '.join(weights)}. Hardware: {rows[0]['hardware']}; dates "
                      f"{min(r['date'] for r in rows)} to {max(r['date'] for r in rows)}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plots(rows, out)


def _plots(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.plot(range(1, len(r["accuracy_per_round"]) + 1), r["accuracy_per_round"], marker="o", ms=3, label=r["run"])
    ax.set(xlabel="round", ylabel="test accuracy", title="Test accuracy per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy_per_round.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    groups = sorted({r["config_name"].rsplit("_", 1)[0] for r in rows})  # one colour per method: "<method>_<axis>"
    for group in groups:
        members = [r for r in rows if r["config_name"].rsplit("_", 1)[0] == group]
        sent = [r["bytes_up_total"] + r["bytes_down_total"] for r in members]
        ax.scatter(sent, [r["final_test_accuracy"] for r in members], label=group)
        for r, x in zip(members, sent):
            ax.annotate(r["run"][len(group) + 1:], (x, r["final_test_accuracy"]), fontsize=6)
    if len(groups) > 1:
        ax.legend(fontsize=6)
    ax.set(xscale="log", xlabel="bytes sent, both directions (total)", ylabel="final test accuracy",
           title="Accuracy against bytes")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_bytes.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmeld sweep", description=__doc__.split("\n\n")[0],
                                     epilog=f"presets: {', '.join(sorted(p.stem for p in PRESETS.glob('*.toml')))}")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--grid", metavar="FILE.toml", help="grid file (format in this module's docstring)")
    source.add_argument("--preset", help="a grid file from simulations/presets/, by name")
    parser.add_argument("--out", help="sweep directory; default runs/sweep-<name>. Re-run with the same --out "
                                      "to resume.")
    parser.add_argument("--backend", choices=("ray", "inprocess"), default="ray",
                        help="simulation backend of every run (see fedmeld run --help)")
    parser.add_argument("--set", nargs="*", default=[], metavar="key=value",
                        help="overrides applied to every run (e.g. num-server-rounds=2 for a smoke test)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs at a time, each its own process (a GPU box: several; default 1)")
    parser.add_argument("--seeds", metavar="0,1,2", help="run every config once per seed; tables give mean ± std "
                                                         "(default: the grid file's [sweep] seeds, else one run)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the tables and plots of the runs already finished in --out "
                             "(e.g. of a sweep that was cut off)")
    args = parser.parse_args(argv)
    path = Path(args.grid) if args.grid else PRESETS / f"{args.preset}.toml"
    if not path.is_file():
        parser.error(f"no grid file {path}")
    grid = tomllib.loads(path.read_text())
    try:
        grid["base"] = {**grid.get("base", {}), **parse_pairs(args.set)}
        out = Path(args.out or f"runs/sweep-{path.stem}").resolve()
        if args.jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {args.seeds!r}") from None
        planned = plan(grid, out, seeds)
    except ConfigError as err:
        parser.error(str(err))
    title = f"Sweep {path.stem}"
    if args.report_only:
        rows = collect(planned, out)
        if not rows:
            parser.error(f"--report-only: no finished run of this grid in {out} (run the sweep without "
                         f"--report-only first, with the same --out, --seeds and --set)")
        write_reports(rows, out, title)
        print(f"[sweep] {len(rows)}/{len(planned)} runs finished; tables in {out}", flush=True)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] {len(planned)} runs into {out}", flush=True)
    failed, lock, written = [], threading.Lock(), [time.monotonic()]

    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else 0

    def run(item: tuple[str, RunConfig]) -> None:
        if not run_one(*item, out, args.backend, threads):
            failed.append(item[0])
        with lock:  # current while the sweep runs, but at most every REPORT_EVERY s: hundreds of short
            if time.monotonic() - written[0] >= REPORT_EVERY:  # runs would otherwise queue on this lock
                write_reports(collect(planned, out), out, title)
                written[0] = time.monotonic()

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is a process of its own
        list(pool.map(run, planned))
    write_reports(collect(planned, out), out, title)
    print(f"[sweep] {len(planned) - len(failed)}/{len(planned)} runs finished; tables in {out}", flush=True)
    print(out)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
