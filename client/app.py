"""The fedmeld ClientApp: a hospital that trains on its private shard and replies with updates.

The same app runs in simulation and deployment: it learns which shard it holds from the node
config (``partition-id``, ``num-partitions``), which the simulation sets per virtual node and a
SuperNode takes from ``--node-config``. What to train comes from the server with every
instruction (the run config), where the data lives from the node. The run's protocol
(``RunConfig.protocol``) decides what a round does: ``client/delta.py`` or
``client/backbone_merge.py``. Models and shards are built once per process and reused across
rounds; every message carries the full global state, so nothing stale survives between rounds.
A partition listed in the run config's ``attackers`` runs its ``attack`` (``task/attacks.py``): it
trains on poisoned data, or replaces its honest reply's delta, so that drills need no other code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmeld.client import backbone_merge, delta
from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.data import Split, load_split, task_info
from fedmeld.task.partition import partition, train_val_split
from fedmeld.task.privacy import DPSettings
from fedmeld.task.wire import pack, unpack

app = ClientApp()
NODE_KEYS = ("data-root", "device")  # node-config keys that override the server's run config
PROTOCOLS = {"delta": delta, "backbone-merge": backbone_merge}


@dataclass(frozen=True)
class Shard:
    train: Split
    val: Split


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    cfg = run_config(msg, context)
    shard = load_shard(cfg, _partition_id(context), _num_partitions(context))
    seed = cfg.seed * 100_003 + int(msg.content["config"].get("server-round", 0)) * 1_009 + _partition_id(context)
    attack = cfg.attack_of(_partition_id(context))  # a drill (attack, attackers): this partition is poisoned
    data = attack.on_data(shard.train, task_info(cfg.dataset)) if attack else shard.train
    reply = PROTOCOLS[cfg.protocol].train(msg, context, cfg, data, seed)
    if attack and attack.kind == "update":  # the honest delta, replaced on its way to the wire
        reply.content["arrays"] = pack(attack.on_update(unpack(reply.content["arrays"]), cfg.attack_scale, seed))
    reply.content["metrics"]["partition-id"] = _partition_id(context)  # the server aggregates in this order
    return reply


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """The global model (with this client's own local-params) on its local validation split."""
    cfg = run_config(msg, context)
    shard = load_shard(cfg, _partition_id(context), _num_partitions(context))
    reply = PROTOCOLS[cfg.protocol].evaluate(msg, context, cfg, shard.val)
    reply.content["metrics"]["partition-id"] = _partition_id(context)  # the server averages in this order
    return reply


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Which shard this node holds, of how many. Node ids differ from run to run (simulation and
    deployment draw them), partitions do not: the server samples and orders clients by partition,
    and refuses a federation whose partition count is not its num-clients. Under DP-SGD the query
    carries the run config and the node also declares its per-round DP plan (sample rate, steps,
    noise multiplier, from its shard's size), which the server's budget check needs before round 1."""
    held = {"partition-id": _partition_id(context), "num-partitions": _num_partitions(context)}
    if "config" in msg.content.config_records:
        cfg = run_config(msg, context)
        settings = DPSettings.of(cfg)
        if settings is not None:
            shard = load_shard(cfg, _partition_id(context), _num_partitions(context))
            held |= settings.plan(len(shard.train), cfg.batch_size, cfg.local_epochs).metrics()
    return Message(RecordDict({"metrics": MetricRecord(held)}), reply_to=msg)


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


@lru_cache(maxsize=64)
def load_shard(cfg: RunConfig, partition_id: int, num_partitions: int) -> Shard:
    """This client's train and local validation split; same seed, same shard on every run."""
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    full = load_split(cfg.dataset, "train", cfg.image_size, cfg.data_root)
    parts = partition(full.labels.numpy(), num_partitions, cfg.partition, cfg.dirichlet_alpha, cfg.seed)
    train_idx, val_idx = train_val_split(parts[partition_id], cfg.val_fraction, cfg.seed + partition_id)
    return Shard(full.subset(train_idx), full.subset(val_idx))
