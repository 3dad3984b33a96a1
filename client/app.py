"""The fedmeld ClientApp: a hospital that trains adapters on its private shard and sends deltas.

The same app runs in simulation and deployment: it learns which shard it holds from the node
config (``partition-id``, ``num-partitions``), which the simulation sets per virtual node and a
SuperNode takes from ``--node-config``. What to train comes from the server with every instruction (the run config), where the data
lives from the node. The model and the shard are built once per process and
reused across rounds; every message carries the full global adapter state, so nothing stale
survives from one round to the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from client import lte
from client.config import ConfigError, RunConfig
from client.data import Split, load_split, task_info
from client.engine import evaluate, pick_device, train
from client.model import build_model, is_local, make_optimizer
from client.partition import partition, train_val_split
from client.wire import pack, payload_bytes, unpack
from peft import adapter_state, load_adapter_state, resize_ranks

app = ClientApp()
NODE_KEYS = ("data-root", "device")
LOCAL_KEY = "fedmeld.local-params"  # this node's own tensors, kept in Flower's per-node context.state

@dataclass(frozen=True)
class Shard:
    train: Split
    val: Split


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    cfg = run_config(msg, context)
    shard = load_shard(cfg, _partition_id(context), _num_partitions(context))
    seed = cfg.seed * 100_003 + int(msg.content["config"].get("server-round", 0)) * 1_009 + _partition_id(context)
    if cfg.updates_backbone:  # LTE and exact aggregation keep a backbone replica per client: client/lte.py
        return lte.handle_train(msg, context, cfg, shard.train, seed)
    global_state = _global_state(msg, cfg)
    model = _load_model(cfg, global_state, context)
    stats = train(model, shard.train, task_info(cfg.dataset), epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                  lr=cfg.lr, weight_decay=cfg.weight_decay, device=pick_device(cfg.device), input_size=cfg.input_size,
                  seed=seed, prox_mu=cfg.proximal_mu, optimizer=make_optimizer(model, cfg))
    state = {k: v.cpu() for k, v in adapter_state(model).items()}
    if cfg.local_params:
        context.state[LOCAL_KEY] = pack({k: v for k, v in state.items() if is_local(k, cfg)})
    arrays = pack({k: state[k] - global_state[k] for k in global_state})
    metrics = MetricRecord({"num-examples": len(shard.train), **stats,
                            "bytes_sent": payload_bytes(arrays)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """The global adapters (with this client's own local-params) on its local validation split."""
    cfg = run_config(msg, context)
    shard = load_shard(cfg, _partition_id(context), _num_partitions(context))
    if cfg.updates_backbone:
        return lte.handle_evaluate(msg, context, cfg, shard.val)
    if not len(shard.val):  # a tiny skewed shard can leave nothing to validate on: say so, don't fail
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 0})}), reply_to=msg)
    result = evaluate(_load_model(cfg, _global_state(msg, cfg), context), shard.val, task_info(cfg.dataset),
                      device=pick_device(cfg.device), input_size=cfg.input_size)
    metrics = MetricRecord({"num-examples": len(shard.val), "val_loss": result.loss,
                            "val_accuracy": result.accuracy})
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


def run_config(msg: Message, context: Context) -> RunConfig:
    """The server's run config from the instruction, with this node's own data-root and device
    (from --node-config) where it sets them: a hospital knows where its files and GPUs are; under
    client-ranks, with this client's LoRA rank."""
    sent = {k: v for k, v in msg.content["config"].items() if k != "server-round"}
    local = {k: context.node_config[k] for k in NODE_KEYS if k in context.node_config}
    return RunConfig.from_mapping({**sent, **local}).for_client(_partition_id(context))


def _partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ConfigError("this node has no 'partition-id' in its node config; start the SuperNode with "
                          "--node-config 'partition-id=K num-partitions=N'") from None


def _num_partitions(context: Context) -> int:
    try:
        return int(context.node_config["num-partitions"])
    except KeyError:
        raise ConfigError("this node has no 'num-partitions' in its node config; start the SuperNode with "
                          "--node-config 'partition-id=K num-partitions=N'") from None


@lru_cache(maxsize=4)
def _model(cfg: RunConfig) -> tuple[nn.Module, dict[str, Tensor]]:
    """One model per process and run, with its initial adapter state: rounds only swap state."""
    model = build_model(cfg, task_info(cfg.dataset)).to(pick_device(cfg.device))
    return model, {k: v.cpu() for k, v in adapter_state(model).items()}


@lru_cache(maxsize=64)
def load_shard(cfg: RunConfig, partition_id: int, num_partitions: int) -> Shard:
    """This client's train and local validation split; same seed, same shard on every run."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    full = load_split(cfg.dataset, "train", cfg.image_size, cfg.data_root)
    parts = partition(full.labels.numpy(), num_partitions, cfg.partition, cfg.dirichlet_alpha, cfg.seed)
    train_idx, val_idx = train_val_split(parts[partition_id], cfg.val_fraction, cfg.seed + partition_id)
    return Shard(full.subset(train_idx), full.subset(val_idx))

