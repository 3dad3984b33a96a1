"""End to end: the default federation under Flower's simulation runtime on real BreastMNIST."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import _inputs
from fedmeld.task.model import build_model
from fedmeld.peft import load_adapter_state
from fedmeld.server.report import ROUND_KEYS
from fedmeld.simulations.run import load_config, simulate

SUMMARY_KEYS = ("final_test_accuracy", "final_test_auc", "majority_class_accuracy", "num_rounds", "trainable_params",
                "total_params", "bytes_up_total", "bytes_down_total", "wall_seconds", "versions", "config")


@pytest.fixture(scope="module")
def default_run(medmnist_root, tmp_path_factory):
    """What `make run` runs (the pyproject defaults), with the data root and output made explicit."""
    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path_factory.mktemp("runs")}"',
                             'run-name="default"'])
    return cfg, simulate(cfg)


def test_default_federation_learns(default_run):
    cfg, run_dir = default_run
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rounds] == list(range(1, cfg.num_server_rounds + 1)) and cfg.num_server_rounds >= 3
    for record in rounds:
        assert set(ROUND_KEYS) <= record.keys()
        assert record["num_clients_ok"] == cfg.num_clients and record["num_clients_failed"] == 0
        assert record["bytes_up"] > 0 and record["bytes_down"] > record["bytes_up"]
        assert 0 < record["slowest_client_train_seconds"] < record["round_seconds"] and record["client_img_per_s"] > 0
    assert set(SUMMARY_KEYS) <= summary.keys()
    assert summary["majority_class_accuracy"] == pytest.approx(114 / 156)
    assert summary["final_test_accuracy"] > rounds[0]["test_accuracy"]
    assert summary["final_test_accuracy"] > summary["majority_class_accuracy"] + 0.02
    assert summary["final_test_auc"] > 0.7
    assert 0 < summary["trainable_params"] < summary["total_params"] / 5  # adapters, not the backbone
    assert {"torch", "timm", "flwr"} <= summary["versions"].keys() and summary["config"]["peft"] == "lora+norm"
    # each client uploads exactly its adapter delta: no backbone on the wire
    assert rounds[-1]["bytes_up"] / cfg.num_clients == pytest.approx(summary["global_state_bytes"], rel=0.05)
    assert (run_dir / "curves.png").stat().st_size > 10_000


def test_exported_model_loads_into_plain_timm(default_run, medmnist_root):
    cfg, run_dir = default_run
    info = task_info(cfg.dataset)
    path = run_dir / "model_merged.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    plain = timm.create_model(meta["timm_model"], pretrained=False, num_classes=int(meta["num_classes"]),
                              in_chans=int(meta["in_chans"]))
    plain.load_state_dict(load_file(str(path)), strict=True)

    federated = build_model(cfg, info)
    load_adapter_state(federated, load_file(str(run_dir / "adapter.safetensors")))
    x = _inputs(load_split(cfg.dataset, "test", data_root=str(medmnist_root)).images[:64], torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), federated.eval()(x), rtol=1e-4, atol=1e-5)


def test_existing_run_directory_is_never_overwritten(default_run):
    cfg, run_dir = default_run
    before = (run_dir / "summary.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds files"):
        simulate(cfg)
    assert (run_dir / "summary.json").read_bytes() == before
