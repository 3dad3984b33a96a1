"""task/partition.py: client partitions of the real MedMNIST labels, and local validation splits."""

from __future__ import annotations

import numpy as np
import pytest

from fedmeld.task.data import load_split
from fedmeld.task.partition import dirichlet, iid, partition, train_val_split


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
