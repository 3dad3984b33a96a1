"""The DP table of a sweep of the ``dp`` preset: per dataset, peft and target epsilon, the final
(epsilon, delta) the server's ledger reached, test ACC/AUC, and the DP/non-DP time per image.

``python -m fedmeld.simulations.dp_table SWEEP_DIR [BENCH.json ...]`` reads
``SWEEP_DIR/runs/*/{summary.json, metrics.jsonl}`` and writes ``dp_table.md`` and ``dp_table.json``
there. A run without DP-SGD (``dp-clip`` = 0) is the epsilon = inf row. The time ratio of each peft
comes from ``simulations/dp_bench.py`` results (BENCH.json, best of repeated alternating calls):
the runs' own round timings on a shared CPU swing with the load far more than DP costs.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from fedmeld.simulations.report import read_run


def rows(sweep: Path, bench: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One row per finished run, in run-name order; ``bench``: peft -> DP/plain time per image."""
    out = []
    for summary_file in sorted((sweep / "runs").glob("*/summary.json")):
        summary = read_run(summary_file.parent)
        rounds, cfg = summary["rounds"], summary["config"]
        out.append({"run": summary["run"], "dataset": cfg["dataset"], "peft": cfg["peft"],
                    "target_epsilon": cfg["dp-epsilon"] if cfg["dp-clip"] else None, "noise": cfg["dp-noise"],
                    "final_epsilon": rounds[-1].get("dp_epsilon"), "delta": rounds[-1].get("dp_delta"),
                    "rounds": len(rounds), "test_accuracy": summary["final_test_accuracy"],
                    "test_auc": summary["final_test_auc"], "selected_test_accuracy": summary["selected_test_accuracy"],
                    "selected_test_auc": summary["selected_test_auc"],
                    "majority_class_accuracy": summary["majority_class_accuracy"],
                    "img_per_s": statistics.mean(r["client_img_per_s"] for r in rounds),
                    "hardware": summary.get("hardware"), "date": summary.get("date")})
    for row in out:
        row["time_ratio_dp_over_plain"] = (bench or {}).get(row["peft"]) if row["target_epsilon"] is not None else 1.0
    return out


def bench_ratios(files: list[Path]) -> dict[str, float]:
    """peft -> DP-SGD (seeded noise) over plain time per image, from dp_bench JSON files."""
    return {d["peft"]: d["dp_over_plain_time_per_image"] for d in (json.loads(f.read_text()) for f in files)}


def markdown(table: list[dict[str, Any]]) -> str:
    def num(v: Any, fmt: str = ".3f") -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["| dataset | peft | target ε | final ε (δ) | rounds | test ACC | test AUC | selected test ACC / AUC | "
             "majority | DP / non-DP time per image (dp_bench) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(table, key=lambda r: (r["dataset"], r["peft"], r["target_epsilon"] or float("inf"))):
        final = "∞ (no DP)" if r["target_epsilon"] is None else f"{r['final_epsilon']:.2f} ({r['delta']:g})"
        target = "∞" if r["target_epsilon"] is None else (f"{r['target_epsilon']:g}" if r["target_epsilon"]
                                                          else f"– (σ = {r['noise']:g})")
        lines.append(f"| {r['dataset']} | {r['peft']} | {target} | "
                     f"{final} | {r['rounds']} | {num(r['test_accuracy'])} | {num(r['test_auc'])} | "
                     f"{num(r['selected_test_accuracy'])} / {num(r['selected_test_auc'])} | "
                     f"{num(r['majority_class_accuracy'])} | {num(r['time_ratio_dp_over_plain'], '.2f')} |")
    if table:
        lines += ["", f"Hardware: {table[0]['hardware']}; {min(r['date'] for r in table)} to "
                      f"{max(r['date'] for r in table)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or not (Path(args[0]) / "runs").is_dir():
        print("usage: python -m fedmeld.simulations.dp_table SWEEP_DIR [BENCH.json ...] (SWEEP_DIR: a fedmeld "
              "sweep --preset dp output; BENCH.json: python -m fedmeld.simulations.dp_bench outputs)", file=sys.stderr)
        return 2
    sweep = Path(args[0])
    table = rows(sweep, bench_ratios([Path(a) for a in args[1:]]))
    (sweep / "dp_table.json").write_text(json.dumps(table, indent=2) + "\n")
    (sweep / "dp_table.md").write_text(markdown(table))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
