"""server/strategy.py: a round with real Flower messages drops bad replies and aggregates the rest."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedmeld.server.delta import DeltaProtocol
from fedmeld.server.optimizers import ServerOptimizer
from fedmeld.server.strategy import FedmeldStrategy
from fedmeld.task.aggregators.mean import weighted_mean
from fedmeld.task.wire import pack, payload_bytes, unpack

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a task identity


class FakeGrid:
    """The Grid calls sampling makes: the node ids, and a query for partition ids that nobody answers
    (the strategy then orders nodes by id)."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        return []


def _reply(instruction: Message, delta: dict[str, torch.Tensor] | None, n: int) -> Message:
    if delta is None:
        return Message(Error(code=2, reason="Traceback ...\nRuntimeError: CUDA out of memory"), reply_to=instruction)
    return Message(RecordDict({"arrays": pack(delta), "metrics": MetricRecord({"num-examples": n, "train_loss": 1.0})}),
                   reply_to=instruction)


def test_round_drops_bad_replies_and_aggregates_the_rest(caplog, toy_state):
    global_state = toy_state(0)
    strategy = FedmeldStrategy(DeltaProtocol({k: v.clone() for k, v in global_state.items()}, weighted_mean,
                                             ServerOptimizer(lr=0.5)), min_available_nodes=1, min_train_nodes=1)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, pack(global_state), ConfigRecord({}), FakeGrid([11, 12, 13, 14, 15, 16, 17]))}
    good = {11: (toy_state(1), 100), 12: (toy_state(2), 300)}
    nan = toy_state(3)
    nan["norm.weight"][2] = math.nan
    wrong_shape = toy_state(4)
    wrong_shape["layer.lora_A"] = torch.zeros(4, 7)
    missing = toy_state(5)
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


def test_round_with_no_usable_reply_keeps_the_global_state(toy_state):
    global_state = toy_state(0)
    strategy = FedmeldStrategy(DeltaProtocol(dict(global_state), weighted_mean), min_available_nodes=1,
                               min_train_nodes=1)
    [instruction] = strategy.configure_train(1, pack(global_state), ConfigRecord({}), FakeGrid([3]))
    assert strategy.aggregate_train(1, [_reply(instruction, None, 0)]) == (None, None)
    assert all(torch.equal(strategy.protocol.global_state()[k], v) for k, v in global_state.items())


def test_a_failing_client_does_not_stop_the_federation(toy_state):
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

    start = toy_state(0)
    strategy = FedmeldStrategy(DeltaProtocol(dict(start), weighted_mean), fraction_evaluate=0.0,
                               min_available_nodes=3)
    strategy.start(InProcessGrid(app, 3), pack(start), num_rounds=2)
    for name, value in strategy.protocol.global_state().items():
        torch.testing.assert_close(value, start[name] + 2)  # two rounds of +1 from the healthy clients
    assert [(s["num_clients_ok"], s["num_clients_failed"]) for s in strategy.round_stats.values()] == [(2, 1), (2, 1)]


def test_a_stateful_rule_remembers_clients_by_the_partition_they_declared():
    """direction-memory keys its scores by the partition a node declared at its first contact (node ids
    change from run to run, partitions do not): over Flower's in-process Grid, partition 0 sends −5× its
    delta each round and ends with the lowest score; the other partitions keep positive ones."""
    from flwr.clientapp import ClientApp

    from fedmeld.task.aggregators import AGGREGATORS, RuleSettings
    from fedmeld.task.flower.inprocess import InProcessGrid

    app = ClientApp()

    @app.query()
    def query(msg, context):
        return Message(RecordDict({"metrics": MetricRecord({"partition-id": context.node_config["partition-id"]})}),
                       reply_to=msg)

    @app.train()
    def train(msg, context):
        pid = context.node_config["partition-id"]
        g = torch.Generator().manual_seed(100 * msg.content["config"]["server-round"] + pid)
        delta = {k: torch.ones_like(v) + 0.3 * torch.randn(v.shape, generator=g)
                 for k, v in unpack(msg.content["arrays"]).items()}
        if pid == 0:
            delta = {k: -5 * v for k, v in delta.items()}
        return Message(RecordDict({"arrays": pack(delta), "metrics": MetricRecord({"num-examples": 10,
                                                                                  "partition-id": pid})}),
                       reply_to=msg)

    rule = AGGREGATORS["direction-clipped-mean"].configured(RuleSettings(byzantine=1, direction_memory=1.0))
    start = {"w": torch.zeros(6), "v": torch.zeros(3)}
    strategy = FedmeldStrategy(DeltaProtocol(dict(start), rule), fraction_evaluate=0.0, min_available_nodes=4)
    strategy.start(InProcessGrid(app, 4), pack(start), num_rounds=3)
    memory = strategy.protocol.memory
    assert sorted(memory) == [f"partition {i}" for i in range(4)]
    assert memory["partition 0"] < 0 < min(memory[f"partition {i}"] for i in (1, 2, 3))
    assert all(s["num_clients_ok"] == 4 for s in strategy.round_stats.values())


def test_clients_evaluate_every_n_rounds_and_in_the_last(toy_state):
    """client-eval-every 2 over 5 rounds: Flower's loop sends evaluate instructions in rounds 2, 4 and 5
    only (the last always), and the rounds between record no client validation."""
    from flwr.clientapp import ClientApp

    from fedmeld.task.flower.inprocess import InProcessGrid

    app, evaluated = ClientApp(), []

    @app.train()
    def train(msg, context):
        delta = {k: torch.ones_like(v) for k, v in unpack(msg.content["arrays"]).items()}
        return Message(RecordDict({"arrays": pack(delta), "metrics": MetricRecord({"num-examples": 10})}),
                       reply_to=msg)

    @app.evaluate()
    def evaluate(msg, context):
        evaluated.append(msg.content["config"]["server-round"])
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 10, "val_accuracy": 0.5})}),
                       reply_to=msg)

    start = toy_state(0)
    strategy = FedmeldStrategy(DeltaProtocol(dict(start), weighted_mean), min_available_nodes=2, evaluate_every=2,
                               last_round=5)
    strategy.start(InProcessGrid(app, 2), pack(start), num_rounds=5)
    assert sorted(evaluated) == [2, 2, 4, 4, 5, 5]
    accuracy = [strategy.round_stats[r]["client_val_accuracy"] for r in range(1, 6)]
    assert [math.isnan(a) for a in accuracy] == [True, False, True, False, False] and accuracy[1] == 0.5


def test_the_server_rejects_an_unpacked_reply_as_a_bad_reply():
    from fedmeld.server.delta import DeltaProtocol
    from fedmeld.server.strategy import BadReply, parse_reply

    reference = {"w": torch.zeros(2)}
    instruction = Message(RecordDict({"arrays": pack(reference)}), dst_node_id=3, message_type="train")
    reply = Message(RecordDict({"arrays": ArrayRecord({"w": torch.ones(2)}),
                                "metrics": MetricRecord({"num-examples": 4})}), reply_to=instruction)
    with pytest.raises(BadReply, match="not a fedmeld-packed record"):
        parse_reply(reply, DeltaProtocol(reference, lambda d, w: d[0]))


def test_a_round_below_min_replies_is_recorded_and_not_applied(caplog, toy_state):
    """min-clients: with fewer usable replies the round is recorded (who failed and why, including a
    node that never answered) and the global model stays as it was."""
    global_state = toy_state(0)
    strategy = FedmeldStrategy(DeltaProtocol(dict(global_state), weighted_mean), min_replies=2,
                               min_available_nodes=1, min_train_nodes=1)
    instructions = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        1, pack(global_state), ConfigRecord({}), FakeGrid([1, 2, 3]))}
    replies = [_reply(instructions[1], toy_state(1), 10), _reply(instructions[2], None, 0)]  # node 3: silent
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert all(torch.equal(strategy.protocol.global_state()[k], v) for k, v in global_state.items())
    stats = strategy.round_stats[1]
    assert (stats["num_clients_ok"], stats["num_clients_failed"], stats["applied"]) == (1, 2, False)
    assert stats["failed_nodes"] == [[2, "client error 2: RuntimeError: CUDA out of memory"],
                                     [3, "no reply within round-timeout"]]
    assert "fewer than min-clients 2" in caplog.text


def test_a_reply_that_would_make_a_batchnorm_variance_negative_is_rejected():
    """Applied to the global statistics, a running variance must stay >= 0 and every statistic finite;
    an honest client whose local variance is 0 (delta = −global) or a float32 rounding below it passes."""
    from fedmeld.server.strategy import BadReply, check_statistics

    glob = {"bn.running_var": torch.tensor([1.0, 4.0, 0.5]), "bn.running_mean": torch.tensor([0.0, 1.0, 3e38]),
            "bn.weight": torch.ones(3)}
    honest = {"bn.running_var": torch.tensor([-1.0, 4.0 * (1 - 2 ** -24) - 4.0, 0.1]),
              "bn.running_mean": torch.tensor([5.0, -5.0, -1e38]), "bn.weight": torch.tensor([-9.0, 0.0, 0.0])}
    check_statistics(honest, glob)  # a weight may go anywhere; only the statistics are checked
    with pytest.raises(BadReply, match=r"bn.running_var: would make 1 of 3 running variances negative \(down to -0.5"):
        check_statistics({**honest, "bn.running_var": torch.tensor([0.0, -4.5, 0.0])}, glob)
    with pytest.raises(BadReply, match="bn.running_mean: the statistics it would give the global model are not finite"):
        check_statistics({**honest, "bn.running_mean": torch.tensor([0.0, 0.0, 3e38])}, glob)


def test_a_poisoned_hospitals_broken_batchnorm_statistics_never_reach_the_rule(tiny_config):
    """A real federation on BreastMNIST (ResNet-10t, BatchNorm statistics aggregated) whose partition 0
    runs task/attacks.py's noise attack (5x its delta's size in every tensor): the server rejects its
    reply for the running variances it would make negative, records it in failed_nodes, and
    aggregates the two honest clients into a finite global model with no negative variance."""
    import json

    from safetensors.torch import load_file

    from fedmeld.client.app import app as client_app
    from fedmeld.server.app import federate
    from fedmeld.task.config import RunConfig
    from fedmeld.task.flower.inprocess import InProcessGrid

    cfg = RunConfig.from_mapping({**tiny_config, "device": "cpu", "num-server-rounds": 1, "num-clients": 3,
                                  "min-clients": 2, "partition": "iid", "attack": "noise", "attackers": "0",
                                  "attack-scale": 5.0})
    run_dir = federate(InProcessGrid(client_app, 3), cfg)
    [row] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert row["applied"] and row["partitions_ok"] == [1, 2] and len(row["failed_nodes"]) == 1
    assert "running variances negative" in row["failed_nodes"][0][1]
    assert math.isfinite(row["test_loss"]) and math.isfinite(row["test_auc"])
    final = load_file(str(run_dir / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    variances = [v for k, v in final.items() if k.endswith("running_var")]
    assert variances and min(v.min().item() for v in variances) >= 0
