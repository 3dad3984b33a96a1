"""The backbone-merge protocol, both halves, free of Flower so tests can drive it.

Two ways of training merge the clients' low-rank updates into the backbone itself instead of
averaging adapter deltas: LTE (``peft=lte``: H LoRA heads per layer, merged on a schedule, every
other parameter trains directly) and exact LoRA aggregation (``aggregation=exact``: one head of
the client's own rank on the LoRA targets, no local merge; FLoRA: clients re-initialise LoRA each
round, the server merges the mean of their s·B·A). Every node therefore keeps a replica of the
global backbone, and the tensors that train directly besides the heads (norm γ/β, biases, the
classifier, for LTE everything else) travel whole as deltas: the *dense* tensors.

One round on a client (``client_round``): bring its backbone to the server's version (apply the
missed updates' factors, or take a full base when the server sent one), load it and the global
dense tensors into the model, reset the heads, train, and reply with the heads' factors since the
reset (each wrapped weight's change as B·A, exact because resetless merges telescope) plus the
dense deltas. The client's backbone stays at the server's version: its own update comes back
inside the next broadcast, weighted like everyone else's.

On the server (``BackboneMergeServer``): each reply holds, per wrapped layer, factors
(B_k, A_k). The ``exact`` rule stacks them with the example weights folded into B,
B = [w_1 B_1 | .. | w_K B_K], A = [A_1; ..; A_K], so B·A is exactly the example-weighted mean of
the clients' changes, of rank <= Σ ranks. That pair is update v of the backbone; server and
clients apply it with the same function (``sync``). Dense deltas are combined by the run's rule
when it is a delta rule (fedavg: the weighted mean), else by the weighted mean.

Server momentum (``server-optimizer=momentum``, FedAvgM on the merged updates): a decaying sum of
every past update has full rank and cannot travel as factors, so every node replicates it. Update v
is still the factors U_v = B·A; each node keeps a velocity per wrapped weight and applies
M ← β·M + U_v, W ← W + lr·M (``ServerStep``), the same operations in the same order as the server.
A catch-up with the whole backbone carries the velocities too ("velocity/..." keys). The dense
tensors live on the server alone and take the server optimizer's step as delta rules do.

Catch-up rule: the server keeps every update and, per node, the version the node last reported.
A node that is behind (it joined late or missed rounds) gets all the updates it missed, unless
those weigh more bytes than the backbone; then it gets the backbone once ("base/..." keys). A new
node is at version 0: everyone builds the same seeded or pretrained init.

Message keys: ``base/{layer}.weight``, ``update/{v}/{layer}/B|A``, ``dense/{name}`` from the
server; ``factor/{layer}/B|A`` and ``dense/{name}`` from a client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from fedmeld.peft import ADAPTERS, apply_peft, default_target_modules
from fedmeld.peft.lte import inject_lte, lte_layers, dense_names, reset_lte
from fedmeld.peft.norm import bn_stats
from fedmeld.task.aggregators import AggregateFn
from fedmeld.task.aggregators.exact import stacked_product_mean
from fedmeld.task.aggregators.mean import weighted_mean
from fedmeld.task.config import RunConfig
from fedmeld.task.data import Split, TaskInfo
from fedmeld.task.lte import train_lte
from fedmeld.task.engine import cpu_rng
from fedmeld.task.model import build_model, create_backbone, peft_config
from fedmeld.task.wire import State, nbytes, snapshot

VERSION_KEY = "backbone-version"  # reply metric: the backbone version the client is at


def build_merge_model(cfg: RunConfig, info: TaskInfo) -> nn.Module:
    """LTE (an adapter that updates the backbone): the model its registration builds. Exact
    aggregation: peft's LoRA targets wrapped in one head of LTE's layers; besides them, what the
    rest of peft trains."""
    if any(ADAPTERS[p].updates_backbone for p in cfg.peft.split("+")):
        return build_model(cfg, info)
    patterns = [t.strip() for t in cfg.target_modules.split(",") if t.strip()] or None
    besides_lora = "+".join([*(p for p in cfg.peft.split("+") if p != "lora"), "head"])
    with cpu_rng(cfg.seed):  # as build_model: init draws from the global RNG, and clients may build in threads
        model = apply_peft(create_backbone(cfg, info), replace(peft_config(cfg), method=besides_lora))
        inject_lte(model, 1, cfg.lora_rank, cfg.lora_alpha, "resetless", patterns or default_target_modules(model),
                   train_rest=False)
    return model


def base_state(model: nn.Module) -> State:
    """The wrapped weights: the backbone that only ever changes by merged low-rank updates."""
    return {f"{name}.weight": layer.weight for name, layer in lte_layers(model).items()}


def dense_state(model: nn.Module) -> State:
    """Everything else that trains (plus BatchNorm statistics): small, shipped whole."""
    params = dict(model.named_parameters())
    return {name: params[name] for name in dense_names(model)} | bn_stats(model)


@torch.no_grad()
def load(model: nn.Module, base: State, dense: State) -> None:
    """Make the (shared, cached) model compute exactly base + dense: copy them in, reset the heads."""
    for k, v in base_state(model).items():
        v.copy_(base[k])
    for k, v in dense_state(model).items():
        v.copy_(dense[k])
    reset_lte(model)


@dataclass(frozen=True)
class ServerStep:
    """How merged update U moves the backbone: M ← momentum·M + U, W ← W + lr·M (momentum 0, lr 1: W += U)."""

    lr: float = 1.0
    momentum: float = 0.0

    @classmethod
    def of(cls, cfg: RunConfig) -> ServerStep:
        return cls(cfg.server_lr, cfg.server_beta1 if cfg.server_optimizer == "momentum" else 0.0)


@dataclass
class Backbone:
    """A node's copy of the global backbone (the wrapped weights), the server version it equals and,
    under server momentum, the velocity of every wrapped weight."""

    base: State
    version: int
    velocity: State = field(default_factory=dict)


class StaleBackbone(RuntimeError):
    """The broadcast does not reach back to this backbone's version; the server must send a full base."""


def sync(backbone: Backbone, payload: State, target: int, step: ServerStep = ServerStep()) -> Backbone:
    """Bring ``backbone`` to version ``target``: take a full base (and velocities), or apply each missed
    update (``update/{v}/{layer}/B`` and ``/A``, v = version + 1 .. target) with ``step``: weight += B @ A
    by default. Every update holds every wrapped layer (``BackboneMergeServer.aggregate``)."""
    if any(k.startswith("base/") for k in payload):
        return Backbone({k: v.clone() for k, v in global_base(payload).items()}, target,
                        {k: v.clone() for k, v in global_velocity(payload).items()})
    base = {k: v.clone() for k, v in backbone.base.items()}
    velocity = {k: v.clone() for k, v in backbone.velocity.items()}
    for v in range(backbone.version + 1, target + 1):
        prefix = f"update/{v}/"
        layers = {k[len(prefix):-2] for k in payload if k.startswith(prefix)}
        if not layers:
            raise StaleBackbone(f"backbone at version {backbone.version} needs update {v}, which was not sent")
        for layer in layers:
            w = base[f"{layer}.weight"]
            b, a = payload[f"{prefix}{layer}/B"], payload[f"{prefix}{layer}/A"]
            update = (b.to(w) @ a.flatten(1).to(b)).view_as(w)  # (out, in...) like the weight
            if step.momentum:  # M = β·M + B·A, then W += lr·M
                velocity_w = velocity.setdefault(f"{layer}.weight", torch.zeros_like(w))
                update = velocity_w.mul_(step.momentum).add_(update)
            w.add_(update, alpha=step.lr)
    return Backbone(base, target, velocity)


def global_base(payload: State) -> State:
    return {k[5:]: v for k, v in payload.items() if k.startswith("base/")}


def global_velocity(payload: State) -> State:
    return {k[9:]: v for k, v in payload.items() if k.startswith("velocity/")}


def global_dense(payload: State) -> State:
    return {k[6:]: v for k, v in payload.items() if k.startswith("dense/")}


def client_round(model: nn.Module, backbone: Backbone, payload: State, target: int, data: Split, info: TaskInfo,
                 cfg: RunConfig, device: torch.device, seed: int,
                 server_round: int = 1) -> tuple[Backbone, State, dict[str, float]]:
    """Sync, train, and return the synced backbone, the reply tensors and the training stats."""
    backbone = sync(backbone, payload, target, ServerStep.of(cfg))
    dense = global_dense(payload)
    load(model, backbone.base, dense)
    stats = train_lte(model.to(device), data, info, cfg, epochs=cfg.local_epochs, device=device, seed=seed,
                      server_round=server_round, merge=cfg.peft == "lte")
    reply = {f"factor/{name}/{k}": t.cpu() for name, layer in lte_layers(model).items()
             for k, t in zip("BA", layer.factors_since_reset())}
    reply |= {f"dense/{k}": v.detach().cpu() - dense[k] for k, v in dense_state(model).items()}
    return backbone, reply, stats


def checksum(base: State) -> float:
    """A fingerprint of a backbone, compared with the server's at every evaluation."""
    return float(sum(v.double().square().sum() for v in base.values()))


def dense_rule(cfg: RunConfig) -> AggregateFn:
    """How the dense deltas combine: the run's rule when it works on deltas, else the weighted mean."""
    return cfg.aggregator.fn if cfg.aggregator.protocol == "delta" else weighted_mean


class BackboneMergeServer:
    """The global backbone, its update history and the global dense tensors."""

    def __init__(self, base: State, dense: State, dense_rule: AggregateFn = weighted_mean,
                 step: ServerStep = ServerStep()) -> None:
        self.backbone = Backbone(snapshot(base), 0)
        self.dense = snapshot(dense)
        self.dense_rule = dense_rule
        self.step = step  # the backbone's server step, replicated on every node
        self.updates: dict[int, State] = {}  # version -> "update/{v}/{layer}/B|A" factors

    @property
    def version(self) -> int:
        return self.backbone.version

    def reply_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """The shape of every tensor a reply holds; ``None`` where the rank goes (it may differ
        between clients and, under reinit merges, between rounds)."""
        shapes: dict[str, tuple[int | None, ...]] = {}
        for key, w in self.backbone.base.items():
            layer = key.removesuffix(".weight")
            shapes[f"factor/{layer}/B"] = (w.shape[0], None)
            shapes[f"factor/{layer}/A"] = (None, *w.shape[1:])
        return shapes | {f"dense/{k}": tuple(v.shape) for k, v in self.dense.items()}

    def reply_dtypes(self) -> dict[str, torch.dtype]:
        dtypes = {f"factor/{k.removesuffix('.weight')}/{f}": w.dtype for k, w in self.backbone.base.items() for f in "BA"}
        return dtypes | {f"dense/{k}": v.dtype for k, v in self.dense.items()}

    def payload(self, node_version: int) -> tuple[State, int]:
        """What a node at ``node_version`` needs for the current version, and the catch-up bytes
        (anything beyond the latest update)."""
        needed = range(node_version + 1, self.version + 1)
        base = {f"base/{k}": v for k, v in self.backbone.base.items()} | \
            {f"velocity/{k}": v for k, v in self.backbone.velocity.items()}
        if all(n in self.updates for n in needed):
            missed = {k: v for n in needed for k, v in self.updates[n].items()}
            sync_part = base if nbytes(missed) > nbytes(base) else missed
        else:  # history not kept (a resumed server): the backbone itself
            sync_part = base
        latest = self.updates.get(self.version, {}) if node_version < self.version else {}
        state = sync_part | {f"dense/{k}": v for k, v in self.dense.items()}
        return state, nbytes(sync_part) - nbytes(latest)

    def aggregate(self, replies: Sequence[tuple[State, float]],
                  dense_step: Callable[[State], State] = lambda d: d) -> None:
        """Merge the example-weighted mean of the clients' B·A changes; combine the dense deltas and move
        them by ``dense_step`` (the server optimizer's, which lives on the server alone)."""
        version = self.version + 1
        weights = [w for _, w in replies]
        stacked = stacked_product_mean([{k[7:]: v for k, v in d.items() if k.startswith("factor/")}
                                        for d, _ in replies], weights)
        self.updates[version] = {f"update/{version}/{k}": v for k, v in stacked.items()}
        self.backbone = sync(self.backbone, self.updates[version], version, self.step)
        deltas = [{k[6:]: v for k, v in d.items() if k.startswith("dense/")} for d, _ in replies]
        step = dense_step(self.dense_rule(deltas, weights))
        self.dense = {k: (v + step[k]).to(v.dtype) for k, v in self.dense.items()}
