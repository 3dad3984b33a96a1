"""The server side of federated LTE and of exact LoRA aggregation (``aggregation=exact``): merge
the clients' low-rank updates into the global backbone and broadcast them as low-rank factors,
never as the backbone itself.

Each reply holds, per wrapped layer, factors (B_k, A_k) with B_k·A_k = client k's change of that
weight (its heads' s·B·A since the round's reset, merged or not). The server stacks them with the
example weights folded into B, B = [w_1 B_1 | .. | w_K B_K], A = [A_1; ..; A_K], so B·A is exactly
the example-weighted mean of the clients' deltas, of rank <= Σ ranks. That pair is update v of
the backbone; server and clients apply it with the same function (``client.lte.sync``).
Replicas (norms, biases, embeddings, head) are averaged like any adapter delta and sent in full.

Catch-up rule: the server keeps every update and, per node, the version the node last reported.
A node that is behind (it joined late or missed rounds) gets all the updates it missed, unless
those weigh more bytes than the backbone; then it gets the backbone once ("base/..." keys). A new
node is at version 0: everyone builds the same seeded or pretrained init. Both paths are counted
in ``bytes_down`` (and ``catchup_bytes`` in metrics.jsonl).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from client.config import RunConfig
from client.lte import Replica, State, base_state, build_lte_model, checksum, load, replica_state, snapshot, sync
from client.wire import pack, payload_bytes, unpack
from server.aggregation import stacked_product_mean, weighted_mean
from server.evaluation import CentralEvaluation

log = logging.getLogger(__name__)
WEIGHT_KEY = "num-examples"


def nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


class LTEServer:
    """The global backbone, its update history and the global replicas (Flower-free)."""

    def __init__(self, base: State, replicas: State) -> None:
        self.replica = Replica(snapshot(base), 0)
        self.replicas = snapshot(replicas)
        self.updates: dict[int, State] = {}  # version -> "update/{v}/{layer}/B|A" factors

    @property
    def version(self) -> int:
        return self.replica.version

    def payload(self, node_version: int) -> tuple[State, int]:
        """What a node at ``node_version`` needs for the current version, and the catch-up bytes
        (anything beyond the latest update)."""
        missed = {k: v for n in range(node_version + 1, self.version + 1) for k, v in self.updates[n].items()}
        latest = self.updates.get(self.version, {}) if node_version < self.version else {}
        base = {f"base/{k}": v for k, v in self.replica.base.items()}
        sync_part = base if nbytes(missed) > nbytes(base) else missed
        state = sync_part | {f"replica/{k}": v for k, v in self.replicas.items()}
        return state, nbytes(sync_part) - nbytes(latest)

    def aggregate(self, replies: Sequence[tuple[State, float]]) -> None:
        """Merge the example-weighted mean of the clients' B·A deltas; average the replicas."""
        version = self.version + 1
        weights = [w for _, w in replies]
        stacked = stacked_product_mean([{k[7:]: v for k, v in d.items() if k.startswith("factor/")}
                                        for d, _ in replies], weights)
        self.updates[version] = {f"update/{version}/{k}": v for k, v in stacked.items()}
        self.replica = sync(self.replica, self.updates[version], version)
        deltas = [{k[8:]: v for k, v in d.items() if k.startswith("replica/")} for d, _ in replies]
        mean = weighted_mean(deltas, weights)
        self.replicas = {k: (v + mean[k]).to(v.dtype) for k, v in self.replicas.items()}


def check_reply(msg: Message, expected: set[str]) -> tuple[State, float]:
    if msg.has_error():
        raise ValueError(f"client error {msg.error.code}: {(msg.error.reason or '').strip()[-200:]}")
    state = unpack(msg.content["arrays"])
    weight = msg.content["metrics"].get(WEIGHT_KEY, 0)
    if set(state) != expected or weight <= 0:
        raise ValueError("reply tensors or num-examples do not match the LTE protocol")
    if not all(torch.isfinite(t).all() for t in state.values()):
        raise ValueError("non-finite values")
    return state, float(weight)


class LTEStrategy(FedAvg):
    """FedAvg's sampling and messaging, with a per-node broadcast (catch-up) and LTE aggregation."""

    def __init__(self, server: LTEServer, expected_keys: set[str], **kwargs) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
        self.server = server
        self.expected_keys = expected_keys
        self.node_versions: dict[int, int] = {}
        self.round_stats: dict[int, dict[str, float]] = {}

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, fraction: float,
                  message_type: str) -> list[Message]:
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, 1))
        config = ConfigRecord({**config, "server-round": server_round})
        version = ConfigRecord({"version": self.server.version})  # apart: "config" holds run-config keys only
        stats = self.round_stats.setdefault(server_round, {
            "round_start": time.perf_counter(), "num_sampled": 0, "bytes_down": 0, "bytes_up": 0,
            "catchup_bytes": 0, "num_clients_ok": 0, "num_clients_failed": 0, "train_loss": math.nan,
            "client_val_accuracy": math.nan, "replica_checksum_rel_diff": math.nan, "samples_seen": 0})
        messages = []
        for node in node_ids:
            payload, catchup = self.server.payload(self.node_versions.get(node, 0))
            arrays = pack(payload)
            stats["bytes_down"] += payload_bytes(arrays)
            stats["catchup_bytes"] += catchup
            messages.append(Message(RecordDict({"arrays": arrays, "config": config, "lte": version}), message_type=message_type,
                                    dst_node_id=node))
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = self._messages(server_round, config, grid, self.fraction_train, MessageType.TRAIN)
        self.round_stats[server_round]["num_sampled"] = len(messages)
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._messages(server_round, config, grid, self.fraction_evaluate, MessageType.EVALUATE)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good = []
        for msg in replies:
            try:
                good.append((msg, *check_reply(msg, self.expected_keys)))
            except ValueError as bad:
                log.warning("round %d: rejected reply from node %d: %s", server_round, msg.metadata.src_node_id, bad)
        stats = self.round_stats[server_round]
        stats["num_clients_ok"], stats["num_clients_failed"] = len(good), stats["num_sampled"] - len(good)
        stats["bytes_up"] = sum(payload_bytes(m.content["arrays"]) for m, _, _ in good)
        if not good:
            return None, None
        for msg, _, _ in good:
            self.node_versions[msg.metadata.src_node_id] = int(msg.content["metrics"]["lte-version"])
        self.server.aggregate([(state, w) for _, state, w in good])
        metrics = self.train_metrics_aggr_fn([m.content for m, _, _ in good], WEIGHT_KEY)
        stats["train_loss"] = float(metrics.get("train_loss", math.nan))
        stats["samples_seen"] = sum(int(m.content["metrics"]["samples_seen"]) for m, _, _ in good)
        return pack(self.server.replicas), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Node versions, replica fingerprints against the server's, and validation accuracy."""
        good = [m for m in replies if not m.has_error()]
        stats = self.round_stats[server_round]
        reference = checksum(self.server.replica.base)
        diffs = []
        for msg in good:
            metrics = msg.content["metrics"]
            self.node_versions[msg.metadata.src_node_id] = int(metrics["lte-version"])
            diffs.append(abs(float(metrics["base-checksum"]) - reference) / reference)
        stats["replica_checksum_rel_diff"] = max(diffs, default=math.nan)
        scored = [m.content for m in good if "val_accuracy" in m.content["metrics"]]
        if not scored:
            return None
        metrics = self.evaluate_metrics_aggr_fn(scored, WEIGHT_KEY)
        stats["client_val_accuracy"] = float(metrics.get("val_accuracy", math.nan))
        return metrics


def federate(grid: Grid, cfg: RunConfig) -> Path:
    """server/app.py's federate for peft=lte: same run directory, metrics and summary, plus bytes
    per round beside the full model's size."""
    central = CentralEvaluation.start(cfg)
    model = build_lte_model(cfg.for_client(None), central.info).to(central.device)
    server = LTEServer(base_state(model), replica_state(model))
    reply_keys = {f"factor/{k[:-7]}/{f}" for k in server.replica.base for f in "BA"} | \
                 {f"replica/{k}" for k in server.replicas}
    strategy = LTEStrategy(server, reply_keys, fraction_train=cfg.fraction_train,
                           fraction_evaluate=cfg.fraction_train, min_train_nodes=1, min_evaluate_nodes=1,
                           min_available_nodes=min(cfg.min_clients, cfg.num_clients))

    def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        load(model, server.replica.base, server.replicas)
        return central(model, server_round, strategy.round_stats.get(server_round, {}))

    strategy.start(grid, pack(server.replicas), num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout,
                   train_config=ConfigRecord(cfg.to_flower()), evaluate_config=ConfigRecord(cfg.to_flower()),
                   evaluate_fn=central_evaluate)

    load(model, server.replica.base, server.replicas)
    plain = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    rounds = central.recorder.rounds
    return central.finish(model, plain, full_model_bytes=nbytes(dict(plain)),
                          bytes_per_client_round=sum(r["bytes_up"] + r["bytes_down"] for r in rounds)
                          / max(sum(r["num_clients_ok"] for r in rounds), 1),
                          samples_seen=sum(r["samples_seen"] for r in rounds))
