"""Shared fixtures: the real MedMNIST files in ../shared, and small run configs on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OFFICIAL = Path(os.environ.get("MEDMNIST_ROOT", REPO.parent / "shared" / "data" / "medmnist"))
SUBSETS = REPO.parent / "shared" / "data" / "medmnist-subsets"


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    """The official BreastMNIST/RetinaMNIST files; tests never download."""
    if not (OFFICIAL / "breastmnist.npz").is_file():
        pytest.fail(f"real MedMNIST files not found in {OFFICIAL}; set MEDMNIST_ROOT to ../shared/data/medmnist")
    return OFFICIAL


@pytest.fixture(scope="session")
def subsets_root() -> Path:
    """The real but subsampled PneumoniaMNIST file (see ../shared/data/medmnist-subsets/SOURCES.md)."""
    if not (SUBSETS / "pneumoniamnist.npz").is_file():
        pytest.fail(f"real PneumoniaMNIST subset not found in {SUBSETS}")
    return SUBSETS


@pytest.fixture(scope="session")
def repo() -> Path:
    """The checkout's root (README.md, pyproject.toml)."""
    return REPO


@pytest.fixture
def tiny_config(medmnist_root: Path, tmp_path: Path) -> dict:
    """Run-config overrides for a small, fast federation on real BreastMNIST."""
    return {"data-root": str(medmnist_root), "model": "resnet10t", "num-clients": 2, "num-server-rounds": 2,
            "local-epochs": 1, "batch-size": 64, "out": str(tmp_path / "runs"), "run-name": "test"}


@pytest.fixture
def task_identity(monkeypatch):
    """Messages take their run and sender from the runtime's TaskIdentity; stand in for it (for tests that
    build Flower Messages outside a runtime: ``pytestmark = pytest.mark.usefixtures("task_identity")``)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)
