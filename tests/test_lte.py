"""LTE: batched heads, exact merges, replicas in sync through low-rank updates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmeld.task.config import RunConfig
from fedmeld.task.data import load_split, task_info
from fedmeld.peft.lora import LoRAConv2d, LoRALinear
from fedmeld.peft.lte import inject_lte
from fedmeld.task.backbone_merge import (Backbone, BackboneMergeServer, base_state, build_merge_model, client_round,
                                         dense_state, snapshot, sync)
from fedmeld.task.wire import nbytes

CPU = torch.device("cpu")


def _perturb(layer, seed: int) -> None:
    """Random A and B, as after some training (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def _layers(heads: int, rank: int = 3) -> list[tuple[nn.Sequential, torch.Tensor, nn.Module]]:
    """A wrapped Linear and Conv2d, an input for each, and a plain copy of each base layer."""
    torch.manual_seed(0)
    cases = [(nn.Linear(12, 7), torch.randn(heads * 2, 4, 12)),
             (nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(heads * 2, 3, 9, 9))]
    out = []
    for layer, x in cases:
        plain = copy.deepcopy(layer)
        seq = nn.Sequential(layer)
        inject_lte(seq, heads, rank, 6.0)
        out.append((seq, x, plain))
    return out


@pytest.mark.parametrize("heads", [1, 4])
def test_batched_heads_equal_separate_lora_forwards(heads):
    for seq, x, plain in _layers(heads):
        layer = seq[0]
        _perturb(layer, 1)
        y = seq.train()(x)
        for h, xh in enumerate(x.chunk(heads)):
            lora_cls = LoRALinear if isinstance(plain, nn.Linear) else LoRAConv2d
            single = lora_cls.from_module(copy.deepcopy(plain), layer.rank, layer.lora_alpha)
            with torch.no_grad():
                single.lora_A.copy_(layer.lora_A[h])
                single.lora_B.copy_(layer.lora_B[h])
            torch.testing.assert_close(y[h * len(xh):(h + 1) * len(xh)], single(xh), rtol=1e-5, atol=1e-5)


def test_batch_not_divisible_by_heads_is_refused():
    seq, x, _ = _layers(4)[0]
    with pytest.raises(ValueError, match="divisible by lte-heads"):
        seq.train()(x[:5])


def test_resetless_merge_is_exact_and_telescopes():
    for seq, x, _ in _layers(3):
        layer = seq[0]
        w0 = layer.weight.detach().clone()
        _perturb(layer, 2)
        expected = w0 + layer.scaling * torch.einsum("hor,hri->oi", layer.lora_B, layer.lora_A.flatten(2)).view_as(w0) / 3
        before = seq.eval()(x)
        layer.merge_step()
        torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(seq(x), before, rtol=1e-5, atol=1e-5)  # eval sees the merged model either way
        # right after a merge every head computes the merged weight: heads are in sync
        torch.testing.assert_close(seq.train()(x), seq.eval()(x), rtol=1e-5, atol=1e-5)
        a_before = layer.lora_A.detach().clone()
        _perturb(layer, 3)  # more training, a second merge
        layer.merge_step()
        assert not torch.equal(layer.lora_A, a_before)  # nothing re-initialised: A is what training left
        b, a = layer.factors_since_reset()
        assert b.shape[1] == 3 * layer.rank  # rank H·r however many merges
        torch.testing.assert_close(layer.weight - w0, (b @ a.flatten(1)).view_as(w0), rtol=0, atol=1e-5)


def test_reinit_merge_is_exact_and_keeps_a_ledger():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(12, 7))
    inject_lte(seq, 2, 3, 6.0, mode="reinit")
    layer = seq[0]
    w0 = layer.weight.detach().clone()
    _perturb(layer, 4)
    expected = w0 + layer.scaling * (layer.lora_B[0] @ layer.lora_A[0] + layer.lora_B[1] @ layer.lora_A[1]) / 2
    old_a = layer.lora_A.detach().clone()
    layer.merge_step()
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, old_a)
    _perturb(layer, 5)
    layer.merge_step()
    b, a = layer.factors_since_reset()
    assert b.shape[1] == 3 * 2 * 3  # two merged ledger entries + the (zero) live heads
    torch.testing.assert_close(layer.weight - w0, b @ a, rtol=0, atol=1e-5)


def _cfg(medmnist_root, **overrides) -> RunConfig:
    return RunConfig.from_mapping({"model": "vit_pico_patch4_28", "peft": "lte", "data-root": str(medmnist_root),
                                   "device": "cpu", "batch-size": 16, "lte-heads": 2, "lr": 3e-3,
                                   "local-epochs": 1, **overrides})


def test_federated_replicas_follow_the_server_through_low_rank_updates(medmnist_root):
    """Three clients, three rounds, client 2 misses round 2 and catches up from the missed factors;
    every replica ends equal to the server's backbone, and only factors and replicas crossed."""
    cfg = _cfg(medmnist_root, **{"lora-rank": 2})
    info = task_info(cfg.dataset)
    data = load_split(cfg.dataset, "train", data_root=cfg.data_root)
    shards = [data.subset(range(i * 48, (i + 1) * 48)) for i in range(3)]
    model = build_merge_model(cfg, info)
    server = BackboneMergeServer(base_state(model), dense_state(model))
    initial = snapshot(base_state(model))
    replicas, versions = [Backbone(initial, 0) for _ in shards], [0, 0, 0]
    full_bytes = nbytes(snapshot(model.state_dict()))
    factor_bytes = 4 * cfg.lte_heads * cfg.lora_rank * sum(w.shape[0] + w[0].numel() for w in initial.values())
    for rnd in range(1, 4):
        replies = []
        for k, shard in enumerate(shards):
            if rnd == 2 and k == 2:
                continue
            payload, _ = server.payload(versions[k])
            assert all(key.startswith(("update/", "dense/")) for key in payload)  # never the backbone
            assert nbytes(payload) < full_bytes / 2  # rank 3 clients x 2 heads x 2 of width 64
            replicas[k], reply, _ = client_round(model, replicas[k], payload, server.version, shard, info, cfg,
                                                 CPU, seed=rnd * 10 + k)
            versions[k] = replicas[k].version
            assert nbytes(reply) == factor_bytes + nbytes(server.dense) < full_bytes / 4
            replies.append((reply, float(len(shard))))
        server.aggregate(replies)
    rank = 3 * cfg.lte_heads * cfg.lora_rank
    assert all(update.shape[-1] == rank for key, update in server.updates[3].items() if key.endswith("/B"))
    assert not torch.equal(server.backbone.base["blocks.0.mlp.fc1.weight"], initial["blocks.0.mlp.fc1.weight"])
    for k in range(3):
        payload, catchup = server.payload(versions[k])
        assert catchup == (nbytes({key: v for key, v in payload.items() if key.startswith("update/2/")}) if k == 2 else 0)
        replica = sync(replicas[k], payload, server.version)
        for name, weight in server.backbone.base.items():
            assert (replica.base[name] - weight).abs().max() <= 1e-5, name


def test_server_aggregate_is_the_weighted_mean_of_client_products():
    base = {"l.weight": torch.zeros(4, 6)}
    server = BackboneMergeServer(base, {"r": torch.zeros(2)})
    g = torch.Generator().manual_seed(0)
    clients = [({"factor/l/B": torch.randn(4, 2, generator=g), "factor/l/A": torch.randn(2, 6, generator=g),
                 "dense/r": torch.randn(2, generator=g)}, w) for w in (1.0, 3.0)]
    server.aggregate(clients)
    expected = sum(w * (d["factor/l/B"] @ d["factor/l/A"]) for d, w in clients) / 4
    torch.testing.assert_close(server.backbone.base["l.weight"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(server.dense["r"], (clients[0][0]["dense/r"] + 3 * clients[1][0]["dense/r"]) / 4)


def test_federated_lte_under_flower(medmnist_root, tmp_path):
    """peft=lte through the simulation runtime: replicas match the server's at every evaluation,
    uploads are exactly the factors plus replicas, nobody needed a full backbone."""
    import json

    from fedmeld.simulations.run import load_config, simulate

    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', 'run-name="lte"', 'peft="lte"',
                             'model="vit_pico_patch4_28"', "num-clients=2", "num-server-rounds=2", "local-epochs=1",
                             "batch-size=32", "lte-heads=2", "lora-rank=2", "lr=0.003", 'device="cpu"'])
    run = simulate(cfg)
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    model = build_merge_model(cfg, task_info(cfg.dataset))
    base, replicas = base_state(model), dense_state(model)
    upload = 4 * 2 * 2 * sum(w.shape[0] + w[0].numel() for w in base.values()) + nbytes(replicas)
    headers = 200 * (2 * len(base) + len(replicas))  # an .npy header per array
    for record in rounds:
        assert record["num_clients_ok"] == 2 and record["backbone_checksum_rel_diff"] < 1e-9
        assert record["catchup_bytes"] == 0
        assert 2 * upload < record["bytes_up"] < 2 * (upload + headers)
    assert summary["bytes_per_client_round"] < summary["full_model_bytes"]  # full FedAvg: 2x this
    assert summary["final_test_accuracy"] != summary["initial_test_accuracy"]  # the global model moved
