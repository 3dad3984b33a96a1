"""`fedmeld sweep` for a grid of hundreds of short runs: the sweep rewrites results.* and its plots
after every run, under one lock, which at 240 runs of ~20 s on 16 parallel slots takes longer than
the runs themselves (2.6 s for 70 runs on a 2-core CPU); here the runs go without it and the reports
are written once at the end, also for a sweep that was cut off.

    python sweep_then_report.py sweep --preset drills --backend inprocess --jobs 16 --out DIR [--set k=v ...]
    python sweep_then_report.py report drills DIR [k=v ...]   # results.csv/.md and plots of DIR's finished runs
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from fedmeld.simulations import sweep


def report(preset: str, out: Path, pairs: list[str]) -> None:
    grid = tomllib.loads((sweep.PRESETS / f"{preset}.toml").read_text())
    grid["base"] = {**grid.get("base", {}), **sweep.parse_pairs(pairs)}
    rows = sweep.collect(sweep.plan(grid, out), out)
    sweep.write_reports(rows, out, f"Sweep {preset}")
    print(f"{len(rows)} finished runs reported in {out}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["sweep"]:
        sweep.write_reports = lambda rows, out, title: None  # written once, by `report`
        sys.exit(sweep.main(sys.argv[2:]))
    if sys.argv[1:2] == ["report"] and len(sys.argv) >= 4:
        report(sys.argv[2], Path(sys.argv[3]).resolve(), sys.argv[4:])
        sys.exit(0)
    sys.exit(__doc__)
