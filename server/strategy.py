"""A Flower strategy whose clients send adapter deltas instead of weights.

It is Flower's FedAvg for sampling and messaging; it overrides aggregation so that a bad reply
(an error, non-finite tensors, wrong names/shapes/dtypes) is logged and dropped instead of ending
the run, and it keeps per-round bookkeeping (clients ok/failed, bytes each way, seconds). The
global state and the deltas travel packed into one Array per message (client/wire.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from client.wire import pack, payload_bytes, unpack
from peft import resize_ranks
from server.aggregation import Aggregator, Delta
from server.optimizers import ServerOptimizer

log = logging.getLogger(__name__)
WEIGHT_KEY = "num-examples"


class BadReply(ValueError):
    """A train reply that cannot be aggregated; the message says why."""


def parse_reply(msg: Message, reference: Delta, pad_ranks: bool = False) -> tuple[Delta, float]:
    """The delta and example count of a train reply, checked against the global state; with
    ``pad_ranks``, LoRA factors of a smaller rank are zero-padded to the global rank (HetLoRA)."""
    if msg.has_error():
        reason = msg.error.reason.strip().splitlines() if msg.error.reason else []
        raise BadReply(f"client error {msg.error.code}: {reason[-1] if reason else 'no reason given'}")
    content = msg.content
    if "arrays" not in content.array_records or "metrics" not in content.metric_records:
        raise BadReply("reply lacks the 'arrays' ArrayRecord or the 'metrics' MetricRecord")
    weight = content["metrics"].get(WEIGHT_KEY)
    if not isinstance(weight, (int, float)) or weight <= 0:
        raise BadReply(f"metric {WEIGHT_KEY!r} missing or not positive: {weight!r}")
    try:
        delta = unpack(content["arrays"])
        if pad_ranks:
            delta = resize_ranks(delta, reference)
    except ValueError as err:  # client.wire.WireError is one
        raise BadReply(str(err)) from None
    missing, unexpected = reference.keys() - delta.keys(), delta.keys() - reference.keys()
    if missing or unexpected:
        raise BadReply(f"tensor names differ: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
    for name, ref in reference.items():
        got = delta[name]
        if got.shape != ref.shape or got.dtype != ref.dtype:
            raise BadReply(f"{name}: got {tuple(got.shape)} {got.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise BadReply(f"{name}: non-finite values")
    return delta, float(weight)


def _client_speed(metrics: list[MetricRecord]) -> dict[str, float]:
    """Per-client training speed and memory, for overhead and scaling studies (the weighted
    means Flower aggregates would hide the slowest client)."""
    if not all({"train_seconds", "samples_seen"} <= m.keys() for m in metrics):
        return {}
    return {
        "slowest_client_train_seconds": max(float(m["train_seconds"]) for m in metrics),
        "sum_client_train_seconds": sum(float(m["train_seconds"]) for m in metrics),
        "client_img_per_s": sum(float(m["samples_seen"]) / max(float(m["train_seconds"]), 1e-9)
                                for m in metrics) / len(metrics),
        "client_peak_memory_mb": max(float(m.get("peak_memory_mb", 0.0)) for m in metrics),
    }


class DeltaFedAvg(FedAvg):
    """Global state += server optimizer step on aggregate(client deltas), with bad replies dropped."""

    def __init__(self, initial_state: Delta, aggregator: Aggregator, server_opt: ServerOptimizer | None = None,
                 pad_ranks: bool = False, **kwargs) -> None:
        super().__init__(weighted_by_key=WEIGHT_KEY, **kwargs)
        self.global_state = initial_state
        self.pad_ranks = pad_ranks  # client-ranks: smaller LoRA factors are zero-padded (HetLoRA)
        self.aggregator = aggregator
        self.server_opt = server_opt or ServerOptimizer()
        self.round_stats: dict[int, dict[str, float]] = {}  # what metrics.jsonl records per round

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.round_stats[server_round] = {
            "round_start": time.perf_counter(), "num_sampled": len(messages),
            "bytes_down": payload_bytes(arrays) * len(messages), "bytes_up": 0,
            "num_clients_ok": 0, "num_clients_failed": len(messages), "train_loss": math.nan,
            "client_val_accuracy": math.nan,
        }
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.round_stats[server_round]["bytes_down"] += payload_bytes(arrays) * len(messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        good: list[tuple[Message, Delta, float]] = []
        for msg in replies:
            try:
                good.append((msg, *parse_reply(msg, self.global_state, self.pad_ranks)))
            except BadReply as bad:
                log.warning("round %d: rejected reply from node %d: %s", server_round, msg.metadata.src_node_id, bad)
        stats = self.round_stats[server_round]
        stats["num_clients_ok"] = len(good)
        stats["num_clients_failed"] = stats["num_sampled"] - len(good)  # errors, rejects and timeouts
        stats["bytes_up"] = sum(payload_bytes(m.content["arrays"]) for m, _, _ in good)
        if not good:
            log.warning("round %d: no usable replies; the global state is unchanged", server_round)
            return None, None
        step = self.server_opt.step(self.aggregator([d for _, d, _ in good], [w for _, _, w in good]))
        self.global_state = {k: (v + step[k]).to(v.dtype) for k, v in self.global_state.items()}
        metrics = self.train_metrics_aggr_fn([m.content for m, _, _ in good], WEIGHT_KEY)
        stats["train_loss"] = float(metrics.get("train_loss", math.nan))
        stats.update(_client_speed([m.content["metrics"] for m, _, _ in good]))
        return pack(self.global_state), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Client-side validation metrics, weighted; errors, malformed replies and clients without a
        validation split are skipped."""
        good = [m for m in replies if not m.has_error() and len(m.content.metric_records) == 1
                and next(iter(m.content.metric_records.values())).get(WEIGHT_KEY, 0) > 0]
        metrics = self.evaluate_metrics_aggr_fn([m.content for m in good], WEIGHT_KEY) if good else None
        self.round_stats[server_round]["client_val_accuracy"] = float((metrics or {}).get("val_accuracy", math.nan))
        return metrics
