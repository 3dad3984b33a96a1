"""task/engine.py: the metrics match MedMNIST's Evaluator; FedProx keeps a client near the global model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from medmnist import Evaluator

from fedmeld.peft import adapter_state
from fedmeld.task.config import RunConfig
from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import medmnist_acc, medmnist_auc, pick_device, train
from fedmeld.task.model import build_model


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


def test_fedprox_keeps_the_client_near_the_global_model(medmnist_root):
    info = task_info("breastmnist")
    data = load_split("breastmnist", "train", data_root=str(medmnist_root)).subset(torch.arange(128).numpy())
    drift = {}
    for mu in (0.0, 10.0):
        cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "norm", "data-root": str(medmnist_root)})
        model = build_model(cfg, info)
        start = adapter_state(model)
        train(model, data, info, epochs=2, batch_size=32, lr=0.05, weight_decay=0.0, device=pick_device("cpu"),
              seed=0, prox_mu=mu)
        end = adapter_state(model)
        drift[mu] = sum((end[k] - start[k]).pow(2).sum().item() for k in start if "running" not in k)
    assert drift[10.0] < 0.8 * drift[0.0]
