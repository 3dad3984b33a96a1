"""simulations/dp_table.py: final epsilon per run, the time ratio of its peft from dp_bench."""

from __future__ import annotations

import json

from fedmeld.simulations.dp_table import bench_ratios, main, rows


def _run(sweep, name: str, dp_clip: float, dp_epsilon: float, img_per_s: float, epsilon: float | None) -> None:
    run = sweep / "runs" / name
    run.mkdir(parents=True)
    config = {"dataset": "breastmnist", "peft": "lora", "dp-clip": dp_clip, "dp-epsilon": dp_epsilon, "dp-noise": 0.0}
    (run / "summary.json").write_text(json.dumps({
        "config": config, "final_test_accuracy": 0.7, "final_test_auc": 0.6, "selected_test_accuracy": 0.71,
        "selected_test_auc": 0.61, "majority_class_accuracy": 0.73, "hardware": "cpu", "date": "2026-12-01"}))
    dp = {"dp_epsilon": epsilon, "dp_delta": 1e-5} if epsilon is not None else {}
    (run / "metrics.jsonl").write_text("".join(json.dumps({"round": r, "client_img_per_s": img_per_s, **dp}) + "\n"
                                               for r in (1, 2)))


def test_the_table_reports_the_final_epsilon_and_the_benchmarked_time_ratio(tmp_path, capsys):
    _run(tmp_path, "lora_eps3", 1.0, 3.0, 25.0, 2.99)
    _run(tmp_path, "lora_epsinf", 0.0, 0.0, 100.0, None)
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"peft": "lora", "dp_over_plain_time_per_image": 2.5}))
    by_run = {r["run"]: r for r in rows(tmp_path, bench_ratios([bench]))}
    assert by_run["lora_eps3"]["final_epsilon"] == 2.99 and by_run["lora_eps3"]["time_ratio_dp_over_plain"] == 2.5
    assert by_run["lora_epsinf"]["target_epsilon"] is None and by_run["lora_epsinf"]["time_ratio_dp_over_plain"] == 1.0
    assert rows(tmp_path)[0]["time_ratio_dp_over_plain"] is None  # no bench: no ratio
    assert main([str(tmp_path), str(bench)]) == 0
    table = (tmp_path / "dp_table.md").read_text()
    assert "| breastmnist | lora | 3 | 2.99 (1e-05) | 2 |" in table and "| 2.50 |" in table and "∞ (no DP)" in table
    assert main([str(tmp_path / "nope")]) == 2
