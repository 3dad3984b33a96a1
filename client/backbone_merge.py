"""The backbone-merge protocol on a client (LTE, exact LoRA aggregation): keep a replica of the
global backbone in this node's ``context.state``, sync it from the broadcast factors, train the
LoRA heads, reply with their factors. The protocol itself is ``fedmeld.task.backbone_merge``.

The model is cached per process and shared by the clients a process hosts, so a client's
backbone lives in its ``context.state`` and is loaded into the model at every message.
"""

from __future__ import annotations

from functools import lru_cache

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from fedmeld.task.backbone_merge import (VERSION_KEY, Backbone, ServerStep, State, base_state, build_merge_model,
                                         checksum, client_round, global_dense, load, snapshot, sync)
from fedmeld.task.config import RunConfig
from fedmeld.task.data import Split, task_info
from fedmeld.task.engine import Inputs, pick_device
from fedmeld.task.engine import evaluate as evaluate_model
from fedmeld.task.wire import pack, payload_bytes, unpack

BASE_KEY, SYNC_KEY = "fedmeld.backbone", "fedmeld.backbone-sync"  # this node's replica in context.state
VELOCITY_KEY = "fedmeld.backbone-velocity"  # and its velocities, under server momentum


def train(msg: Message, context: Context, cfg: RunConfig, data: Split, seed: int) -> Message:
    payload = unpack(msg.content["arrays"])
    target = int(msg.content["backbone"]["version"])
    backbone, reply, stats = client_round(_model(cfg), _backbone(context, cfg), payload, target, data,
                                          task_info(cfg.dataset), cfg, pick_device(cfg.device), seed,
                                          server_round=int(msg.content["config"]["server-round"]))
    _store(context, backbone)
    arrays = pack(reply)
    metrics = MetricRecord({"num-examples": len(data), **stats, VERSION_KEY: backbone.version,
                            "base-checksum": checksum(backbone.base), "bytes_sent": payload_bytes(arrays)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context, cfg: RunConfig, data: Split) -> Message:
    """Sync to the round's global model (so every replica matches the server's), then evaluate it
    on the local validation split when there is one."""
    payload = unpack(msg.content["arrays"])
    backbone = sync(_backbone(context, cfg), payload, int(msg.content["backbone"]["version"]), ServerStep.of(cfg))
    _store(context, backbone)
    metrics = {"num-examples": len(data), VERSION_KEY: backbone.version, "base-checksum": checksum(backbone.base)}
    if len(data):
        model = _model(cfg)
        load(model, backbone.base, global_dense(payload))
        result = evaluate_model(model, data, task_info(cfg.dataset), device=pick_device(cfg.device),
                                inputs=Inputs.of(cfg), precision=cfg.precision)
        metrics |= {"val_loss": result.loss, "val_accuracy": result.accuracy}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@lru_cache(maxsize=4)
def _model(cfg: RunConfig) -> nn.Module:
    return build_merge_model(cfg, task_info(cfg.dataset)).to(pick_device(cfg.device))


@lru_cache(maxsize=4)
def _initial_base(cfg: RunConfig) -> State:
    """Version 0 of the backbone: every node builds the same seeded (or pretrained) init."""
    return snapshot(base_state(build_merge_model(cfg, task_info(cfg.dataset))))


def _backbone(context: Context, cfg: RunConfig) -> Backbone:
    if BASE_KEY not in context.state.array_records:
        return Backbone(_initial_base(cfg), 0)
    velocity = unpack(context.state[VELOCITY_KEY]) if VELOCITY_KEY in context.state.array_records else {}
    return Backbone(unpack(context.state[BASE_KEY]), int(context.state[SYNC_KEY]["version"]), velocity)


def _store(context: Context, backbone: Backbone) -> None:
    context.state[BASE_KEY] = pack(backbone.base)
    context.state[SYNC_KEY] = ConfigRecord({"version": backbone.version})
    if backbone.velocity:
        context.state[VELOCITY_KEY] = pack(backbone.velocity)
