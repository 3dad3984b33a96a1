"""Server-side aggregation of adapter deltas, with real Flower messages."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedmeld.task.wire import pack, unpack
from fedmeld.server.delta import DeltaProtocol
from fedmeld.server.optimizers import ServerOptimizer
from fedmeld.server.strategy import FedmeldStrategy
from fedmeld.task.aggregators import AGGREGATORS
from fedmeld.task.aggregators.mean import weighted_mean
from fedmeld.task.wire import payload_bytes


pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py


class FakeGrid:
    """The one Grid call FedAvg's sampling makes."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.lora_A": torch.randn(4, 6, generator=g), "layer.lora_B": torch.randn(5, 4, generator=g),
            "norm.weight": torch.randn(5, generator=g)}


def _reply(instruction: Message, delta: dict[str, torch.Tensor] | None, n: int) -> Message:
    if delta is None:
        return Message(Error(code=2, reason="Traceback ...\nRuntimeError: CUDA out of memory"), reply_to=instruction)
    return Message(RecordDict({"arrays": pack(delta), "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})}),
                   reply_to=instruction)


def test_weighted_mean_matches_hand_computation():
    deltas, weights = [_state(1), _state(2), _state(3)], [10, 30, 60]
    mean = weighted_mean(deltas, weights)
    for name in deltas[0]:
        by_hand = (10 * deltas[0][name] + 30 * deltas[1][name] + 60 * deltas[2][name]) / 100
        torch.testing.assert_close(mean[name], by_hand, rtol=0, atol=1e-6)
    assert AGGREGATORS["fedavg"].fn is weighted_mean
    with pytest.raises(ValueError, match="one weight per delta"):
        weighted_mean(deltas, [1, 2])


def test_round_drops_bad_replies_and_aggregates_the_rest(caplog):
    global_state = _state(0)
    strategy = FedmeldStrategy(DeltaProtocol({k: v.clone() for k, v in global_state.items()}, weighted_mean,
                                             ServerOptimizer(lr=0.5)), min_available_nodes=1, min_train_nodes=1)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, pack(global_state), ConfigRecord({}), FakeGrid([11, 12, 13, 14, 15, 16, 17]))}
    good = {11: (_state(1), 100), 12: (_state(2), 300)}
    nan = _state(3)
    nan["norm.weight"][2] = math.nan
    wrong_shape = _state(4)
    wrong_shape["layer.lora_A"] = torch.zeros(4, 7)
    missing = _state(5)
    del missing["norm.weight"]
    replies = [_reply(instructions[k], d, n) for k, (d, n) in good.items()] + [
        _reply(instructions[13], nan, 50), _reply(instructions[14], wrong_shape, 50),
        _reply(instructions[15], missing, 50), _reply(instructions[16], None, 0),
    ]  # node 17 times out: no reply at all
    _, metrics = strategy.aggregate_train(1, replies)

    expected = {k: v + 0.5 * (100 * good[11][0][k] + 300 * good[12][0][k]) / 400 for k, v in global_state.items()}
    for name, value in strategy.protocol.global_state().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6)
    stats = strategy.round_stats[1]
    assert (stats["num_clients_ok"], stats["num_clients_failed"]) == (2, 5)
    assert stats["bytes_up"] == sum(payload_bytes(pack(d)) for d, _ in good.values())
    assert stats["bytes_down"] == payload_bytes(pack(global_state)) * 7
    assert metrics["train_loss"] == pytest.approx(1.0)
    for node, why in [(13, "non-finite"), (14, "expected (4, 6)"), (15, "missing ['norm.weight']"),
                      (16, "CUDA out of memory")]:
        assert f"rejected reply from node {node}" in caplog.text and why in caplog.text


def test_round_with_no_usable_reply_keeps_the_global_state():
    global_state = _state(0)
    strategy = FedmeldStrategy(DeltaProtocol(dict(global_state), weighted_mean), min_available_nodes=1,
                               min_train_nodes=1)
    [instruction] = strategy.configure_train(1, pack(global_state), ConfigRecord({}), FakeGrid([3]))
    assert strategy.aggregate_train(1, [_reply(instruction, None, 0)]) == (None, None)
    assert all(torch.equal(strategy.protocol.global_state()[k], v) for k, v in global_state.items())


def test_a_failing_client_does_not_stop_the_federation():
    """Flower's own strategy loop over the in-process Grid: one client raises every round, the others
    send deltas; each round completes with the failure counted and the rest aggregated."""
    from flwr.clientapp import ClientApp

    from fedmeld.task.flower.inprocess import InProcessGrid

    app = ClientApp()

    @app.train()
    def train(msg, context):
        if context.node_config["partition-id"] == 0:
            raise RuntimeError("disk full")
        delta = {k: torch.ones_like(v) for k, v in unpack(msg.content["arrays"]).items()}
        return Message(RecordDict({"arrays": pack(delta), "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=msg)

    start = _state(0)
    strategy = FedmeldStrategy(DeltaProtocol(dict(start), weighted_mean), fraction_evaluate=0.0,
                               min_available_nodes=3)
    strategy.start(InProcessGrid(app, 3), pack(start), num_rounds=2)
    for name, value in strategy.protocol.global_state().items():
        torch.testing.assert_close(value, start[name] + 2)  # two rounds of +1 from the healthy clients
    assert [(s["num_clients_ok"], s["num_clients_failed"]) for s in strategy.round_stats.values()] == [(2, 1), (2, 1)]


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
