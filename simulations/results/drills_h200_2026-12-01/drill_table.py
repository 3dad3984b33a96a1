"""The drill table of a `fedmeld sweep --preset drills` folder: per federation and partition, one
row per rule and one column per attack; a cell is the test ACC of the round the official validation
split selects (`select-metric`, val_auc), mean ± sample std over the seeds, its change in points
against the clean fedavg run of that block, then the selected-round test AUC.

A seed counts when its summary.json exists or its metrics.jsonl holds every planned round (a sweep
cut while the run wrote its export and summary: the selection is the one summary.json would hold,
`select_round`). A seed without either either failed (its log ends in a traceback; "NaN" when the
error names NaN: the server's AUC raises on NaN scores, with the round whose model went NaN) or was
cut by the caller's time limit mid-run ("cut", with the rounds it completed): a cut is not a NaN
(a cut run's log is empty, the sweep was killed before flushing it). "rejected" counts the replies
the server's validation refused over all rounds and seeds (failed_nodes: e.g. BatchNorm variances a
reply would make negative).

    python drill_table.py SWEEP_DIR > drill_table.md
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import tomllib
from pathlib import Path

from fedmeld.server.report import select_round
from fedmeld.simulations.report import read_run
from fedmeld.simulations.sweep import mean_std

RULES = ("fedavg", "median", "trimmed-mean", "krum", "clipped-mean", "direction-clipped-mean",
         "direction-z2",  # direction-clipped-mean with direction-z 2 (../h200_2026-12-02/drills_direction.toml)
         "direction-memory1")  # with direction-memory 1 (../drills_memory_cpu_2026-12-05/grid.toml)
ATTACKS = {"clean": "clean", "sign-flip5": "sign flip ×5", "scale10": "scaled ×10", "label-flip": "label flip"}
BLOCKS = {"1of5_iid": "1 attacker of 5, IID", "1of5_dir0.5": "1 attacker of 5, Dirichlet 0.5",
          "2of8_iid": "2 attackers of 8, IID", "2of8_dir0.5": "2 attackers of 8, Dirichlet 0.5",
          "1of5": "1 attacker of 5, IID", "2of8": "2 attackers of 8, IID"}  # grids with partition in [base]


def seeds(runs: Path, config: str) -> list[Path]:
    """The run folders of one config: ``<config>_seed<k>``, or ``<config>`` of a one-seed sweep."""
    found = [run for run in runs.glob(f"{config}_seed*") if re.fullmatch(r"seed\d+", run.name[len(config) + 1:])]
    return sorted(found) or ([runs / config] if (runs / config).is_dir() else [])  # not a sweep's .incomplete-*


def run_config(sweep: Path, run: str) -> dict:
    """One run's keys (num-server-rounds, select-metric), from the config file the sweep wrote for it."""
    with (sweep / "configs" / f"{run}.toml").open("rb") as f:
        return tomllib.load(f)


def unfinished(sweep: Path, run: str, rounds: int) -> tuple[str, int]:
    """Why a run without summary.json stopped: ("NaN", the round whose model went NaN), ("failed",
    that round) or ("cut", the rounds it completed)."""
    log = sweep / "logs" / f"{run}.log"
    text = log.read_text() if log.is_file() else ""
    if "Traceback" not in text:
        return "cut", rounds
    error = text[text.rindex("Traceback"):]  # the last traceback, whatever the run printed after it
    return ("NaN" if re.search(r"\bnan\b", error, re.IGNORECASE) else "failed"), rounds + 1


def cell(sweep: Path, config: str) -> dict:
    """Selected-round ACC/AUC of the seeds with every round, why the others stopped, rejects."""
    done, stopped, rejected = [], [], 0
    for run in seeds(sweep / "runs", config):
        metrics = run / "metrics.jsonl"
        if (run / "summary.json").is_file():
            summary = read_run(run)
            done.append((summary["selected_test_accuracy"], summary["selected_test_auc"]))
            rounds = summary["rounds"]
        else:
            rounds = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            cfg = run_config(sweep, run.name)
            if rounds and len(rounds) == cfg["num-server-rounds"]:
                best = select_round(rounds, cfg["select-metric"])
                done.append((best["test_accuracy"], best["test_auc"]))
            else:
                stopped.append(unfinished(sweep, run.name, len(rounds)))
        rejected += sum(len(r["failed_nodes"]) for r in rounds)
    return {"acc": [a for a, _ in done], "auc": [u for _, u in done], "stopped": stopped, "rejected": rejected}


def show(got: dict, clean_acc: float | None, n_seeds: int) -> str:
    parts = []
    if got["acc"]:
        change = f" ({100 * (statistics.mean(got['acc']) - clean_acc):+.1f})" if clean_acc is not None else ""
        seeds_note = f" ({len(got['acc'])} of {n_seeds} seeds)" if len(got["acc"]) < n_seeds else ""
        parts.append(f"{mean_std(got['acc'])}{change} / {mean_std(got['auc'])}{seeds_note}")
    for why, label in (("NaN", "NaN: {n} seed(s), round {r}"), ("failed", "failed: {n} seed(s), round {r}"),
                       ("cut", "cut: {n} seed(s) after {r} rounds")):
        at = [str(r) for w, r in got["stopped"] if w == why]
        if at:
            parts.append(label.format(n=len(at), r=",".join(at)))
    if got["rejected"]:
        parts.append(f"{got['rejected']} rejected")
    return "; ".join(parts) or "not run"


def main(sweep: Path) -> None:
    runs = sweep / "runs"
    for block, title in BLOCKS.items():
        if not seeds(runs, f"{block}_fedavg_clean"):
            continue
        clean, n = cell(sweep, f"{block}_fedavg_clean"), len(seeds(runs, f"{block}_fedavg_clean"))
        clean_acc = statistics.mean(clean["acc"]) if clean["acc"] else None
        print(f"**{title}** (clean fedavg, selected round: ACC {mean_std(clean['acc']) if clean['acc'] else 'n/a'}, "
              f"AUC {mean_std(clean['auc']) if clean['auc'] else 'n/a'}; {n} seed{'s' * (n != 1)})\n")
        print("| rule | " + " | ".join(ATTACKS.values()) + " |")
        print("|---" * (len(ATTACKS) + 1) + "|")
        for rule in (r for r in RULES if any(seeds(runs, f"{block}_{r}_{a}") for a in ATTACKS)):  # rules run here
            print(f"| {rule} | " + " | ".join(show(cell(sweep, f"{block}_{rule}_{a}"), clean_acc, n) for a in ATTACKS)
                  + " |")
        print()


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "runs").is_dir():
        sys.exit("usage: python drill_table.py SWEEP_DIR (a fedmeld sweep --preset drills --out SWEEP_DIR folder)")
    main(Path(sys.argv[1]))
