"""simulations.lte_compare: the fair comparison runs through the sweep on real MedMNIST and writes its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedmeld.simulations import sweep
from fedmeld.simulations.lte_compare import (JSON_KEYS, PRESETS, ROW_KEYS, compare, config_labels, load_grid, main,
                                             summarize)
from fedmeld.task.config import ConfigError


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, subsets_root) -> tuple[dict, Path]:
    """Full training and LTE, central, from random init on the PneumoniaMNIST subset, 2 rounds each
    (the --small grid cut to 2 runs: each run is a process of its own; the federated rows' arithmetic
    is test_targets_follow_the_issue's)."""
    out = tmp_path_factory.mktemp("lte_compare")
    results = compare(PRESETS["small"], out, ["full", "lte"], ["central"], jobs=2,
                      overrides={"data-root": str(subsets_root), "num-server-rounds": 2})
    return results, out


def test_central_lte_learns_and_rows_are_at_equal_samples_seen(small_run):
    results, _ = small_run
    rows = {(r["method"], r["setting"]): r for r in results["rows"]}
    assert list(rows) == [("full", "central"), ("lte", "central")]
    assert results["majority_class_accuracy"] == pytest.approx(390 / 624)
    assert rows["lte", "central"]["selected_test_auc_mean"] > 0.75  # from scratch: a model at chance fails
    seen = [r["samples_seen"] for r in rows.values()]
    assert max(seen) - min(seen) <= 16 and min(seen) > 2 * 3000  # 2 passes over ~90% of 3882, heads trim a few
    assert {r["num_clients"] for r in rows.values()} == {1}
    assert rows["full", "central"]["bytes_ratio_vs_full"] == 1.0
    assert 0 < rows["lte", "central"]["bytes_ratio_vs_full"] < 1  # factors and dense tensors, never the backbone
    assert rows["full", "central"]["trainable_params"] > rows["lte", "central"]["trainable_params"]
    assert results["targets"] == [] and results["unfinished_runs"] == []  # targets compare federated rows


def test_outputs_have_documented_keys(small_run):
    results, out = small_run
    assert {"lte_compare.json", "lte_compare.md", "lte_compare.png", "grid.toml", "results.md", "runs"} <= \
        {p.name for p in out.iterdir()}
    data = json.loads((out / "lte_compare.json").read_text())
    assert set(JSON_KEYS) <= data.keys() and data["hardware"] and data["date"]
    assert all(set(ROW_KEYS) <= row.keys() for row in data["rows"])
    assert [c["round"] for c in data["runs"][0]["curve"]] == [0, 1, 2]
    md = (out / "lte_compare.md").read_text()
    assert "| central | lte | 1 | 1 |" in md and "| central | full | 1 | 1 |" in md and data["hardware"] in md
    assert (out / "lte_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_second_call_resumes_and_trains_nothing(small_run, subsets_root, capsys):
    results, out = small_run
    again = compare(PRESETS["small"], out, ["full", "lte"], ["central"],
                    overrides={"data-root": str(subsets_root), "num-server-rounds": 2})
    assert capsys.readouterr().out.count("done before, skipped") == 2
    assert again["rows"] == results["rows"]


def test_targets_follow_the_issue():
    """Within 2 points at <= 0.15x the bytes under IID; under Dirichlet 0.5 only where full beats the majority."""
    grid = load_grid(PRESETS["gpu"], ["full", "lte"], ["iid", "dir0.5"])
    labels = config_labels(grid)
    assert labels == {"full_iid": ("full", "iid"), "full_dir0.5": ("full", "dir0.5"),
                      "lte_iid": ("lte", "iid"), "lte_dir0.5": ("lte", "dir0.5")}

    def run(config: str, seed: int, acc: float, auc: float, sent: float) -> dict:
        return {"config_name": config, "seed": seed, "config": {"num-clients": 4}, "selected_test_accuracy": acc,
                "selected_test_auc": auc, "final_test_accuracy": acc, "final_test_auc": auc,
                "trainable_params": 1, "bytes_per_client_round": sent, "samples_seen": 100, "wall_seconds": 1.0,
                "majority_class_accuracy": 0.625}

    runs = [run("full_iid", s, 0.80 + s / 100, 0.90, 100.0) for s in (0, 1)] + \
           [run("lte_iid", s, 0.79 + s / 100, 0.89, 10.0) for s in (0, 1)] + \
           [run("full_dir0.5", 0, 0.625, 0.6, 100.0), run("lte_dir0.5", 0, 0.625, 0.5, 10.0)]
    out = summarize(runs, labels)
    iid, skew = out["targets"]
    assert (iid["method"], iid["setting"], iid["met"], iid["bytes_ratio"]) == ("lte", "iid", True, 0.1)
    assert iid["acc_gap_points"] == pytest.approx(-1.0)
    assert out["rows"][0]["selected_test_accuracy_std"] == pytest.approx(0.00707, abs=1e-4)
    assert skew["met"] is None  # federated full stays at the majority rate: nothing to match
    runs[4]["selected_test_accuracy"] = 0.70
    assert summarize(runs, labels)["targets"][1]["met"] is False


def test_presets_plan(tmp_path):
    """Every run of both grids and of the H200 exploration is a valid run config."""
    explore = Path(__file__).parents[2] / "simulations/results/lte_h200_2026-12-01/explore.toml"
    counts = [len(sweep.plan(load_grid(p), tmp_path)) for p in (PRESETS["small"], PRESETS["gpu"], explore)]
    assert counts == [12, 36, 27]


def test_bad_grids_and_labels_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown method"):
        load_grid(PRESETS["small"], ["lte", "bogus"])
    other = tmp_path / "grid.toml"
    other.write_text('[grid]\nlr = [0.1]\n[[axis.method]]\nlabel = "a"\n')
    with pytest.raises(ConfigError, match="exactly two axis tables"):
        load_grid(other)
    with pytest.raises(SystemExit):
        main(["--settings", "central,bogus", "--out", str(tmp_path / "out")])


def test_a_grid_files_data_root_wins_over_the_default(tmp_path):
    """$MEDMNIST_ROOT is a default: a grid that names its data-root keeps it; --set/--data-root replace it."""
    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\ndata-root = "/a"\n[[axis.method]]\nlabel = "m"\n[[axis.setting]]\nlabel = "s"\n')
    assert load_grid(grid, defaults={"data-root": "/b"})["base"] == {"data-root": "/a"}
    assert load_grid(grid, overrides={"data-root": "/c"}, defaults={"data-root": "/b"})["base"] == {"data-root": "/c"}
