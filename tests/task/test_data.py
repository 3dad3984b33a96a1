"""task/data.py: loading the real MedMNIST files, and the errors that name the file and the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmeld.task.data import DataFileError, load_split, task_info


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


def test_subsampled_file_loads_with_a_warning(caplog, subsets_root, tmp_path):
    # a root of its own: a file is read, and warned about, once per process and root (simulations/test_lte_compare.py
    # reads this one too)
    (tmp_path / "pneumoniamnist.npz").symlink_to(subsets_root / "pneumoniamnist.npz")
    assert len(load_split("pneumoniamnist", "train", data_root=str(tmp_path))) == 3882
    assert "differs from the official MedMNIST release" in caplog.text
