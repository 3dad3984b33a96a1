"""The experiment runner: grid expansion, validation up front, reports, and resuming a half-done grid."""

from __future__ import annotations

import csv
import tomllib

import pytest

from fedmeld.simulations.sweep import PRESETS, expand, main, plan, same_run
from fedmeld.task.config import ConfigError, RunConfig


def test_grid_expands_to_the_product_of_its_axes(tmp_path):
    grid = {"base": {"num-server-rounds": 2}, "grid": {"peft": ["lora", "norm"]},
            "axis": {"split": [{"label": "iid", "partition": "iid"},
                               {"label": "skew", "partition": "dirichlet", "dirichlet-alpha": 0.1}]}}
    runs = dict(expand(grid))
    assert list(runs) == ["lora_iid", "lora_skew", "norm_iid", "norm_skew"]
    assert runs["norm_skew"] == {"num-server-rounds": 2, "peft": "norm", "partition": "dirichlet", "dirichlet-alpha": 0.1}
    cut = {**grid, "grid": {"peft": ["norm"]}, "axis": {"split": grid["axis"]["split"][1:]}}  # one entry each
    assert [name for name, _ in expand(cut)] == ["skew"]  # a named axis names its runs, however few entries


def test_a_bad_run_in_the_grid_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"grid run x: bad value 'zipf' for 'partition'"):
        plan({"grid": {"peft": ["lora"]}, "axis": {"s": [{"label": "x", "partition": "zipf"}, {"label": "y"}]}},
             tmp_path)


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.toml")))
def test_presets_are_valid(preset, tmp_path):
    assert len(plan(tomllib.loads((PRESETS / f"{preset}.toml").read_text()), tmp_path)) >= 8


def test_report_only_without_finished_runs_says_so(tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text('[base]\nmodel = "resnet10t"\n[grid]\npeft = ["norm", "head"]\n')
    with pytest.raises(SystemExit):
        main(["--grid", str(grid), "--out", str(tmp_path / "none"), "--report-only"])
    assert "no finished run of this grid" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_a_finished_run_from_before_a_key_existed_is_the_same_run():
    """A key added to fedmeld since a run finished counts with its default (a sweep continued after an
    upgrade skips its finished runs); a real difference, or the new key set otherwise, is another run."""
    planned = RunConfig.from_mapping({"num-clients": 3}).to_flower()
    older = {k: v for k, v in planned.items() if k not in ("client-eval-every", "direction-memory")}
    assert same_run({**older, "out": "/elsewhere"}, planned)
    assert not same_run({**older, "num-clients": 4}, planned)
    assert not same_run(older, {**planned, "client-eval-every": 2})


def test_sweep_writes_tables_and_resumes(medmnist_root, tmp_path, capsys):
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[base]\ndata-root = "{medmnist_root}"\nmodel = "resnet10t"\nnum-clients = 2\n'
                    'num-server-rounds = 1\nlocal-epochs = 1\n[grid]\npeft = ["norm", "head"]\n')
    out = tmp_path / "sweep"
    assert main(["--grid", str(grid), "--out", str(out), "--backend", "inprocess"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run"] for r in rows] == ["norm", "head"]
    assert all(0 < float(r["final_test_accuracy"]) <= 1 and r["weights"] == "random init (seed 0)" for r in rows)
    assert int(rows[0]["trainable_params"]) > int(rows[1]["trainable_params"])  # norm+head > head
    for name in ("results.md", "accuracy_per_round.png", "accuracy_vs_bytes.png"):
        assert (out / name).stat().st_size > 0
    (out / "results.csv").unlink()
    capsys.readouterr()
    assert main(["--grid", str(grid), "--out", str(out), "--report-only"]) == 0  # tables again, nothing run
    assert "running" not in capsys.readouterr().out
    assert list(csv.DictReader((out / "results.csv").open())) == rows

    (out / "runs" / "head" / "summary.json").unlink()  # as if interrupted mid-run
    norm_summary = (out / "runs" / "norm" / "summary.json").read_bytes()
    capsys.readouterr()
    assert main(["--grid", str(grid), "--out", str(out), "--backend", "inprocess"]) == 0
    printed = capsys.readouterr().out
    assert "norm: done before, skipped" in printed and "head: running" in printed
    assert (out / "runs" / "norm" / "summary.json").read_bytes() == norm_summary
    assert [p.name.split(".")[0] for p in (out / "runs").glob("head.incomplete-*")] == ["head"]  # kept, not deleted
    assert (out / "runs" / "head" / "summary.json").is_file()

    moved = tmp_path / "moved"  # the folder copied to another path (or machine): its runs still count
    out.rename(moved)
    assert main(["--grid", str(grid), "--out", str(moved), "--backend", "inprocess"]) == 0
    assert "running" not in capsys.readouterr().out
    moved.rename(out)

    grid.write_text(grid.read_text().replace("local-epochs = 1", "local-epochs = 2"))  # configs changed
    assert main(["--grid", str(grid), "--out", str(out), "--backend", "inprocess"]) == 0
    assert "norm: running" in capsys.readouterr().out
    assert len(list((out / "runs").glob("norm.stale-*"))) == 1


def test_seeds_repeat_every_config_and_the_table_gives_mean_and_std(medmnist_root, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(f'[base]\ndata-root = "{medmnist_root}"\nmodel = "resnet10t"\nnum-clients = 2\npeft = "norm"\n'
                    'num-server-rounds = 1\nlocal-epochs = 1\n[grid]\nlr = [0.01, 0.001]\n')
    out = tmp_path / "sweep"
    assert main(["--grid", str(grid), "--out", str(out), "--backend", "inprocess", "--seeds", "0,1"]) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["run"], r["config"], r["seed"]) for r in rows] == [
        ("0.01_seed0", "0.01", "0"), ("0.01_seed1", "0.01", "1"), ("0.001_seed0", "0.001", "0"),
        ("0.001_seed1", "0.001", "1")]
    table = (out / "results.md").read_text()
    for config in ("0.01", "0.001"):
        runs = [r for r in rows if r["config"] == config]
        acc = [float(r["selected_test_accuracy"]) for r in runs]
        mean, std = sum(acc) / 2, abs(acc[0] - acc[1]) / 2 ** 0.5  # the sample std of two values
        assert f"| {config} | 0,1 | " in table and f"{mean:.3f} ± {std:.3f}" in table


def test_the_medmnist_v2_preset_is_the_papers_protocol(tmp_path):
    planned = dict(plan(tomllib.loads((PRESETS / "medmnist-v2.toml").read_text()), tmp_path))
    assert len(planned) == 2 * 3 * 3  # (28) and (224), central / IID / Dirichlet 0.5, three seeds
    central = planned["28_central_seed0"]
    assert (central.model, central.peft, central.lr, central.batch_size, central.num_server_rounds) == (
        "resnet18", "full", 0.001, 128, 100)
    assert (central.lr_schedule, central.lr_milestones, central.select_metric, central.stem) == (
        "multistep", "50,75", "val_auc", "small")
    assert (planned["224_fed-iid_seed2"].input_size, planned["224_fed-iid_seed2"].resize) == (224, "nearest")
