"""task/aggregators/: the aggregation rules (mean, robust, exact) by hand and under attack."""

from __future__ import annotations

import pytest
import torch

from fedmeld.peft import adapter_state
from fedmeld.task.aggregators import AGGREGATORS
from fedmeld.task.aggregators.mean import weighted_mean
from fedmeld.task.config import RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.model import build_model
from fedmeld.task.wire import pack, payload_bytes


def test_weighted_mean_matches_hand_computation(toy_state):
    deltas, weights = [toy_state(1), toy_state(2), toy_state(3)], [10, 30, 60]
    mean = weighted_mean(deltas, weights)
    for name in deltas[0]:
        by_hand = (10 * deltas[0][name] + 30 * deltas[1][name] + 60 * deltas[2][name]) / 100
        torch.testing.assert_close(mean[name], by_hand, rtol=0, atol=1e-6)
    assert AGGREGATORS["fedavg"].fn is weighted_mean
    with pytest.raises(ValueError, match="one weight per delta"):
        weighted_mean(deltas, [1, 2])


def _deltas(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(3, 4, generator=g) * 0.01, "b": torch.randn(5, generator=g) * 0.01} for _ in range(n)]


def test_robust_rules_survive_a_client_scaled_by_1e6():
    honest = _deltas(5)
    attacked = honest[:4] + [{k: v * 1e6 for k, v in honest[4].items()}]
    weights = [100.0] * 5
    for rule in ("median", "trimmed-mean"):
        clean, hit = AGGREGATORS[rule](honest, weights), AGGREGATORS[rule](attacked, weights)
        assert all(hit[k].abs().max() < 0.05 for k in hit), rule  # stays at the honest clients' scale
        assert all((hit[k] - clean[k]).abs().max() < 0.05 for k in hit), rule
    fedavg = AGGREGATORS["fedavg"](attacked, weights)
    assert max(v.abs().max() for v in fedavg.values()) > 100  # the mean follows the attacker


def test_median_and_trimmed_mean_by_hand():
    deltas = [{"x": torch.tensor([v])} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    assert AGGREGATORS["median"](deltas, [1] * 5)["x"].item() == 3.0
    assert AGGREGATORS["trimmed-mean"](deltas, [1] * 5)["x"].item() == pytest.approx(3.0)  # drops 1 and 100


def test_ffa_sends_only_b_and_its_mean_is_exact(medmnist_root):
    """Frozen-A LoRA: A is regenerated from the seed on every node, so only B travels, and the mean
    of the clients' B deltas gives exactly the mean of their s·B·A updates."""
    cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "lora", "aggregation": "ffa"})
    plain = RunConfig.from_mapping({"model": "resnet10t", "peft": "lora"})
    info = task_info("breastmnist")
    a, b = build_model(cfg, info), build_model(cfg, info)
    sent = adapter_state(a)
    assert not [k for k in sent if k.endswith("lora_A")] and [k for k in sent if k.endswith("lora_B")]
    assert payload_bytes(pack(sent)) < 0.6 * payload_bytes(pack(adapter_state(build_model(plain, info))))
    layer_a, layer_b = a.layer1[0].conv1, b.layer1[0].conv1
    assert torch.equal(layer_a.lora_A, layer_b.lora_A)  # same A on every node, never sent
    deltas = [{"B": torch.randn_like(layer_a.lora_B)} for _ in range(3)]
    mean_b = AGGREGATORS["ffa"](deltas, [1.0, 2.0, 3.0])["B"]
    per_client = [layer_a.scaling * (d["B"] @ layer_a.lora_A.flatten(1)) for d in deltas]
    exact = (1 * per_client[0] + 2 * per_client[1] + 3 * per_client[2]) / 6
    torch.testing.assert_close(layer_a.scaling * (mean_b @ layer_a.lora_A.flatten(1)), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ranks", [(4, 4, 4), (2, 4, 8)])
def test_exact_equals_the_mean_of_products_and_fedavg_does_not(ranks, client_factors):
    clients, weights = client_factors(ranks), [1.0, 2.0, 5.0]
    by_hand = sum(w * (c["l/B"] @ c["l/A"]) for c, w in zip(clients, weights)) / sum(weights)
    stacked = AGGREGATORS["exact"](clients, weights)
    assert stacked["l/A"].shape[0] == sum(ranks)  # rank of the update: the sum of the client ranks
    assert (stacked["l/B"] @ stacked["l/A"] - by_hand).abs().max() <= 1e-5
    if len(set(ranks)) == 1:  # fedavg needs equal shapes: it averages A and B apart
        mean = AGGREGATORS["fedavg"](clients, weights)
        assert (mean["l/B"] @ mean["l/A"] - by_hand).abs().max() > 1e-2
