"""Data, partitions, metrics and run config, on the real MedMNIST files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medmnist import Evaluator

from fedmeld.task.config import ConfigError, RunConfig, defaults
from fedmeld.task.data import DataFileError, load_split, task_info
from fedmeld.task.engine import medmnist_acc, medmnist_auc
from fedmeld.task.partition import dirichlet, iid, partition, train_val_split
from fedmeld.simulations.run import load_config, parse_overrides


def test_official_splits_load_with_medmnist_layout(medmnist_root):
    train = load_split("breastmnist", "train", data_root=str(medmnist_root))
    assert train.images.shape == (546, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.shape == (546, 1) and np.bincount(train.labels[:, 0].numpy()).tolist() == [147, 399]
    retina = load_split("retinamnist", "test", data_root=str(medmnist_root))
    assert retina.images.shape == (400, 3, 28, 28)  # RGB, channels first
    assert task_info("retinamnist").task == "ordinal-regression" and task_info("retinamnist").num_classes == 5


def test_root_falls_back_to_env(medmnist_root, monkeypatch):
    monkeypatch.setenv("MEDMNIST_ROOT", str(medmnist_root))
    assert len(load_split("breastmnist", "val")) == 78


def test_missing_file_names_the_file_and_the_fix(tmp_path, monkeypatch):
    # an empty root with no network: the download fails and the error says what to do
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with pytest.raises(DataFileError) as err:
        load_split("breastmnist", "train", data_root=str(tmp_path / "empty"))
    msg = str(err.value)
    assert "breastmnist.npz" in msg and "MEDMNIST_ROOT" in msg and "750601b1f35ba3300ea97c75c52ff8f6" in msg


def test_corrupt_file_names_the_file(medmnist_root, tmp_path):
    data = (medmnist_root / "breastmnist.npz").read_bytes()
    (tmp_path / "breastmnist.npz").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(DataFileError, match=r"breastmnist\.npz is unreadable.*Replace it"):
        load_split("breastmnist", "train", data_root=str(tmp_path))


def test_subsampled_file_loads_with_a_warning(caplog, subsets_root):
    assert len(load_split("pneumoniamnist", "train", data_root=str(subsets_root))) == 3882
    assert "differs from the official MedMNIST release" in caplog.text


@pytest.mark.parametrize("num_clients", [2, 4, 7])
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_are_disjoint_cover_and_deterministic(medmnist_root, scheme, num_clients):
    labels = load_split("retinamnist", "train", data_root=str(medmnist_root)).labels.numpy()
    parts = partition(labels, num_clients, scheme, 0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(np.unique(joined))  # disjoint and covering
    assert all(len(p) >= 2 for p in parts)
    again = partition(labels, num_clients, scheme, 0.5, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, num_clients, scheme, 0.5, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_small_alpha_skews_labels(medmnist_root):
    labels = load_split("retinamnist", "train", data_root=str(medmnist_root)).labels.numpy()[:, 0]
    global_hist = np.bincount(labels, minlength=5) / len(labels)

    def skew(parts):  # mean total-variation distance of client label histograms from the global one
        return np.mean([0.5 * np.abs(np.bincount(labels[p], minlength=5) / len(p) - global_hist).sum() for p in parts])

    assert skew(dirichlet(labels, 4, 0.1, seed=0)) > 0.3
    assert skew(dirichlet(labels, 4, 0.1, seed=0)) > 2 * skew(dirichlet(labels, 4, 100.0, seed=0))
    assert skew(iid(len(labels), 4, seed=0)) < 0.1


def test_local_validation_split(medmnist_root):
    idx = np.arange(100, 200)
    train, val = train_val_split(idx, 0.2, seed=0)
    assert len(val) == 20 and len(train) == 80 and set(train) | set(val) == set(idx) and not set(train) & set(val)


@pytest.mark.parametrize("flag", ["breastmnist", "retinamnist"])
def test_acc_auc_match_medmnist_evaluator(medmnist_root, flag):
    info = task_info(flag)
    test = load_split(flag, "test", data_root=str(medmnist_root))
    rng = np.random.default_rng(0)
    scores = rng.dirichlet(np.ones(info.num_classes), size=len(test))
    scores[np.arange(len(test)), test.labels[:, 0].numpy()] += rng.random(len(test))  # better than chance
    expected_auc, expected_acc = Evaluator(flag, "test", root=str(medmnist_root)).evaluate(scores)
    assert medmnist_acc(test.labels.numpy(), scores, info) == pytest.approx(expected_acc, abs=1e-12)
    assert medmnist_auc(test.labels.numpy(), scores, info) == pytest.approx(expected_auc, abs=1e-12)
    assert 0.5 < expected_auc < 1.0


def test_config_defaults_cover_every_key_and_round_trip():
    cfg = RunConfig.from_mapping()
    assert cfg.to_flower() == defaults()
    assert RunConfig.from_mapping(cfg.to_flower()) == cfg
    for key in ("dataset", "image-size", "model", "pretrained", "num-clients", "partition", "dirichlet-alpha",
                "num-server-rounds", "local-epochs", "batch-size", "lr", "peft", "lora-rank", "lora-alpha",
                "lora-dropout", "server-lr", "seed", "out"):
        assert key in defaults()


def test_pyproject_repeats_the_defaults_flwr_run_reads(repo):
    """``flwr run .`` reads the defaults from pyproject.toml; RunConfig holds them for an installed
    fedmeld. They must be the same table."""
    import tomllib

    with (repo / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["tool"]["flwr"]["app"]["config"] == defaults()


@pytest.mark.parametrize("overrides, match", [
    ({"nmu-clients": 3}, r"unknown run-config key 'nmu-clients'; valid keys: dataset, "),
    ({"peft": "lore"}, r"bad value 'lore' for 'peft': must be '\+'-joined parts of bitfit, dora, lora, norm, vera"),
    ({"partition": "zipf"}, r"valid values: iid, dirichlet"),
    ({"num-clients": 0}, r"'num-clients': must be > 0"),
    ({"lr": "fast"}, r"'lr': expected float"),
    ({"dataset": "organmnist3d"}, r"valid values: pathmnist"),
])
def test_bad_config_is_refused_with_valid_choices(overrides, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping(overrides)


def test_cli_overrides_parse_as_toml(tmp_path):
    assert parse_overrides(["lr=0.01", "pretrained=true", "dataset=retinamnist", 'model="vit_tiny_patch16_224"']) == {
        "lr": 0.01, "pretrained": True, "dataset": "retinamnist", "model": "vit_tiny_patch16_224"}
    (tmp_path / "c.toml").write_text('num-clients = 3\npeft = "norm"\n')
    cfg = load_config(str(tmp_path / "c.toml"), ["peft=head"])
    assert (cfg.num_clients, cfg.peft) == (3, "head")  # command line beats file
    assert cfg.run_name and cfg.out.startswith("/")


def test_cli_refuses_bad_key_before_running(capsys):
    from fedmeld.simulations.run import main

    with pytest.raises(SystemExit) as exit_:
        main(["lora-rnak=4"])
    assert exit_.value.code == 2
    assert "unknown run-config key 'lora-rnak'" in capsys.readouterr().err


def test_readme_documents_every_run_config_key(repo):
    readme = (repo / "README.md").read_text()
    assert [k for k in defaults() if f"`{k}`" not in readme] == []
