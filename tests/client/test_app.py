"""client/app.py: the ClientApp's handlers with real Flower messages."""

from __future__ import annotations

import pytest
import torch

from fedmeld.server.delta import DeltaProtocol
from fedmeld.server.strategy import FedmeldStrategy
from fedmeld.task.wire import pack


def test_a_client_without_validation_data_replies_and_is_skipped(medmnist_root, task_identity):
    """Dirichlet shards can be tiny: with 3 clients (seed 0) partition 2 keeps no validation images.
    Its evaluate reply says num-examples 0 instead of failing, and the weighted mean skips it."""
    from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

    from fedmeld.client.app import evaluate_handler, load_shard
    from fedmeld.task.config import RunConfig
    from fedmeld.task.data import task_info
    from fedmeld.task.model import build_model
    from fedmeld.peft import adapter_state

    cfg = RunConfig.from_mapping({"model": "resnet10t", "num-clients": 3, "data-root": str(medmnist_root)})
    assert len(load_shard(cfg, 2, 3).val) == 0
    state = adapter_state(build_model(cfg, task_info(cfg.dataset)))
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2, "num-partitions": 3},
                      state=RecordDict(), run_config={})
    msg = Message(RecordDict({"arrays": pack(state), "config": ConfigRecord(cfg.to_flower())}),
                  dst_node_id=7, message_type="evaluate")
    reply = evaluate_handler(msg, context)
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 0
    strategy = FedmeldStrategy(DeltaProtocol(state, lambda d, w: d[0]))
    strategy.round_stats[1] = {}
    other = Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "val_accuracy": 0.5, "val_loss": 1.0})}),
                    reply_to=msg)
    assert strategy.aggregate_evaluate(1, [reply, other])["val_accuracy"] == 0.5


@pytest.mark.parametrize("overrides", [
    {"peft": "lora+norm", "model": "resnet10t", "lora-dropout": 0.1, "augment": "light"},  # dropout, augmentation
    {"peft": "lte", "model": "vit_pico_patch4_28", "lte-heads": 2, "batch-size": 16},
], ids=["delta", "backbone-merge"])
def test_a_clients_reply_does_not_depend_on_who_trained_before_it(overrides, medmnist_root, task_identity):
    """Virtual clients share a process (and its cached model): client 1's reply is bit-identical
    whether it trains first or after client 0 did."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedmeld.client.app import train_handler
    from fedmeld.server.app import PROTOCOLS
    from fedmeld.task.config import RunConfig
    from fedmeld.task.data import task_info
    from fedmeld.task.wire import unpack

    cfg = RunConfig.from_mapping({"num-clients": 2, "local-epochs": 1, "device": "cpu",
                                  "data-root": str(medmnist_root), **overrides})
    kind = PROTOCOLS[cfg.protocol]
    protocol = kind.for_run(cfg, kind.build_model(cfg, task_info(cfg.dataset)))

    def reply(partition: int) -> dict:
        state, records, _ = protocol.payload(partition)
        msg = Message(RecordDict({"arrays": pack(state), "config": ConfigRecord({**cfg.to_flower(), "server-round": 1}),
                                  **records}), dst_node_id=partition, message_type="train")
        context = Context(run_id=1, node_id=partition, node_config={"partition-id": partition, "num-partitions": 2},
                          state=RecordDict(), run_config={})
        return unpack(train_handler(msg, context).content["arrays"])

    alone = reply(1)
    reply(0)
    after = reply(1)
    assert alone.keys() == after.keys() and all(torch.equal(alone[k], after[k]) for k in alone)


def test_an_attacker_partition_poisons_its_reply_and_nobody_elses(medmnist_root, task_identity, monkeypatch):
    """attack=sign-flip, attackers=0: partition 0 sends -k times the delta it honestly trained, bit
    for bit, and partition 1 sends what it sends in a clean run; attack=label-flip: partition 0
    trains on 1 - y of its shard (BreastMNIST is binary) and partition 1 on its own labels."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from fedmeld.client import delta as delta_protocol
    from fedmeld.client.app import load_shard, train_handler
    from fedmeld.server.app import PROTOCOLS
    from fedmeld.task.config import RunConfig
    from fedmeld.task.data import task_info
    from fedmeld.task.wire import unpack

    base = {"model": "resnet10t", "num-clients": 5, "local-epochs": 1, "batch-size": 64, "device": "cpu",
            "data-root": str(medmnist_root)}
    trained_on: dict[int, torch.Tensor] = {}
    honest_train = delta_protocol.train

    def recording(msg, context, cfg, data, seed):  # what each partition trained on
        trained_on[int(context.node_config["partition-id"])] = data.labels
        return honest_train(msg, context, cfg, data, seed)

    monkeypatch.setattr(delta_protocol, "train", recording)

    def replies(**attack) -> list[dict]:
        cfg = RunConfig.from_mapping({**base, **attack})
        kind = PROTOCOLS[cfg.protocol]
        protocol = kind.for_run(cfg, kind.build_model(cfg, task_info("breastmnist")))
        out = []
        for partition in (0, 1):
            msg = Message(RecordDict({"arrays": pack(protocol.payload(partition)[0]),
                                      "config": ConfigRecord({**cfg.to_flower(), "server-round": 1})}),
                          dst_node_id=partition, message_type="train")
            context = Context(run_id=1, node_id=partition, node_config={"partition-id": partition, "num-partitions": 5},
                              state=RecordDict(), run_config={})
            out.append(unpack(train_handler(msg, context).content["arrays"]))
        return out

    clean = replies()
    flipped = replies(attack="sign-flip", attackers="0", **{"attack-scale": 5.0})
    assert all(torch.equal(flipped[0][k], clean[0][k] if k.endswith("running_var") else -5.0 * clean[0][k])
               for k in clean[0])  # BatchNorm running variances go honest (task/attacks.py)
    assert all(torch.equal(flipped[1][k], clean[1][k]) for k in clean[1])

    poisoned = replies(attack="label-flip", attackers="0")
    shards = [load_shard(RunConfig.from_mapping(base), p, 5).train.labels for p in (0, 1)]
    assert torch.equal(trained_on[0], 1 - shards[0]) and torch.equal(trained_on[1], shards[1])
    assert all(torch.equal(poisoned[1][k], clean[1][k]) for k in clean[1])
    assert not torch.equal(poisoned[0]["fc.weight"], clean[0]["fc.weight"])  # it learned the mirrored task
