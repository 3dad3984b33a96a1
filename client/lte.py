"""The client side of LTE and of exact LoRA aggregation: train LoRA heads on local data, and keep
a replica of the global backbone in sync from broadcast low-rank factors.

Both protocols merge the clients' low-rank updates into the backbone itself. LTE (``peft=lte``)
trains H heads on micro-batches and merges them on a schedule, with every other parameter as a
replica. Exact aggregation (``aggregation=exact`` with ``peft=lora[+norm|+bitfit]``) is the same
protocol with one head of the client's own rank on the LoRA targets and no local merge (FLoRA:
clients re-initialise LoRA each round, the server merges the mean of their s·B·A); the replicas
are exactly what ``peft`` trains besides LoRA (norm γ/β, biases, the head).

One round on a client (``client_round``): bring the replica up to the server's version (apply the
missed updates' factors, or take a full base when the server sent one), load it and the global
replicas into the model, reset the heads, train ``local-epochs`` with a resetless or reinit merge
every ``lte-merge-every`` optimizer steps, and reply with the heads' factors since the reset (the
local change of every wrapped weight as B·A, exact because resetless merges telescope) plus the
replicas' deltas. The replica itself stays at the server's version: the client's own update comes
back inside the next broadcast, weighted like everyone else's.

With ``num-clients=1`` this is plain centralized LTE training with an evaluation per round.
The model is cached per process and shared by the clients a process hosts, so a client's replica
lives in its ``context.state`` and is loaded into the model at every message.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from client.config import ConfigError, RunConfig
from client.data import Split, TaskInfo, task_info
from client.engine import evaluate, pick_device, train
from client.model import create_backbone, peft_config
from client.wire import pack, payload_bytes, unpack
from peft import apply_peft, default_target_modules
from peft.lte import inject_lte, lte_layers, merge_lte, replica_names, reset_lte
from peft.norm import bn_stats, freeze_bn_stats

State = dict[str, Tensor]


@register_model
def vit_pico_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A ViT small enough to train from scratch on a CPU: 28-px input in 4-px patches (49 tokens),
    width 64, depth 4. Registered with timm, so ``model=vit_pico_patch4_28`` works in any run."""
    args = dict(img_size=28, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"classifier": "head"}
    return build_model_with_cfg(VisionTransformer, "vit_pico_patch4_28", pretrained, **{**args, **kwargs})


@register_model
def vit_nano_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """vit_pico's GPU-sized sibling: 28-px input in 4-px patches, width 192 (vit_tiny's), depth 6.
    Wide enough that a few low-rank factors per layer weigh far less than the layer."""
    args = dict(img_size=28, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"classifier": "head"}
    return build_model_with_cfg(VisionTransformer, "vit_nano_patch4_28", pretrained, **{**args, **kwargs})


def heads(cfg: RunConfig) -> int:
    """LoRA heads per wrapped layer: lte-heads for LTE, one for exact aggregation."""
    return cfg.lte_heads if cfg.peft == "lte" else 1


def check_config(cfg: RunConfig) -> None:
    if cfg.batch_size % heads(cfg):
        raise ConfigError(f"batch-size {cfg.batch_size} must be divisible by lte-heads {cfg.lte_heads}: "
                          f"each head trains on an equal micro-batch")


def build_lte_model(cfg: RunConfig, info: TaskInfo) -> nn.Module:
    """LTE: every Linear/Conv2d (or ``target-modules``) wrapped in H heads, everything else trains.
    Exact aggregation: peft's LoRA targets in one head; besides them, what peft trains."""
    check_config(cfg)
    patterns = [t.strip() for t in cfg.target_modules.split(",") if t.strip()] or None
    if cfg.peft == "lte":
        model = create_backbone(cfg, info)
        inject_lte(model, cfg.lte_heads, cfg.lora_rank, cfg.lora_alpha, cfg.lte_merge_mode, patterns)
        if cfg.bn_stats == "frozen":
            freeze_bn_stats(model)
        return model
    besides_lora = "+".join([*(p for p in cfg.peft.split("+") if p != "lora"), "head"])
    model = apply_peft(create_backbone(cfg, info), replace(peft_config(cfg), method=besides_lora))
    inject_lte(model, 1, cfg.lora_rank, cfg.lora_alpha, "resetless", patterns or default_target_modules(model),
               train_rest=False)
    return model


def base_state(model: nn.Module) -> State:
    """The wrapped weights: the backbone that only ever changes by merged low-rank updates."""
    return {f"{name}.weight": layer.weight for name, layer in lte_layers(model).items()}


def replica_state(model: nn.Module) -> State:
    """Everything else that trains (plus BatchNorm statistics): small, shipped in full."""
    params = dict(model.named_parameters())
    state = {name: params[name] for name in replica_names(model)}
    return state | bn_stats(model)


def snapshot(state: State) -> State:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


@torch.no_grad()
def load(model: nn.Module, base: State, replicas: State) -> None:
    """Make the (shared, cached) model compute exactly base + replicas: copy them in, reset the heads."""
    for k, v in base_state(model).items():
        v.copy_(base[k])
    for k, v in replica_state(model).items():
        v.copy_(replicas[k])
    reset_lte(model)


def for_heads(data: Split, batch_size: int, heads: int) -> Split:
    """Drop the few samples that would leave a last batch not divisible by the heads."""
    extra = (len(data) % batch_size) % heads
    return data.subset(range(len(data) - extra)) if extra else data


@contextmanager
def merge_every(model: nn.Module, steps: int) -> Iterator[None]:
    """Merge the heads before every ``steps``-th training forward pass after the first, i.e.
    right after each ``steps``-th optimizer step, without a hook in the training loop."""
    count = 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal count
        if module.training:
            if count and count % steps == 0:
                merge_lte(module)
            count += 1

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def train_lte(model: nn.Module, data: Split, info: TaskInfo, cfg: RunConfig, *, epochs: int,
              device: torch.device, seed: int, reset: bool = True, merge: bool = True) -> dict[str, float]:
    """client.engine.train through the heads, merging on the schedule and once at the end.
    ``reset`` re-draws the heads first; ``merge=False`` never merges (a plain multi-head LoRA)."""
    if reset:
        reset_lte(model, torch.Generator().manual_seed(seed))
    data = for_heads(data, cfg.batch_size, heads(cfg))
    schedule = merge_every(model, cfg.lte_merge_every) if merge else _no_merge()
    with schedule:
        stats = train(model, data, info, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, device=device, seed=seed, input_size=cfg.input_size)
    if merge:
        merge_lte(model)
    return stats


@contextmanager
def _no_merge() -> Iterator[None]:
    yield


# --- the federated protocol, free of Flower so tests can drive it ---------------------------------

@dataclass
class Replica:
    """A client's copy of the global backbone and the server version it equals."""

    base: State
    version: int


class StaleReplica(RuntimeError):
    """The broadcast does not reach back to this replica's version; the server must send a full base."""


def sync(replica: Replica, payload: State, target: int) -> Replica:
    """Bring ``replica`` to version ``target``: take a full base, or apply each missed update
    (``update/{v}/{layer}/B`` and ``/A``, v = version + 1 .. target) as weight += B @ A."""
    if any(k.startswith("base/") for k in payload):
        return Replica({k[5:]: v.clone() for k, v in payload.items() if k.startswith("base/")}, target)
    base = {k: v.clone() for k, v in replica.base.items()}
    for v in range(replica.version + 1, target + 1):
        prefix = f"update/{v}/"
        layers = {k[len(prefix):-2] for k in payload if k.startswith(prefix)}
        if not layers:
            raise StaleReplica(f"replica at version {replica.version} needs update {v}, which was not sent")
        for layer in layers:
            b, a = payload[f"{prefix}{layer}/B"], payload[f"{prefix}{layer}/A"]
            base[f"{layer}.weight"] += (b.to(base[f"{layer}.weight"]) @ a.flatten(1).to(b)).view_as(base[f"{layer}.weight"])
    return Replica(base, target)


def global_replicas(payload: State) -> State:
    return {k[8:]: v for k, v in payload.items() if k.startswith("replica/")}


def client_round(model: nn.Module, replica: Replica, payload: State, target: int, data: Split, info: TaskInfo,
                 cfg: RunConfig, device: torch.device, seed: int) -> tuple[Replica, State, dict[str, float]]:
    """Sync, train, and return the synced replica, the reply tensors and the training stats."""
    replica = sync(replica, payload, target)
    replicas = global_replicas(payload)
    load(model, replica.base, replicas)
    stats = train_lte(model.to(device), data, info, cfg, epochs=cfg.local_epochs, device=device, seed=seed,
                      merge=cfg.peft == "lte")
    reply = {f"factor/{name}/{k}": t.cpu() for name, layer in lte_layers(model).items()
             for k, t in zip("BA", layer.factors_since_reset())}
    reply |= {f"replica/{k}": v.detach().cpu() - replicas[k] for k, v in replica_state(model).items()}
    return replica, reply, stats


def checksum(base: State) -> float:
    """A fingerprint of a backbone replica, compared with the server's at every evaluation."""
    return float(sum(v.double().square().sum() for v in base.values()))


# --- Flower handlers (client/app.py dispatches peft=lte here) --------------------------------------

@lru_cache(maxsize=4)
def _model(cfg: RunConfig) -> nn.Module:
    return build_lte_model(cfg, task_info(cfg.dataset)).to(pick_device(cfg.device))


@lru_cache(maxsize=4)
def _initial_base(cfg: RunConfig) -> State:
    """Version 0 of the backbone: every node builds the same seeded (or pretrained) init."""
    return snapshot(base_state(build_lte_model(cfg, task_info(cfg.dataset))))


def _replica(context: Context, cfg: RunConfig) -> Replica:
    if "lte-base" not in context.state.array_records:
        return Replica(_initial_base(cfg), 0)
    base = unpack(context.state["lte-base"])
    return Replica(base, int(context.state["lte-sync"]["version"]))


def _store(context: Context, replica: Replica) -> None:
    context.state["lte-base"] = pack(replica.base)
    context.state["lte-sync"] = ConfigRecord({"version": replica.version})


def handle_train(msg: Message, context: Context, cfg: RunConfig, data: Split, seed: int) -> Message:
    payload = unpack(msg.content["arrays"])
    target = int(msg.content["lte"]["version"])
    device = pick_device(cfg.device)
    replica, reply, stats = client_round(_model(cfg), _replica(context, cfg), payload, target, data,
                                         task_info(cfg.dataset), cfg, device, seed)
    _store(context, replica)
    arrays = pack(reply)
    metrics = MetricRecord({"num-examples": len(data), **stats, "lte-version": replica.version,
                            "bytes_sent": payload_bytes(arrays)})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


def handle_evaluate(msg: Message, context: Context, cfg: RunConfig, data: Split) -> Message:
    """Sync to the round's global model (so every replica matches the server's), then evaluate it
    on the local validation split when there is one."""
    payload = unpack(msg.content["arrays"])
    replica = sync(_replica(context, cfg), payload, int(msg.content["lte"]["version"]))
    _store(context, replica)
    metrics = {"num-examples": len(data), "lte-version": replica.version, "base-checksum": checksum(replica.base)}
    if len(data):
        model = _model(cfg)
        load(model, replica.base, global_replicas(payload))
        result = evaluate(model, data, task_info(cfg.dataset), device=pick_device(cfg.device),
                          input_size=cfg.input_size)
        metrics |= {"val_loss": result.loss, "val_accuracy": result.accuracy}
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
