"""The delta protocol on a client: load the global adapters, train, reply with local − global."""

from __future__ import annotations

from functools import lru_cache

from flwr.app import Context, Message, MetricRecord, RecordDict
from torch import Tensor, nn

from fedmeld.peft import adapter_state, load_adapter_state, resize_ranks
from fedmeld.task.config import RunConfig
from fedmeld.task.data import Split, task_info
from fedmeld.task.engine import Inputs, pick_device
from fedmeld.task.engine import evaluate as evaluate_model
from fedmeld.task.engine import train as train_model
from fedmeld.task.model import build_model, is_local, make_optimizer
from fedmeld.task.schedule import lr_at
from fedmeld.task.wire import pack, payload_bytes, unpack

LOCAL_KEY = "fedmeld.local-params"  # this node's own tensors, kept in Flower's per-node context.state


def train(msg: Message, context: Context, cfg: RunConfig, data: Split, seed: int) -> Message:
    global_state = _global_state(msg, cfg)
    model = _load_model(cfg, global_state, context)
    server_round = int(msg.content["config"]["server-round"])
    stats = train_model(model, data, task_info(cfg.dataset), epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                        lr=cfg.lr, weight_decay=cfg.weight_decay, device=pick_device(cfg.device),
                        inputs=Inputs.of(cfg), seed=seed, prox_mu=cfg.proximal_mu,
                        optimizer=make_optimizer(model, cfg), lr_at=lambda epoch: lr_at(cfg, server_round, epoch),
                        precision=cfg.precision, compile_mode=cfg.compile)
    state = {k: v.cpu() for k, v in adapter_state(model).items()}
    if cfg.local_params:
        context.state[LOCAL_KEY] = pack({k: v for k, v in state.items() if is_local(k, cfg)})
    arrays = pack({k: state[k] - global_state[k] for k in global_state})
    metrics = MetricRecord({"num-examples": len(data), **stats, "bytes_sent": payload_bytes(arrays)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def evaluate(msg: Message, context: Context, cfg: RunConfig, data: Split) -> Message:
    if not len(data):  # a tiny skewed shard can leave nothing to validate on: say so, don't fail
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    result = evaluate_model(_load_model(cfg, _global_state(msg, cfg), context), data, task_info(cfg.dataset),
                            device=pick_device(cfg.device), inputs=Inputs.of(cfg), precision=cfg.precision)
    metrics = MetricRecord({"num-examples": len(data), "val_loss": result.loss, "val_accuracy": result.accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _load_model(cfg: RunConfig, global_state: dict[str, Tensor], context: Context) -> nn.Module:
    """The cached model loaded with this round's state: the global tensors, plus this client's own
    local-params (its initial values before its first round)."""
    model, initial = _model(cfg)
    own = unpack(context.state[LOCAL_KEY]) if LOCAL_KEY in context.state else {}
    local = {k: own.get(k, v) for k, v in initial.items() if is_local(k, cfg)}
    load_adapter_state(model, {**local, **global_state})
    return model


def _global_state(msg: Message, cfg: RunConfig) -> dict[str, Tensor]:
    """The message's global adapter state; under client-ranks, LoRA factors cut to this client's rank."""
    return resize_ranks(unpack(msg.content["arrays"]), _model(cfg)[1])


@lru_cache(maxsize=4)
def _model(cfg: RunConfig) -> tuple[nn.Module, dict[str, Tensor]]:
    """One model per process and run, with its initial adapter state: rounds only swap state."""
    model = build_model(cfg, task_info(cfg.dataset)).to(pick_device(cfg.device))
    return model, {k: v.cpu() for k, v in adapter_state(model).items()}
