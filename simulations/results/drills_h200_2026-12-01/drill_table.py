"""The drill table of a `fedmeld sweep --preset drills` folder: per federation and partition, one
row per rule and one column per attack; a cell is the test ACC of the round the official validation
split selects (`select-metric`, val_auc), mean ± sample std over the seeds, its change in points
against the clean fedavg run of that block, then the selected-round test AUC. Seeds whose global
model's outputs went NaN (the run stops: the server's AUC raises on NaN scores) are counted apart,
with the round; "rejected" counts the replies the server's validation refused over all rounds and
seeds (failed_nodes: e.g. BatchNorm variances a reply would make negative).

    python drill_table.py SWEEP_DIR > drill_table.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from fedmeld.simulations.report import read_run
from fedmeld.simulations.sweep import mean_std

RULES = ("fedavg", "median", "trimmed-mean", "krum", "clipped-mean")
ATTACKS = {"clean": "clean", "sign-flip5": "sign flip ×5", "scale10": "scaled ×10", "label-flip": "label flip"}
BLOCKS = {"1of5_iid": "1 attacker of 5, IID", "1of5_dir0.5": "1 attacker of 5, Dirichlet 0.5",
          "2of8_iid": "2 attackers of 8, IID", "2of8_dir0.5": "2 attackers of 8, Dirichlet 0.5"}


def seeds(runs: Path, config: str) -> list[Path]:
    """The run folders of one config: ``<config>_seed<k>``, or ``<config>`` of a one-seed sweep."""
    return sorted(runs.glob(f"{config}_seed*")) or ([runs / config] if (runs / config).is_dir() else [])


def cell(runs: Path, config: str) -> dict:
    """Selected-round ACC/AUC of the finished seeds, the rounds where the others went NaN, rejects."""
    done, nan_rounds, rejected = [], [], 0
    for run in seeds(runs, config):
        if (run / "summary.json").is_file():
            summary = read_run(run)
            done.append((summary["selected_test_accuracy"], summary["selected_test_auc"]))
            rounds = summary["rounds"]
        else:
            metrics = run / "metrics.jsonl"
            rounds = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            nan_rounds.append(len(rounds) + 1)  # metrics.jsonl holds the rounds completed
        rejected += sum(len(r["failed_nodes"]) for r in rounds)
    return {"acc": [a for a, _ in done], "auc": [u for _, u in done], "nan_rounds": nan_rounds, "rejected": rejected}


def show(got: dict, clean_acc: float | None) -> str:
    parts = []
    if got["acc"]:
        change = f" ({100 * (statistics.mean(got['acc']) - clean_acc):+.1f})" if clean_acc is not None else ""
        parts.append(f"{mean_std(got['acc'])}{change} / {mean_std(got['auc'])}")
    if got["nan_rounds"]:
        parts.append(f"NaN: {len(got['nan_rounds'])} seed(s), round {','.join(map(str, got['nan_rounds']))}")
    if got["rejected"]:
        parts.append(f"{got['rejected']} rejected")
    return "; ".join(parts) or "not run"


def main(sweep: Path) -> None:
    runs = sweep / "runs"
    for block, title in BLOCKS.items():
        if not seeds(runs, f"{block}_fedavg_clean"):
            continue
        clean, n = cell(runs, f"{block}_fedavg_clean"), len(seeds(runs, f"{block}_fedavg_clean"))
        clean_acc = statistics.mean(clean["acc"]) if clean["acc"] else None
        print(f"**{title}** (clean fedavg, selected round: ACC {mean_std(clean['acc']) if clean['acc'] else 'n/a'}, "
              f"AUC {mean_std(clean['auc']) if clean['auc'] else 'n/a'}; {n} seed{'s' * (n != 1)})\n")
        print("| rule | " + " | ".join(ATTACKS.values()) + " |")
        print("|---" * (len(ATTACKS) + 1) + "|")
        for rule in RULES:
            print(f"| {rule} | " + " | ".join(show(cell(runs, f"{block}_{rule}_{a}"), clean_acc) for a in ATTACKS)
                  + " |")
        print()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "runs").is_dir():
        sys.exit("usage: python drill_table.py SWEEP_DIR (a fedmeld sweep --preset drills --out SWEEP_DIR folder)")
    main(Path(sys.argv[1]))
