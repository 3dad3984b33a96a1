"""server/evaluation.py: the official validation split selects the reported round, and what is
reported for it is what its exported model scores."""

from __future__ import annotations

import json

import timm
import torch
from safetensors.torch import load_file

from fedmeld.server.report import select_round
from fedmeld.simulations.run import load_config, simulate
from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import Inputs, evaluate
from fedmeld.task.schedule import lr_at


def test_select_round_takes_the_best_validation_metric_earliest_first_nan_never():
    rounds = [{"round": 1, "val_auc": 0.7, "val_loss": 0.5}, {"round": 2, "val_auc": float("nan"), "val_loss": 0.4},
              {"round": 3, "val_auc": 0.9, "val_loss": 0.6}, {"round": 4, "val_auc": 0.9, "val_loss": 0.4}]
    assert select_round(rounds, "val_auc")["round"] == 3
    assert select_round(rounds, "val_loss")["round"] == 2


def test_the_selected_round_is_reported_with_its_own_test_metrics_and_model(medmnist_root, tmp_path):
    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', 'run-name="sel"',
                             'model="resnet10t"', 'peft="full"', "num-clients=2", "num-server-rounds=4",
                             "local-epochs=1", "lr=0.003", 'lr-schedule="multistep"', 'lr-milestones="2"',
                             "lr-gamma=0.5", 'device="cpu"'])
    run = simulate(cfg, backend="inprocess")
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())

    assert [r["lr"] for r in rounds] == [lr_at(cfg, r["round"]) for r in rounds] == [0.003, 0.003, 0.0015, 0.0015]  # milestone 2: from round 3
    best = max(rounds, key=lambda r: (r["val_auc"], -r["round"]))
    assert summary["select_metric"] == "val_auc" and summary["selected_round"] == best["round"]
    assert summary["selected_val_auc"] == best["val_auc"]
    assert (summary["selected_test_accuracy"], summary["selected_test_auc"]) == (best["test_accuracy"],
                                                                               best["test_auc"])
    assert summary["final_test_auc"] == rounds[-1]["test_auc"]

    info = task_info(cfg.dataset)
    test = load_split(cfg.dataset, "test", data_root=cfg.data_root)
    for name, (acc, auc) in {"model_selected.safetensors": (best["test_accuracy"], best["test_auc"]),
                             "model_merged.safetensors": (rounds[-1]["test_accuracy"], rounds[-1]["test_auc"])}.items():
        model = timm.create_model("resnet10t", num_classes=info.num_classes, in_chans=info.in_chans)
        model.load_state_dict(load_file(run / name))
        result = evaluate(model, test, info, device=torch.device("cpu"), inputs=Inputs.of(cfg))
        assert (result.accuracy, result.auc) == (acc, auc), name
