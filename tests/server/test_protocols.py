"""One round skeleton for every protocol: a malformed train reply is rejected and the round goes on,
whether the run averages adapter deltas (fedavg) or merges low-rank updates into the backbone
(exact, LTE); every protocol records the same per-round keys."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict

from fedmeld.client.app import app as client_app
from fedmeld.server.app import federate
from fedmeld.server.report import ROUND_KEYS
from fedmeld.server.strategy import ROUND_STATS
from fedmeld.task.config import RunConfig
from fedmeld.task.flower.inprocess import InProcessGrid
from fedmeld.task.wire import pack, unpack


def _first_float(state: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in state.items() if v.is_floating_point())


def _nan(state):
    key = _first_float(state)
    state[key] = state[key].clone().flatten().index_fill(0, torch.tensor([0]), float("nan")).view_as(state[key])
    return state


def _wrong_shape(state):
    key = _first_float(state)
    state[key] = torch.cat([state[key], state[key][:1]])  # one row too many
    return state


def _wrong_dtype(state):
    key = _first_float(state)
    state[key] = state[key].double()
    return state


def _missing_key(state):
    del state[_first_float(state)]
    return state


CORRUPTIONS = {1: ("non-finite", _nan), 2: ("torch.float32, expected", _wrong_shape), 3: ("torch.float64, expected", _wrong_dtype),
               4: ("missing [", _missing_key), 5: ("lacks the 'arrays' ArrayRecord or the 'metrics'", None)}


class SabotagingGrid(InProcessGrid):
    """Partition k > 0 sends a train reply corrupted in the k-th way; partition 0 is honest."""

    def _deliver(self, message: Message) -> Message:
        reply = super()._deliver(message)
        pid = self.contexts[message.metadata.dst_node_id].node_config["partition-id"]
        if message.metadata.message_type != "train" or pid not in CORRUPTIONS or reply.has_error():
            return reply
        _, corrupt = CORRUPTIONS[pid]
        if corrupt is None:  # the metrics record is missing
            return Message(RecordDict({"arrays": reply.content["arrays"]}), reply_to=message)
        state = corrupt(dict(unpack(reply.content["arrays"])))
        return Message(RecordDict({"arrays": pack(state), "metrics": MetricRecord(dict(reply.content["metrics"]))}),
                       reply_to=message)


PROTOCOL_CASES = {
    "fedavg": {"peft": "lora+norm", "aggregation": "fedavg"},
    "exact": {"peft": "lora+norm", "aggregation": "exact"},
    "lte": {"peft": "lte", "lte-heads": 2, "lora-rank": 2, "batch-size": 16},
    # server momentum on the merged updates: every replica keeps the velocities in its context.state; clients
    # evaluate only in round 2, so round 1's replica check comes from the train replies
    "lte-momentum": {"peft": "lte", "lte-heads": 2, "lora-rank": 2, "batch-size": 16,
                     "server-optimizer": "momentum", "server-lr": 0.5, "client-eval-every": 2},
}


@pytest.fixture(scope="module")
def sabotaged_runs(medmnist_root, tmp_path_factory) -> dict[str, tuple[RunConfig, list[dict], str]]:
    """One run per protocol, 6 clients, 2 rounds, five of them sending a malformed reply each round."""
    out = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, overrides in PROTOCOL_CASES.items():
        cfg = RunConfig.from_mapping({
            "data-root": str(medmnist_root), "model": "vit_pico_patch4_28", "num-clients": 6, "partition": "iid",
            "num-server-rounds": 2, "local-epochs": 1, "batch-size": 32, "device": "cpu", "out": str(out),
            "min-clients": 1,
            "run-name": name, **overrides})
        handler = _Capture()
        logging.getLogger("fedmeld.server.strategy").addHandler(handler)
        try:
            run_dir = federate(SabotagingGrid(client_app, cfg.num_clients), cfg)
        finally:
            logging.getLogger("fedmeld.server.strategy").removeHandler(handler)
        rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (cfg, rounds, "\n".join(handler.lines))
    return runs


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.parametrize("case", sorted(PROTOCOL_CASES))
def test_malformed_replies_are_rejected_and_the_round_completes(case, sabotaged_runs):
    cfg, rounds, log = sabotaged_runs[case]
    assert cfg.protocol == ("delta" if case == "fedavg" else "backbone-merge")
    assert [r["round"] for r in rounds] == [1, 2]  # every round completed and was recorded
    for record in rounds:
        assert (record["num_clients_ok"], record["num_clients_failed"], record["applied"]) == (1, 5, True)
        assert len(record["failed_nodes"]) == 5 and all(why for _, why in record["failed_nodes"])
        assert record["test_accuracy"] == record["test_accuracy"]  # evaluated (not NaN)
    for why, _ in CORRUPTIONS.values():
        assert sum(why in line for line in log.splitlines() if "rejected reply" in line) == 2, (why, log)
    if case != "fedavg":  # the honest client's update was merged and every replica still equals the server's
        assert all(r["backbone_checksum_rel_diff"] < 1e-9 for r in rounds)
    evaluated = [r["client_val_accuracy"] == r["client_val_accuracy"] for r in rounds]  # not NaN
    assert evaluated == ([False, True] if cfg.client_eval_every == 2 else [True, True])


def test_every_protocol_records_the_same_round_keys(sabotaged_runs):
    keys = {case: {frozenset(r) for r in rounds} for case, (_, rounds, _) in sabotaged_runs.items()}
    assert all(len(k) == 1 for k in keys.values())  # every round of a run the same keys
    assert len({k for run in keys.values() for k in run}) == 1  # and every protocol the same
    assert set(ROUND_KEYS) | set(ROUND_STATS) <= next(iter(keys["fedavg"]))
