"""Two sweeps of one preset side by side: per config, selected-round test ACC / AUC (mean ± sample std
over the seeds each finished, the seeds named) from each sweep's results.csv, and which start's AUC is higher.

    python side_by_side.py seed-table-fractal-med seed-table-random > side_by_side_seed-table.md
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

from fedmeld.simulations.sweep import mean_std


def selected(sweep: Path) -> dict[str, tuple[list[float], list[float], list[str]]]:
    """config -> (selected ACCs, selected AUCs, seeds), in the sweep's order."""
    out: dict[str, tuple[list[float], list[float], list[str]]] = {}
    with (sweep / "results.csv").open() as f:
        for row in csv.DictReader(f):
            acc, auc, seeds = out.setdefault(row["config"], ([], [], []))
            acc.append(float(row["selected_test_accuracy"]))
            auc.append(float(row["selected_test_auc"]))
            seeds.append(row["seed"])
    return out


def cell(got: tuple[list[float], list[float], list[str]] | None) -> str:
    if not got:
        return "not run"
    acc, auc, seeds = got
    return f"{mean_std(acc)} / {mean_std(auc)} (seeds {','.join(seeds)})"


def main(first: Path, second: Path) -> None:
    a, b = selected(first), selected(second)
    print(f"| config | {first.name}: selected ACC / AUC | {second.name}: selected ACC / AUC | higher AUC |")
    print("|---|---|---|---|")
    for config in dict.fromkeys([*a, *b]):
        higher = ""
        if config in a and config in b:
            ma, mb = statistics.mean(a[config][1]), statistics.mean(b[config][1])
            higher = first.name if ma > mb else second.name if mb > ma else "tie"
        print(f"| {config} | {cell(a.get(config))} | {cell(b.get(config))} | {higher} |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python side_by_side.py SWEEP_A SWEEP_B (folders with results.csv)")
    main(Path(sys.argv[1]), Path(sys.argv[2]))
