"""Runs side by side: ``fedmeld report RUN_DIR [RUN_DIR ...]``.

Reads each run directory's summary.json and metrics.jsonl (what ``fedmeld run``, ``flwr run .``,
``fedmeld deploy`` and the sweeps write), prints one markdown table (last and selected test
ACC/AUC, the majority rate, clients that took part, bytes, time, ε where the run spent privacy),
redraws each run's curves.png with the current plotting code, and with several runs draws their
validation and test curves in one figure, so comparing runs needs no notebook. Nothing is
recomputed: every figure is the run's own.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from fedmeld.server.report import atomic_write, curve_points, plot_curves, run_title


def read_run(run_dir: Path) -> dict[str, Any]:
    """A finished run: its summary.json fields, ``rounds`` (metrics.jsonl) and ``run`` (its name)."""
    run_dir = Path(run_dir).expanduser().resolve()
    summary_file, metrics_file = run_dir / "summary.json", run_dir / "metrics.jsonl"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{run_dir} holds no summary.json: not a finished fedmeld run (an interrupted "
                                f"one continues with fedmeld run --resume {run_dir})")
    summary = json.loads(summary_file.read_text())
    rounds = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()] \
        if metrics_file.is_file() else []
    return {**summary, "rounds": rounds, "run": run_dir.name, "run_dir": run_dir}


def _score(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def runs_table(runs: list[dict[str, Any]]) -> list[str]:
    """One markdown row per run, in the given order."""
    lines = ["| run | setting | clients | rounds | last test ACC | last test AUC | selected round | selected test ACC "
             "| selected test AUC | majority | trainable params | MB up | MB down | wall s | ε (δ) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        asked = r["config"]["num-clients"]
        took_part = r.get("num_clients_took_part", asked)  # runs before it was recorded: as configured
        privacy = f"{r['dp_epsilon']:.2f} ({r['dp_delta']:g})" if "dp_epsilon" in r else "—"
        lines.append(
            f"| {r['run']} | {run_title(r['config']).rsplit(' · ', 1)[0]} | {took_part}/{asked} | {r['num_rounds']} | "
            f"{_score(r['final_test_accuracy'])} | {_score(r['final_test_auc'])} | {r.get('selected_round')} | "
            f"{_score(r.get('selected_test_accuracy'))} | {_score(r.get('selected_test_auc'))} | "
            f"{_score(r['majority_class_accuracy'])} | {r['trainable_params']:,} | {r['bytes_up_total'] / 1e6:.2f} | "
            f"{r['bytes_down_total'] / 1e6:.2f} | {r['wall_seconds']:.0f} | {privacy} |")
    return lines


def compare_plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Validation (dashed) and test (solid) ACC and AUC per round of several runs, one colour each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        points = curve_points(r["rounds"], r)
        x = [row["round"] for row in points]
        for ax, metric in zip(axes, ("accuracy", "auc")):
            ax.plot(x, [row.get(f"test_{metric}", math.nan) for row in points], "o-", ms=3, color=color,
                    label=r["run"])
            ax.plot(x, [row.get(f"val_{metric}", math.nan) for row in points], "s--", ms=2, color=color, alpha=0.6)
    majorities = {round(r["majority_class_accuracy"], 4) for r in runs}
    for majority in majorities:
        axes[0].axhline(majority, color="black", lw=0.8, ls="-.", label=f"majority-class ACC ({majority:.3f})")
    for ax, name in zip(axes, ("ACC", "AUC")):
        ax.set(xlabel="round (0: before training)", ylabel=name, title=f"test {name} (solid), validation {name} (dashed)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedmeld report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (each with summary.json)")
    parser.add_argument("--out", metavar="DIR", default=".",
                        help="where report.md (the table) and, for several runs, compare.png go (default: here)")
    parser.add_argument("--no-plots", action="store_true", help="print the table only; leave every file as it is")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(Path(d)) for d in args.run_dirs]
    except (OSError, ValueError, KeyError) as err:
        print(f"fedmeld report: error: {err}", file=sys.stderr)
        return 2
    table = runs_table(runs)
    print("\n".join(table))
    if args.no_plots:
        return 0
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.md", lambda p: p.write_text("\n".join(table) + "\n"))
    for r in runs:
        plot_curves(r["rounds"], r, r["run_dir"] / "curves.png")
    if len(runs) > 1:
        compare_plot(runs, out / "compare.png")
    print(f"\n[fedmeld] table: {out / 'report.md'}; curves.png redrawn in each run directory"
          + (f"; side by side: {out / 'compare.png'}" if len(runs) > 1 else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
