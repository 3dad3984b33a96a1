"""LTE against full training and LoRA, central and federated, at equal rounds and samples seen.

``fedmeld lte-compare [--small | --gpu | --grid FILE] [--methods ...] [--settings ...] [--seeds 0,1,2]
[--jobs N] [--out DIR] [--set key=value ...]``

The comparison is a sweep (``simulations/sweep.py``: every run its own ``fedmeld run`` process,
``--jobs`` at a time, resumable, one run per seed) of a grid with exactly two axes: ``method``
(full, lora, lte, ...: how the network trains) times ``setting`` (central: one client holding the
whole training split; iid, dir1.0, dir0.5: 4 clients). Every method keeps its settings in every
setting, and every run passes once (``local-epochs`` times) per round over the same training split,
so rows differ only in method and split. Presets: ``simulations/presets/lte-small.toml``
(``--small``, CPU, minutes) and ``lte.toml`` (``--gpu``, one H200, 3 seeds).

``--out`` receives the sweep's own files (runs/, results.md, ...) and three more:
``lte_compare.md`` (the table: mean ± std over seeds of the test ACC/AUC at the round the
validation split selects, and at the last round; bytes per client-round and their ratio to the
``full`` method of the same setting; the issue's targets checked), ``lte_compare.json``
(everything in it, per run too, with per-round curves) and ``lte_compare.png`` (mean test
accuracy against samples seen, one panel per setting).

Bytes per client-round: upload plus download per client and round as the federation counted
them (ArrayRecord payload bytes); a central run counts its one client.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tomllib
from datetime import datetime
from pathlib import Path
from typing import Any

from fedmeld.simulations import sweep
from fedmeld.task.config import ConfigError, parse_pairs

PRESETS = {"small": sweep.PRESETS / "lte-small.toml", "gpu": sweep.PRESETS / "lte.toml"}
REFERENCE = "full"  # the method every row's bytes are compared with, in the same setting
CLOSE_SETTINGS = ("iid", "dir1.0")  # where federated LTE should be within TARGET_POINTS of federated full
SKEWED_SETTINGS = ("dir0.5",)  # where it should beat the majority rate wherever federated full does
TARGET_POINTS, TARGET_BYTES = 2.0, 0.15
SCORES = ("selected_test_accuracy", "selected_test_auc", "final_test_accuracy", "final_test_auc")
JSON_KEYS = ("date", "hardware", "versions", "grid", "dataset", "model", "majority_class_accuracy", "rows",
             "targets", "unfinished_runs", "runs")
ROW_KEYS = ("method", "setting", "config", "seeds", "num_clients", *(f"{s}_{k}" for s in SCORES for k in ("mean", "std")),
            "trainable_params", "bytes_per_client_round", "bytes_ratio_vs_full", "samples_seen", "wall_seconds")


def load_grid(path: Path, methods: list[str] | None = None, settings: list[str] | None = None,
              overrides: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """The grid file, cut to the named methods and settings; its base between ``defaults`` (which the
    file's keys replace) and ``overrides`` (which replace the file's)."""
    grid = tomllib.loads(path.read_text())
    axes = grid.get("axis", {})
    if set(axes) != {"method", "setting"} or "grid" in grid:
        raise ConfigError(f"{path}: an lte-compare grid has exactly two axis tables, [[axis.method]] and "
                          f"[[axis.setting]], and no [grid] section; got axes {sorted(axes)}")
    cut = {}
    for axis, wanted in (("method", methods), ("setting", settings)):
        labels = [t.get("label") for t in axes[axis]]
        if None in labels or len(set(labels)) != len(labels):
            raise ConfigError(f"{path}: every [[axis.{axis}]] table needs a distinct label; got {labels}")
        unknown = sorted(set(wanted or []) - set(labels))
        if unknown:
            raise ConfigError(f"unknown {axis}(s) {', '.join(unknown)}; {path.name} has {', '.join(labels)}")
        cut[axis] = [t for t in axes[axis] if not wanted or t["label"] in wanted]
    return {**grid, "base": {**(defaults or {}), **grid.get("base", {}), **(overrides or {})}, "axis": cut}


def config_labels(grid: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Config name (as the sweep names it) -> (method, setting)."""
    pairs = itertools.product(*([t["label"] for t in grid["axis"][a]] for a in ("method", "setting")))
    return {name: pair for (name, _), pair in zip(sweep.expand(grid), pairs)}


def write_grid(grid: dict[str, Any], path: Path) -> None:
    """The grid as a TOML file for ``fedmeld sweep --grid`` (kept in --out: what was run)."""
    def value(v: Any) -> str:
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = []
    if "sweep" in grid:
        lines += ["[sweep]", *(f"{k} = {value(v)}" for k, v in grid["sweep"].items()), ""]
    lines += ["[base]", *(f"{k} = {value(v)}" for k, v in grid["base"].items()), ""]
    for axis in ("method", "setting"):
        for table in grid["axis"][axis]:
            lines += [f"[[axis.{axis}]]", *(f"{k} = {value(v)}" for k, v in table.items()), ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def curve(run: dict[str, Any]) -> list[dict[str, Any]]:
    """Test ACC/AUC after each round against the training samples seen so far (round 0: the init,
    when the run evaluated it)."""
    points = [] if run.get("initial_test_accuracy") is None else [
        {"round": 0, "samples_seen": 0, "test_accuracy": run["initial_test_accuracy"],
         "test_auc": run.get("initial_test_auc")}]
    seen = 0
    for r in run["rounds"]:
        seen += int(r["samples_seen"])
        points.append({"round": r["round"], "samples_seen": seen, "test_accuracy": r["test_accuracy"],
                       "test_auc": r["test_auc"]})
    return points


def summarize(runs: list[dict[str, Any]], labels: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Rows (mean ± std over seeds per method and setting), bytes against ``full`` and the targets."""
    rows = []
    for config, (method, setting) in labels.items():
        group = [r for r in runs if r["config_name"] == config]
        if not group:
            continue
        row: dict[str, Any] = {"method": method, "setting": setting, "config": config,
                               "seeds": [r["seed"] for r in group], "num_clients": group[0]["config"]["num-clients"]}
        for score in SCORES:
            values = [float(r[score]) for r in group]
            row[f"{score}_mean"] = statistics.mean(values)
            row[f"{score}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        row.update(trainable_params=group[0]["trainable_params"],
                   bytes_per_client_round=statistics.mean(r["bytes_per_client_round"] for r in group),
                   samples_seen=group[0]["samples_seen"], wall_seconds=statistics.mean(r["wall_seconds"] for r in group),
                   majority_class_accuracy=group[0]["majority_class_accuracy"])
        rows.append(row)
    full = {r["setting"]: r for r in rows if r["method"] == REFERENCE}
    for row in rows:
        ref = full.get(row["setting"])
        row["bytes_ratio_vs_full"] = row["bytes_per_client_round"] / ref["bytes_per_client_round"] if ref else None
    return {"rows": rows, "targets": targets(rows)}


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets for federated LTE (every method labelled lte...) against federated full
    of the same split."""
    by = {(r["method"], r["setting"]): r for r in rows}
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m.startswith("lte")]
    checks = []
    for method, setting in itertools.product(methods, (*CLOSE_SETTINGS, *SKEWED_SETTINGS)):
        lte, full = by.get((method, setting)), by.get((REFERENCE, setting))
        if not (lte and full):
            continue
        gap_acc = 100 * (lte["selected_test_accuracy_mean"] - full["selected_test_accuracy_mean"])
        gap_auc = 100 * (lte["selected_test_auc_mean"] - full["selected_test_auc_mean"])
        check = {"method": method, "setting": setting, "acc_gap_points": gap_acc, "auc_gap_points": gap_auc,
                 "bytes_ratio": lte["bytes_ratio_vs_full"]}
        if setting in CLOSE_SETTINGS:
            check["met"] = gap_acc >= -TARGET_POINTS and gap_auc >= -TARGET_POINTS and lte["bytes_ratio_vs_full"] <= TARGET_BYTES
            check["target"] = f"within {TARGET_POINTS:g} points (ACC and AUC) at <= {TARGET_BYTES}x the bytes"
        else:
            majority = full["majority_class_accuracy"]
            full_above = full["selected_test_accuracy_mean"] > majority
            check["met"] = lte["selected_test_accuracy_mean"] > majority if full_above else None
            check["target"] = ("above the majority rate, as federated full is" if full_above
                               else "none: federated full stays at the majority rate")
        checks.append(check)
    return checks


def _pm(row: dict[str, Any], score: str) -> str:
    mean, std = row[f"{score}_mean"], row[f"{score}_std"]
    return f"{mean:.3f} ± {std:.3f}" if len(row["seeds"]) > 1 else f"{mean:.3f}"


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_outputs(results: dict[str, Any], out: Path) -> list[Path]:
    """lte_compare.json, .md and .png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "lte_compare.json"
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    v = results["versions"]
    lines = [
        f"# LTE vs full training vs LoRA, central and federated ({results['dataset']}, {results['model']}, "
        f"grid `{results['grid']}`)", "",
        f"Date: {results['date']}. Hardware: {results['hardware']}. torch {v.get('torch', '?')}, "
        f"timm {v.get('timm', '?')}, flwr {v.get('flwr', '?')}.",
        f"All runs from random init at equal rounds and samples seen. Test ACC/AUC: mean ± sample std over seeds, "
        f"at the round the official validation split selects (`select-metric`) and at the last round. "
        f"Test majority-class rate: {results['majority_class_accuracy']:.4f}.", "",
        "| setting | method | clients | seeds | selected test ACC | selected test AUC | last test ACC | last test AUC "
        "| trainable params | bytes / client-round | vs full | samples seen / run | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        ratio = "-" if r["bytes_ratio_vs_full"] is None else f"{r['bytes_ratio_vs_full']:.3f}"
        lines.append(f"| {r['setting']} | {r['method']} | {r['num_clients']} | {len(r['seeds'])} | "
                     f"{' | '.join(_pm(r, s) for s in SCORES)} | {r['trainable_params']:,} | "
                     f"{_fmt_bytes(r['bytes_per_client_round'])} | {ratio} | {r['samples_seen']:,} | "
                     f"{r['wall_seconds']:.0f} |")
    if results["targets"]:
        lines += ["", "Federated LTE against federated full training of the same split (selected round, means):", "",
                  "| method | setting | ACC gap (points) | AUC gap (points) | bytes ratio | target | met |",
                  "|---|---|---|---|---|---|---|"]
        for t in results["targets"]:
            met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
            lines.append(f"| {t['method']} | {t['setting']} | {t['acc_gap_points']:+.2f} | {t['auc_gap_points']:+.2f} | "
                         f"{t['bytes_ratio']:.3f} | {t['target']} | {met} |")
    lines += ["", "Settings: the sweep's grid file `grid.toml` next to this file; every run's config, "
              "summary.json and metrics.jsonl under `runs/`. Real MedMNIST images; see the data folder's "
              "SOURCES.md for how a file differs from the official release.", ""]
    md_path = out / "lte_compare.md"
    md_path.write_text("\n".join(lines))
    png_path = out / "lte_compare.png"
    _plot(results, png_path)
    return [md_path, json_path, png_path]


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in results["rows"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.6), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for row in (r for r in results["rows"] if r["setting"] == setting):
            curves = [run["curve"] for run in results["runs"] if run["config"] == row["config"]]
            n = min(len(c) for c in curves)
            acc = [statistics.mean(c[i]["test_accuracy"] for c in curves) for i in range(n)]
            ax.plot([curves[0][i]["samples_seen"] for i in range(n)], acc, "o-", ms=3, label=row["method"])
        ax.axhline(results["majority_class_accuracy"], color="grey", ls="--", lw=1)
        ax.set(title=setting, xlabel="training samples seen")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean over seeds)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(grid_file: Path, out: Path, methods: list[str] | None = None, settings: list[str] | None = None,
            seeds: list[int] | None = None, jobs: int = 1, backend: str = "inprocess",
            overrides: dict[str, Any] | None = None, train: bool = True,
            defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep of the cut grid, then write the comparison of the runs that finished
    (``train=False``: only the comparison, e.g. after a sweep cut off by a time limit)."""
    grid = load_grid(grid_file, methods, settings, overrides, defaults)
    out = out.resolve()
    sweep.plan(grid, out, seeds)  # refuse bad settings before anything trains
    if train:
        write_grid(grid, out / "grid.toml")
        args = ["--grid", str(out / "grid.toml"), "--out", str(out), "--backend", backend, "--jobs", str(jobs)]
        sweep.main(args + (["--seeds", ",".join(map(str, seeds))] if seeds else []))
    planned = sweep.plan(grid, out, seeds)
    runs = sweep.collect(planned, out)
    unfinished = sorted({name for name, _ in planned} - {r["run"] for r in runs})
    if not runs:
        raise RuntimeError(f"no run of {grid_file} finished; see the logs under {out / 'logs'}")
    results = {"date": datetime.now().isoformat(timespec="seconds"), "hardware": runs[0]["hardware"],
               "versions": runs[0]["versions"], "grid": grid_file.name, "dataset": runs[0]["config"]["dataset"],
               "model": runs[0]["config"]["model"], "majority_class_accuracy": runs[0]["majority_class_accuracy"],
               **summarize(runs, config_labels(grid)), "unfinished_runs": unfinished,
               "runs": [{"run": r["run"], "config": r["config_name"], "seed": r["seed"],
                         **{k: r[k] for k in (*SCORES, "selected_round", "bytes_per_client_round", "wall_seconds")},
                         "curve": curve(r)} for r in runs]}
    for path in write_outputs(results, out):
        print(f"[lte_compare] wrote {path}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedmeld lte-compare", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n", 2)[2])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--small", dest="grid", action="store_const", const=PRESETS["small"],
                        help="CPU grid (default): vit_pico_patch4_28 on the PneumoniaMNIST subset, 1 seed; "
                             "minutes on 2 cores")
    source.add_argument("--gpu", dest="grid", action="store_const", const=PRESETS["gpu"],
                        help="GPU grid: vit_nano_patch4_28 (width 192), 16 rounds, 3 seeds; about 5 minutes on one "
                             "H200 with --jobs 8")
    source.add_argument("--grid", dest="grid", type=Path, help="another grid file with [[axis.method]] and "
                                                               "[[axis.setting]] tables")
    parser.set_defaults(grid=PRESETS["small"])
    parser.add_argument("--out", default=Path("runs/lte-compare"), type=Path,
                        help="sweep folder, receives lte_compare.md/.json/.png too; re-run with the same --out to "
                             "resume (default: %(default)s)")
    parser.add_argument("--methods", help="comma-separated method labels of the grid to run (default: all)")
    parser.add_argument("--settings", help="comma-separated setting labels of the grid to run, e.g. central,iid "
                                           "(default: all)")
    parser.add_argument("--seeds", metavar="0,1,2", help="seeds (default: the grid file's [sweep] seeds)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N", help="runs at a time, each its own process")
    parser.add_argument("--backend", choices=("inprocess", "ray"), default="inprocess",
                        help="simulation backend of every run (default: %(default)s)")
    parser.add_argument("--data-root", default=None,
                        help="folder holding <dataset>.npz (the run-config key data-root); default: the grid "
                             "file's data-root, else $MEDMNIST_ROOT, else /work/shared/data/medmnist-subsets when it "
                             "exists")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="key=value",
                        help="run-config override for every run, e.g. --set num-server-rounds=2 (repeatable)")
    parser.add_argument("--collect-only", action="store_true",
                        help="train nothing: write the comparison of the runs already finished in --out (with the "
                             "same grid, --methods, --settings, --seeds and --set), e.g. after a time limit cut the "
                             "sweep off")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (OMP_NUM_THREADS of each run's process; default: 1 with --small, "
                             "since a shared 2-core CPU thrashes with more; else the sweep's share of the cores)")
    args = parser.parse_args(argv)
    split = lambda v: [s.strip() for s in v.split(",") if s.strip()] if v else None  # noqa: E731
    try:
        overrides = parse_pairs(args.overrides)
        seeds = [int(s) for s in split(args.seeds)] if args.seeds else None
    except (ConfigError, ValueError) as err:
        parser.error(f"--set / --seeds: {err}")
    if args.data_root and "data-root" not in overrides:
        overrides["data-root"] = args.data_root
    fallback = os.environ.get("MEDMNIST_ROOT") or (
        "/work/shared/data/medmnist-subsets" if Path("/work/shared/data/medmnist-subsets").is_dir() else "")
    defaults = {"data-root": fallback} if fallback else {}  # a grid file's data-root wins over these
    threads = args.threads if args.threads is not None else (1 if args.grid == PRESETS["small"] else 0)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)
    if not args.grid.is_file():
        parser.error(f"no grid file {args.grid}")
    try:
        results = compare(args.grid, args.out, split(args.methods), split(args.settings), seeds, args.jobs,
                          args.backend, overrides, train=not args.collect_only, defaults=defaults)
    except ConfigError as err:
        parser.error(str(err))
    except RuntimeError as err:  # nothing finished: no table to write
        parser.exit(1, f"fedmeld lte-compare: {err}\n")
    if results["unfinished_runs"]:
        print(f"[lte_compare] not finished: {', '.join(results['unfinished_runs'])}", flush=True)
    return 1 if results["unfinished_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
