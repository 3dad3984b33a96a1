"""The drill table of a `fedmeld sweep --preset drills` run folder (the sweep's runs/): last-round
test ACC / AUC per rule and attack, one table per federation and partition, each cell's ACC change
against the clean fedavg run of that block. A run that stopped (a poisoned global model whose
outputs went NaN) shows the round whose model had NaN outputs.
Usage: python drill_table.py SWEEP_DIR/runs > table.md"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RULES = ("fedavg", "median", "trimmed-mean", "krum", "clipped-mean")
ATTACKS = {"clean": "clean", "sign-flip5": "sign flip ×5", "scale10": "scaled ×10", "label-flip": "label flip"}
BLOCKS = {"1of5_iid": "1 attacker of 5, IID", "1of5_dir0.5": "1 attacker of 5, Dirichlet 0.5",
          "2of8_iid": "2 attackers of 8, IID", "2of8_dir0.5": "2 attackers of 8, Dirichlet 0.5"}


def result(run: Path) -> tuple[float, float] | str:
    """(ACC, AUC) of the last round, or why there is none."""
    if (run / "summary.json").is_file():
        summary = json.loads((run / "summary.json").read_text())
        return summary["final_test_accuracy"], summary["final_test_auc"]
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").is_file() else []
    return f"NaN in round {len(lines) + 1}"  # metrics.jsonl holds the rounds completed


def main(runs: Path) -> None:
    for block, title in BLOCKS.items():
        clean = result(runs / f"fedavg_clean_{block}")
        print(f"**{title}** (clean fedavg: ACC {clean[0]:.3f}, AUC {clean[1]:.3f})\n")
        print("| rule | " + " | ".join(ATTACKS.values()) + " |")
        print("|---" * (len(ATTACKS) + 1) + "|")
        for rule in RULES:
            cells = []
            for attack in ATTACKS:
                got = result(runs / f"{rule}_{attack}_{block}")
                cells.append(got if isinstance(got, str) else
                             f"{got[0]:.3f} ({100 * (got[0] - clean[0]):+.1f}) / {got[1]:.3f}")
            print(f"| {rule} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
