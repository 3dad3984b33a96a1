"""The one federation strategy: Flower's FedAvg for sampling and messaging, with the protocol
(what travels, how replies become the next global model) as a small pluggable object.

Every protocol shares this round skeleton: per-node messages built from the protocol's payload,
every train reply checked by one validator (``parse_reply``: errors, missing records, names,
shapes, dtypes, finiteness, BatchNorm statistics it would make invalid) and dropped with a log
line instead of ending the run, and the same per-round bookkeeping (``ROUND_STATS``: clients
ok/failed, bytes each way, seconds, speed) for metrics.jsonl. Tensors travel packed into one
Array per message (``task/wire.py``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import nn

from fedmeld.peft import merged_state_dict
from fedmeld.peft.norm import BN_STATISTICS
from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.data import TaskInfo
from fedmeld.task.privacy import CLIENTS, DPPlan, Ledger
from fedmeld.task.wire import State, pack, payload_bytes, snapshot, unpack

log = logging.getLogger(__name__)
WEIGHT_KEY = "num-examples"
# What metrics.jsonl records for every round, whatever the protocol (NaN where a round has no value).
ROUND_STATS = ("num_sampled", "num_clients_ok", "num_clients_failed", "partitions_ok", "failed_nodes", "applied",
               "bytes_down",
               "bytes_up", "catchup_bytes",
               "train_loss", "client_val_accuracy", "samples_seen", "slowest_client_train_seconds",
               "sum_client_train_seconds", "client_img_per_s", "client_peak_memory_mb", "backbone_checksum_rel_diff")


class BadReply(ValueError):
    """A train reply that cannot be aggregated; the message says why."""


class BudgetSpent(RuntimeError):
    """The next round would take a client past ``dp-max-epsilon``: the run stops before it."""


@dataclass
class PrivacyBudget:
    """The server's side of DP: the ledger it owns, the plans nodes declare, the cap it enforces.

    The server, not the client, keeps each client's history: a client may be a fresh process every
    round (simulation) or restart (deployment), while the server sees every round, checkpoints the
    ledger and so keeps it across a resume. It charges every node it sent a train instruction,
    with the (sigma, q, steps) its reply reports or, without a usable reply, the plan the node
    declared when first queried (a node that sent nothing may still have trained): ε is
    overestimated rather than missed."""

    ledger: Ledger
    delta: float
    max_epsilon: float  # 0: no cap
    query: ConfigRecord | None  # DP-SGD: the run config, sent with the partition query so nodes declare plans
    client_level: DPPlan | None  # one release of client-level DP, charged by the rule (task/privacy.ClientDP)
    plans: dict[int, DPPlan] = field(default_factory=dict)  # partition id -> declared per-round DP-SGD plan

    @classmethod
    def of(cls, cfg: RunConfig, ledger: Ledger) -> PrivacyBudget | None:
        """The run's budget, or None without DP."""
        if not (cfg.dp_clip or cfg.client_dp_clip):
            return None
        return cls(ledger, cfg.dp_delta, cfg.dp_max_epsilon, ConfigRecord(cfg.to_flower()) if cfg.dp_clip else None,
                   DPPlan(1.0, 1, cfg.client_dp_noise) if cfg.client_dp_clip else None)

    def check(self, server_round: int, partitions: list[int]) -> None:
        """Raise BudgetSpent if the round, with these partitions sampled, would exceed the cap."""
        if not self.max_epsilon:
            return
        after = {f"client {p}": self.ledger.epsilon(str(p), self.delta, self.plans[p])
                 for p in partitions if self.query is not None and p in self.plans}
        if self.client_level is not None:
            after["client-level DP"] = self.ledger.epsilon(CLIENTS, self.delta, self.client_level)
        over = {who: eps for who, eps in after.items() if eps > self.max_epsilon}
        if over:
            raise BudgetSpent(f"round {server_round} would exceed dp-max-epsilon {self.max_epsilon:g} at dp-delta "
                              f"{self.delta:g} (" + ", ".join(f"{w}: epsilon {e:.3f}" for w, e in over.items())
                              + f"); the run stops after round {server_round - 1}")

    def charge(self, partitions: dict[int, DPPlan | None]) -> None:
        """DP-SGD: charge each sampled partition its reported plan, else its declared one."""
        if self.query is None:
            return
        for pid, reported in partitions.items():
            plan = reported or self.plans.get(pid)
            if plan is None:
                log.warning("DP ledger: partition %d neither reported nor declared a DP plan; not charged", pid)
                continue
            self.ledger.charge(str(pid), plan)

    def stats(self) -> dict[str, float]:
        """What metrics.jsonl records: the largest client ε so far (DP-SGD), client-level ε, delta."""
        out = {"dp_delta": self.delta}
        if self.query is not None:
            out["dp_epsilon"] = self.ledger.max_epsilon(self.delta)
        if self.client_level is not None:
            out["client_dp_epsilon"] = self.ledger.epsilon(CLIENTS, self.delta)
        return out


@dataclass(frozen=True)
class Reply:
    """A train reply that passed ``parse_reply``."""

    node_id: int
    state: State
    weight: float
    metrics: MetricRecord
    partition: int = -1  # as the node declared it at its first contact (FedmeldStrategy._learn_partitions)

    @property
    def client(self) -> str:
        """Who sent it, stable across rounds and a resume: its partition, else (undeclared) its node."""
        return f"partition {self.partition}" if self.partition >= 0 else f"node {self.node_id}"


class Protocol(ABC):
    """What travels between server and clients and how the replies change the global model."""

    required_metrics: tuple[str, ...] = ()  # reply metrics the protocol reads, besides num-examples

    @staticmethod
    @abstractmethod
    def build_model(cfg: RunConfig, info: TaskInfo) -> nn.Module:
        """The model the server evaluates and exports: the one its clients train."""

    @classmethod
    @abstractmethod
    def for_run(cls, cfg: RunConfig, model: nn.Module) -> Protocol:
        """The protocol's server state for a run, starting from ``model``."""

    @abstractmethod
    def payload(self, node_id: int) -> tuple[State, dict[str, ConfigRecord], int]:
        """The tensors for ``node_id``, extra records for the message, and the bytes of catch-up
        (what the node gets beyond the round's own update)."""

    @abstractmethod
    def expected(self) -> Mapping[str, tuple[tuple[int | None, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every tensor a train reply holds; ``None`` matches any size."""

    def prepare(self, state: State) -> State:
        """A reply's tensors made comparable with ``expected`` (e.g. zero-padded ranks);
        raises ValueError for tensors that cannot be."""
        return state

    def observe_train(self, replies: list[Reply]) -> dict[str, float]:
        """Round stats from the good train replies, before they are aggregated (e.g. whether every replica
        a client trained from equals the server's)."""
        return {}

    @abstractmethod
    def aggregate(self, replies: list[Reply]) -> None:
        """Turn the round's good replies into the next global model."""

    def observe_evaluation(self, replies: list[Message]) -> dict[str, float]:
        """Round stats from the evaluate replies (e.g. whether every replica equals the server's)."""
        return {}

    @abstractmethod
    def load_into(self, model: nn.Module, state: State | None = None) -> None:
        """Make ``model`` compute the global model: the current one, or the one ``state`` (an
        earlier ``global_state()``) holds."""

    @abstractmethod
    def global_state(self) -> State:
        """What a checkpoint holds: everything that defines the global model. A reply tensor of the
        same name is a delta of it (``parse_reply`` checks the BatchNorm statistics it would make)."""

    def extra_state(self) -> tuple[State, dict]:
        """What else a resumed run needs (tensors such as server-optimizer moments, JSON bookkeeping)."""
        return {}, {}

    @abstractmethod
    def restore(self, global_state: State, extra: State, meta: dict) -> None:
        """Continue from a checkpoint's ``global_state()`` and ``extra_state()``."""

    def node_failed(self, node_id: int) -> None:
        """A node's train reply was unusable (error, rejected, missing)."""

    def export_state(self, model: nn.Module, state: State | None = None) -> State:
        """The global model (as ``load_into`` takes it) as a plain timm state dict, copied out."""
        self.load_into(model, state)
        return snapshot(merged_state_dict(model))


def parse_reply(msg: Message, protocol: Protocol) -> Reply:
    """A train reply checked against what the protocol expects; BadReply says what is wrong."""
    if msg.has_error():
        reason = msg.error.reason.strip().splitlines() if msg.error.reason else []
        raise BadReply(f"client error {msg.error.code}: {reason[-1] if reason else 'no reason given'}")
    content = msg.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise BadReply("reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord")
    metrics = content["metrics"]
    weight = metrics.get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or weight <= 0:
        raise BadReply(f"metric {WEIGHT_KEY!r} missing or not positive: {weight!r}")
    missing_metrics = [k for k in protocol.required_metrics if k not in metrics]
    if missing_metrics:
        raise BadReply(f"metrics {missing_metrics} missing")
    try:
        state = protocol.prepare(unpack(content["arrays"]))
    except ValueError as err:  # fedmeld.task.wire.WireError is one
        raise BadReply(str(err)) from None
    expected = protocol.expected()
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    if missing or unexpected:
        raise BadReply(f"tensor names differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    for name, (shape, dtype) in expected.items():
        got = state[name]
        if len(got.shape) != len(shape) or any(s is not None and g != s for g, s in zip(got.shape, shape)) \
                or got.dtype != dtype:
            want = tuple("r" if s is None else s for s in shape)
            raise BadReply(f"{name}: got {tuple(got.shape)} {got.dtype}, expected {want} {dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise BadReply(f"{name}: non-finite values")
    check_statistics(state, protocol.global_state())
    return Reply(msg.metadata.src_node_id, state, float(weight), metrics)


def check_statistics(delta: State, global_state: State) -> None:
    """Refuse a reply whose BatchNorm statistics, applied to the global ones, would not be finite or
    would make a running variance negative (a negative variance turns that BatchNorm's output into
    NaN). An honest client's applied statistic is its own local one, >= 0 up to float32 rounding of
    local − global (at most 2⁻²⁴ of the global value, tolerated); every rule combines the deltas
    convexly per coordinate (a mean, a median, a trimmed mean, scaled by λ <= 1, one reply), so once
    these replies are gone no rule can make a variance negative (a server optimizer with momentum
    or adaptive steps can: server-optimizer=fedavg with server-lr <= 1 keeps the guarantee)."""
    for name, d in delta.items():
        if not name.endswith(BN_STATISTICS) or name not in global_state:
            continue
        base = global_state[name].double()
        after = base + d.double()
        if not torch.isfinite(after.to(global_state[name].dtype)).all():  # as the global model would hold it
            raise BadReply(f"{name}: the statistics it would give the global model are not finite")
        negative = after < -1e-6 * base.abs()
        if name.endswith("running_var") and negative.any():
            raise BadReply(f"{name}: would make {int(negative.sum())} of {after.numel()} running variances negative "
                           f"(down to {after.min().item():.4g}); an honest client's never go below 0")


def _order(msg: Message) -> tuple[int, int]:
    """Replies in partition order (the same under every runtime), node id for clients without one."""
    metrics = msg.content.metric_records.get("metrics", {})
    return int(metrics.get("partition-id", -1)), msg.metadata.src_node_id


def client_speed(metrics: list[MetricRecord]) -> dict[str, float]:
    """Per-client training speed and memory, for overhead and scaling studies (the weighted
    means Flower aggregates would hide the slowest client)."""
    seconds = [float(m.get("train_seconds", math.nan)) for m in metrics]
    return {
        "samples_seen": sum(int(m.get("samples_seen", 0)) for m in metrics),
        "slowest_client_train_seconds": max(seconds),
        "sum_client_train_seconds": sum(seconds),
        "client_img_per_s": sum(float(m.get("samples_seen", math.nan)) / max(s, 1e-9)
                                for m, s in zip(metrics, seconds)) / len(metrics),
        "client_peak_memory_mb": max(float(m.get("peak_memory_mb", math.nan)) for m in metrics),
    }


class FedmeldStrategy(FedAvg):
    """FedAvg's sampling and messaging around a ``Protocol``, with bad replies dropped."""

    def __init__(self, protocol: Protocol, min_replies: int = 1, seed: int = 0, round_offset: int = 0,
                 num_partitions: int | None = None, budget: PrivacyBudget | None = None, evaluate_every: int = 1,
                 last_round: int | None = None, **kwargs) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
        self.protocol = protocol
        self.round_offset = round_offset  # a resumed run: Flower counts from 1 again, we continue
        self.seed = seed  # client sampling
        self.min_replies = min_replies  # fewer good train replies: the round is recorded, not applied
        self.round_stats: dict[int, dict] = {}  # what metrics.jsonl records per round
        self._sampled: dict[int, list[int]] = {}  # round -> nodes sent a train instruction
        self._sent: dict[int, list[Message]] = {}  # round -> its train instructions
        self._partitions: dict[int, int] = {}  # node id -> partition id, as the node reported it
        self.num_partitions = num_partitions  # what the run config says; nodes that disagree end the run
        self.budget = budget  # DP: the ledger and the dp-max-epsilon check
        self.evaluate_every = evaluate_every  # client-eval-every: rounds between client-side evaluations
        self.last_round = last_round  # the run's last round (counted as the run counts), always evaluated

    def _messages(self, server_round: int, config: ConfigRecord, grid: Grid, fraction: float, min_nodes: int,
                  message_type: str) -> list[Message]:
        """One message per sampled node, each with the protocol's payload for that node."""
        if fraction == 0.0:
            return []
        _, available = sample_nodes(grid, self.min_available_nodes, min_nodes)  # waits for enough nodes
        sample_size = max(int(len(available) * fraction), min_nodes)  # of the nodes there after the wait
        # Flower samples node ids with the unseeded `random`, and node ids change from run to run:
        # sample partitions, seeded, so that the same seed samples the same clients in any runtime
        self._learn_partitions(grid, available)
        order = sorted(available, key=lambda node: (self._partitions[node], node))
        rng = random.Random(f"{self.seed}/{server_round}/{message_type}")
        node_ids = sorted(rng.sample(order, min(sample_size, len(order))), key=order.index)
        if self.budget is not None and message_type == MessageType.TRAIN:
            self.budget.check(server_round, [self._partitions[n] for n in node_ids])
        config = ConfigRecord({**config, "server-round": server_round})
        stats = self.round_stats.setdefault(server_round, {
            "round_start": time.perf_counter(), **dict.fromkeys(ROUND_STATS, math.nan),
            "num_sampled": 0, "num_clients_ok": 0, "num_clients_failed": 0, "partitions_ok": [], "failed_nodes": [],
            "applied": False,
            "bytes_down": 0, "bytes_up": 0, "catchup_bytes": 0, "samples_seen": 0})
        packed: tuple[int, ArrayRecord] | None = None  # a payload shared by every node is packed once
        messages = []
        for node in node_ids:
            state, records, catchup = self.protocol.payload(node)
            if packed is None or packed[0] != id(state):
                packed = (id(state), pack(state))
            stats["bytes_down"] += payload_bytes(packed[1])
            stats["catchup_bytes"] += catchup
            content = RecordDict({"arrays": packed[1], "config": config, **records})
            messages.append(Message(content, message_type=message_type, dst_node_id=node))
        return messages

    def _learn_partitions(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes not seen before for their partition id (one query message each, all at once);
        a node that cannot say counts as -1. A node whose data is split into another number of
        partitions than the run's ``num-clients`` ends the run: its shard is not the one the run
        config describes (``flwr run .`` simulates 2 SuperNodes unless told otherwise). Under DP-SGD
        the query carries the run config and each node declares its per-round DP plan."""
        new = [n for n in nodes if n not in self._partitions]
        if not new:
            return
        query = RecordDict({"config": self.budget.query} if self.budget and self.budget.query else {})
        replies = grid.send_and_receive([Message(query, message_type=MessageType.QUERY, dst_node_id=n)
                                         for n in new], timeout=60)
        for reply in replies:
            if not reply.has_error() and "metrics" in reply.content.metric_records:
                metrics = reply.content["metrics"]
                self._partitions[reply.metadata.src_node_id] = int(metrics.get("partition-id", -1))
                if self.budget is not None and (plan := DPPlan.from_metrics(metrics)) is not None:
                    self.budget.plans[int(metrics.get("partition-id", -1))] = plan
                split = int(metrics.get("num-partitions", -1))
                if self.num_partitions is not None and split not in (-1, self.num_partitions):
                    raise ConfigError(
                        f"num-clients is {self.num_partitions} but SuperNode {reply.metadata.src_node_id} holds "
                        f"partition {self._partitions[reply.metadata.src_node_id]} of {split}: start "
                        f"{self.num_partitions} SuperNodes (flwr run . --federation-config "
                        f"'num-supernodes={self.num_partitions}'; a deployment: --node-config "
                        f"'partition-id=K num-partitions={self.num_partitions}'), or set num-clients={split}")
        self._partitions.update({n: -1 for n in new if n not in self._partitions})

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        messages = self._messages(server_round, config, grid, self.fraction_train, self.min_train_nodes,
                                  MessageType.TRAIN)
        self.round_stats[server_round].update(num_sampled=len(messages), num_clients_failed=len(messages))
        self._sampled[server_round] = [m.metadata.dst_node_id for m in messages]
        self._sent[server_round] = messages  # Flower sets their message ids as it pushes them
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        if server_round % self.evaluate_every and server_round != self.last_round:
            return []  # Flower's loop then sends nothing and aggregates no reply
        return self._messages(server_round, config, grid, self.fraction_evaluate, self.min_evaluate_nodes,
                              MessageType.EVALUATE)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        good: list[tuple[Message, Reply]] = []
        failed: dict[int, str] = {}  # node -> why its reply is not used
        answered = set()
        reported: dict[int, DPPlan | None] = {}  # node -> the DP-SGD round its reply reports
        # the SuperLink answers for a node it gave up ("Node Unavailable") as itself: by the instruction
        to_node = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent.pop(server_round, [])}
        for msg in replies:
            node = msg.metadata.src_node_id
            if node == SUPERLINK_NODE_ID and msg.has_error():
                node = to_node.get(msg.metadata.reply_to_message_id, node)
            answered.add(node)
            if not msg.has_error() and "metrics" in msg.content.metric_records:
                reported[node] = DPPlan.from_metrics(msg.content["metrics"])
            try:
                reply = parse_reply(msg, self.protocol)
                if self.budget and self.budget.query and reported.get(reply.node_id) is None:
                    raise BadReply("no DP-SGD report (dp_sample_rate, dp_steps, dp_noise_multiplier) under dp-clip")
                good.append((msg, replace(reply, partition=self._partitions.get(reply.node_id, -1))))
            except BadReply as bad:
                failed[node] = str(bad)
                log.warning("round %d: rejected reply from node %d: %s", server_round, node, bad)
        for node in set(self._sampled.get(server_round, [])) - answered:
            failed[node] = "no reply within round-timeout"
            log.warning("round %d: node %d sent no reply within round-timeout", server_round, node)
        stats = self.round_stats[server_round]
        stats["num_clients_ok"] = len(good)
        stats["partitions_ok"] = sorted(int(r.metrics.get("partition-id", -1)) for _, r in good)
        stats["num_clients_failed"] = stats["num_sampled"] - len(good)  # errors, rejects and timeouts
        stats["failed_nodes"] = [[node, why] for node, why in sorted(failed.items())]
        for node in failed:
            self.protocol.node_failed(node)
        stats["bytes_up"] = sum(payload_bytes(m.content["arrays"]) for m, _ in good)
        if self.budget is not None:  # every sampled node has spent, whether its reply is used or not
            self.budget.charge({self._partitions.get(n, -1): reported.get(n) for n in self._sampled[server_round]})
            stats.update(self.budget.stats())
        good.sort(key=lambda pair: _order(pair[0]))  # aggregate in a fixed order: float sums depend on it
        if len(good) < self.min_replies:
            log.warning("round %d: %d usable replies, fewer than min-clients %d; the global model is unchanged",
                        server_round, len(good), self.min_replies)
            return None, None
        stats.update(self.protocol.observe_train([r for _, r in good]))
        self.protocol.aggregate([r for _, r in good])
        stats["applied"] = True
        if self.budget is not None:  # client-level DP charged its release while aggregating
            stats.update(self.budget.stats())
        metrics = self.train_metrics_aggr_fn([m.content for m, _ in good], WEIGHT_KEY)
        stats["train_loss"] = float(metrics.get("train_loss", math.nan))
        stats.update(client_speed([r.metrics for _, r in good]))
        return ArrayRecord(), metrics  # the protocol holds the global model; Flower's copy would go unused

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client-side validation metrics, weighted; errors, malformed replies and clients without a
        validation split are skipped."""
        server_round += self.round_offset
        good = sorted((m for m in replies if not m.has_error() and "metrics" in m.content.metric_records), key=_order)
        stats = self.round_stats[server_round]
        stats.update(self.protocol.observe_evaluation(good))
        scored = [m.content for m in good if m.content["metrics"].get(WEIGHT_KEY, 0) > 0
                  and "val_accuracy" in m.content["metrics"]]
        metrics = self.evaluate_metrics_aggr_fn(scored, WEIGHT_KEY) if scored else None
        stats["client_val_accuracy"] = float((metrics or {}).get("val_accuracy", math.nan))
        return metrics
