"""task/backbone_merge.py: replicas of the backbone follow the server through low-rank updates
(LTE, and aggregation=exact with mixed ranks)."""

from __future__ import annotations

import pytest
import torch

from fedmeld.peft.lte import lte_layers
from fedmeld.task.backbone_merge import (Backbone, BackboneMergeServer, ServerStep, base_state, build_merge_model,
                                         client_round, dense_state, snapshot, sync)
from fedmeld.task.config import RunConfig
from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import adamw
from fedmeld.task.lte import merge_every
from fedmeld.task.wire import nbytes

CPU = torch.device("cpu")


def _cfg(medmnist_root, **overrides) -> RunConfig:
    return RunConfig.from_mapping({"model": "vit_pico_patch4_28", "peft": "lte", "data-root": str(medmnist_root),
                                   "device": "cpu", "batch-size": 16, "lte-heads": 2, "lr": 3e-3,
                                   "local-epochs": 1, **overrides})


@pytest.mark.parametrize("reset_moments", [False, True])
def test_federated_replicas_follow_the_server_through_low_rank_updates(medmnist_root, reset_moments):
    """Three clients, three rounds, client 2 misses round 2 and catches up from the missed factors;
    every replica ends equal to the server's backbone, and only factors and replicas crossed (with
    the heads' optimizer moments kept or dropped at each merge)."""
    cfg = _cfg(medmnist_root, **{"lora-rank": 2, "lte-reset-moments": reset_moments})
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


def test_server_momentum_is_replicated_by_every_node_however_it_catches_up():
    """server-optimizer=momentum on the merged updates: the backbone follows FedAvgM (M = β·M + U,
    W += lr·M) computed by hand; a node synced every round, one that missed two rounds (catch-up
    from the factors) and a new one after the history was dropped (the base with its velocities)
    all end equal to the server, and only factors cross in the first two cases."""
    step = ServerStep(lr=0.5, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    start = {"l.weight": torch.randn(16, 24, generator=g)}
    server = BackboneMergeServer(start, {"r": torch.zeros(2)}, step=step)
    every, late = Backbone(snapshot(start), 0), Backbone(snapshot(start), 0)
    w, m = start["l.weight"].double(), torch.zeros(16, 24, dtype=torch.float64)
    for rnd in range(1, 5):
        replies = [({"factor/l/B": torch.randn(16, 2, generator=g), "factor/l/A": torch.randn(2, 24, generator=g),
                     "dense/r": torch.randn(2, generator=g)}, weight) for weight in (1.0, 3.0)]
        server.aggregate(replies)
        u = sum(weight * (d["factor/l/B"] @ d["factor/l/A"]).double() for d, weight in replies) / 4
        m = 0.9 * m + u
        w = w + 0.5 * m
        payload, _ = server.payload(every.version)
        assert all(k.startswith(("update/", "dense/")) for k in payload)
        every = sync(every, payload, server.version, step)
        if rnd == 4:  # missed rounds 2 and 3 (after syncing round 1)
            payload, _ = server.payload(late.version)
            assert {k.split("/")[1] for k in payload if k.startswith("update/")} == {"2", "3", "4"}
        late = sync(late, server.payload(late.version)[0], server.version, step) if rnd in (1, 4) else late
    torch.testing.assert_close(server.backbone.base["l.weight"].double(), w, rtol=0, atol=1e-5)
    torch.testing.assert_close(server.backbone.velocity["l.weight"].double(), m, rtol=0, atol=1e-5)
    server.updates = {}  # a resumed server keeps no history: a new node gets the base and the velocities
    payload, _ = server.payload(0)
    assert {k.split("/")[0] for k in payload} == {"base", "velocity", "dense"}
    fresh = sync(Backbone(snapshot(start), 0), payload, server.version, step)
    for replica in (every, late, fresh):
        assert all(torch.equal(replica.base[k], v) for k, v in server.backbone.base.items())
        assert all(torch.equal(replica.velocity[k], v) for k, v in server.backbone.velocity.items())
    # the default step (sgd, lr 1) keeps no velocity and adds the update as it always did
    plain = BackboneMergeServer(start, {"r": torch.zeros(2)})
    plain.aggregate(replies)
    mean = sum(weight * d["factor/l/B"] @ d["factor/l/A"] for d, weight in replies) / 4
    torch.testing.assert_close(plain.backbone.base["l.weight"], start["l.weight"] + mean, rtol=0, atol=1e-6)
    assert plain.backbone.velocity == {}


def test_server_momentum_survives_a_checkpoint():
    """The protocol's checkpoint holds the backbone's velocities and the dense tensors' moments: a protocol
    restored after round 2 aggregates round 3 exactly as the uninterrupted one."""
    from fedmeld.server.backbone_merge import BackboneMergeProtocol
    from fedmeld.server.optimizers import ServerOptimizer
    from fedmeld.server.strategy import Reply

    g = torch.Generator().manual_seed(1)
    start = {"l.weight": torch.randn(8, 12, generator=g)}

    def protocol() -> BackboneMergeProtocol:
        server = BackboneMergeServer(start, {"r": torch.zeros(3)}, step=ServerStep(lr=0.7, momentum=0.8))
        return BackboneMergeProtocol(server, ServerOptimizer("momentum", 0.7, 0.8))

    rounds = [[Reply(n, {"factor/l/B": torch.randn(8, 2, generator=g), "factor/l/A": torch.randn(2, 12, generator=g),
                         "dense/r": torch.randn(3, generator=g)}, 2.0, {"backbone-version": r}) for n in range(2)]
              for r in range(3)]
    whole = protocol()
    for replies in rounds[:2]:
        whole.aggregate(replies)
    extra, meta = whole.extra_state()
    assert {k.split("/")[0] for k in extra} == {"velocity", "dense-opt"}
    resumed = protocol()
    resumed.restore({k: v.clone() for k, v in whole.global_state().items()}, {k: v.clone() for k, v in extra.items()},
                    meta)  # as a checkpoint file holds them: copies
    for p in (whole, resumed):
        p.aggregate(rounds[2])
    for key, value in whole.global_state().items():
        assert torch.equal(resumed.global_state()[key], value), key
    assert torch.equal(resumed.server.backbone.velocity["l.weight"], whole.server.backbone.velocity["l.weight"])


def test_exact_merges_mixed_ranks_into_the_backbone(client_factors):
    """What the server of aggregation=exact does with the stacked factors: the backbone moves by
    exactly the weighted mean of the clients' products, whatever their ranks."""
    from fedmeld.task.backbone_merge import BackboneMergeServer

    clients = client_factors((2, 4, 8), out=4, inp=6)
    server = BackboneMergeServer({"l.weight": torch.ones(4, 6)}, {})
    server.aggregate([({f"factor/{k}": v for k, v in c.items()}, w) for c, w in zip(clients, (1.0, 1.0, 2.0))])
    by_hand = (clients[0]["l/B"] @ clients[0]["l/A"] + clients[1]["l/B"] @ clients[1]["l/A"]
               + 2 * clients[2]["l/B"] @ clients[2]["l/A"]) / 4
    assert (server.backbone.base["l.weight"] - 1 - by_hand).abs().max() <= 1e-5


def test_reset_moments_restarts_the_heads_optimizer_state_at_each_merge(medmnist_root):
    """Three steps merging after each: the heads' AdamW state counts one step (dropped at both merges),
    the dense parameters' three; the fresh reinit heads start from zero momentum."""
    cfg = _cfg(medmnist_root, **{"lte-merge-mode": "reinit"})
    model = build_merge_model(cfg, task_info(cfg.dataset)).train()
    opt = adamw([p for p in model.parameters() if p.requires_grad], 1e-3, 0.0)
    x = torch.randn(4, model.patch_embed.proj.in_channels, 28, 28, generator=torch.Generator().manual_seed(0))
    with merge_every(model, 1, opt):
        for _ in range(3):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    layer = next(iter(lte_layers(model).values()))
    assert int(opt.state[layer.lora_A]["step"]) == int(opt.state[layer.lora_B]["step"]) == 1
    assert int(opt.state[model.cls_token]["step"]) == 3
    assert len(layer.ledger) == 2  # both merges happened
