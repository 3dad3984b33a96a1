"""Split a training set over clients: IID or Dirichlet(alpha) label skew, deterministic per seed.

Written here rather than taken from Flower Datasets because its partitioners work on Hugging Face
``datasets`` objects, which would drag that stack in for two dozen lines of index arithmetic.
The Dirichlet scheme is the one Flower Datasets' ``DirichletPartitioner`` and most FL papers use:
for every class, draw client proportions from Dir(alpha) and cut that class's indices accordingly,
redrawing until every client holds at least ``min_size`` samples.
"""

from __future__ import annotations

import numpy as np


def iid(num_samples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    order = np.random.default_rng(seed).permutation(num_samples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 2, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed partition; for multi-label data the first label column sets the skew."""
    labels = labels.reshape(len(labels), -1)[:, 0]
    if len(labels) < num_clients * min_size:
        raise ValueError(f"{len(labels)} samples cannot give {num_clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == cls))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha))) * len(idx)).astype(int)[:-1]
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].extend(chunk.tolist())
        if min(map(len, parts)) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw gave every one of {num_clients} clients "
                     f">= {min_size} samples in {max_tries} tries; raise alpha or lower num-clients")


def partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    if scheme == "iid":
        return iid(len(labels), num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed)
    raise ValueError(f"unknown partition {scheme!r}; valid: iid, dirichlet")


def train_val_split(index: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's local validation split, carved from its own partition."""
    order = np.random.default_rng(seed).permutation(index)
    n_val = int(round(len(index) * val_fraction))
    return np.sort(order[n_val:]), np.sort(order[:n_val])
