"""fedmeld report: a table of finished runs from their own files, curves redrawn, runs compared."""

from __future__ import annotations

import json
import shutil

from fedmeld.simulations.report import main
from fedmeld.simulations.run import load_config, simulate


def test_report_tables_and_plots_finished_runs(tiny_config, tmp_path, capsys):
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**tiny_config, "num-server-rounds": 1}.items()])
    first = simulate(cfg, "inprocess", verbose=False)
    second = first.with_name("copy")
    shutil.copytree(first, second)
    (first / "curves.png").unlink()
    summary = json.loads((first / "summary.json").read_text())
    capsys.readouterr()

    assert main([str(first), str(second), "--out", str(tmp_path / "report")]) == 0
    table = capsys.readouterr().out.splitlines()
    rows = [line for line in table if line.startswith(f"| {first.name} |") or line.startswith("| copy |")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert summary["num_clients_took_part"] == 2 and cells[2] == "2/2"  # both clients took part, as configured
    assert cells[4:6] == [f"{summary['final_test_accuracy']:.3f}", f"{summary['final_test_auc']:.3f}"]
    assert cells[9] == f"{summary['majority_class_accuracy']:.3f}" and cells[-1] == "—"  # no DP: no ε
    assert (first / "curves.png").stat().st_size > 10_000  # redrawn from the run's files
    assert (tmp_path / "report" / "compare.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "report.md").read_text().splitlines()[2:] == rows


def test_report_refuses_a_directory_that_is_not_a_finished_run(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "holds no summary.json" in capsys.readouterr().err
