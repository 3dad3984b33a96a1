"""The aggregation-rule registry: the one list of rules.

A rule is a function ``(deltas, weights) -> delta`` over dicts of tensors with identical names,
shapes and dtypes (the server has already rejected replies that differ), registered with
``@register_aggregator("name", help=...)`` in a module of this package; every module here is
imported below, so adding a rule is one new module. The run config's ``aggregation`` choices and
``--help`` come from this registry, and the flags declared at registration tell the rest of
fedmeld what a rule needs (LoRA, frozen A, a protocol, how many replies).

A rule registered with ``robust=True`` also takes two keywords: ``settings`` (the run's
``RuleSettings``: how many Byzantine clients it assumes, its clip bound, LoRA's scale), bound by
``Aggregator.configured``, and ``global_state`` (the global adapters the round's deltas apply to),
passed per round by the delta protocol, so it can score a LoRA layer by the update it makes to
the weight, s·((B+dB)(A+dA) − B·A), instead of by its factors (``effective.py``).

A rule registered with ``stateful=True`` remembers clients across rounds: it also takes ``clients``
(each reply's client, as the server identifies it: ``"partition 3"``) and ``memory`` (a dict of
JSON numbers it may update, owned by the protocol and kept in the checkpoint, so a resumed run
remembers what the uninterrupted one does).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Delta = dict[str, torch.Tensor]
AggregateFn = Callable[[Sequence[Delta], Sequence[float]], Delta]
PROTOCOLS = ("delta", "backbone-merge")


@dataclass(frozen=True)
class RuleSettings:
    """What robust rules assume and need beyond the deltas (run-config keys in brackets)."""

    byzantine: int = 1  # f (robust-f): replies per round that may be arbitrary
    clip_norm: float = 0.0  # clipped-mean's bound on a client's update norm (clip-norm); 0: the round's median
    krum_keep: int = 0  # multi-krum's m, the best-scored replies averaged (krum-m); 0: n − f
    lora_scaling: float = 1.0  # s of a LoRA layer's weight update s·B·A (lora-alpha / lora-rank)
    direction_z: float = 0.0  # direction-clipped-mean drops only outliers this many robust stds low (direction-z)
    direction_memory: float = 0.0  # direction-clipped-mean's weight of a client's past score (direction-memory)


@dataclass(frozen=True)
class Aggregator:
    """A registered rule and what the run config and the protocols must know about it."""

    name: str
    fn: AggregateFn
    help: str  # one line for --help
    protocol: str = "delta"  # delta: the global adapters += step(rule(deltas)); backbone-merge: see task/backbone_merge.py
    needs_lora: bool = False  # only defined for peft with lora
    freeze_lora_a: bool = False  # LoRA's A regenerated from the seed on every node and frozen; only B travels
    mixed_ranks: bool = False  # accepts client-ranks (LoRA factors of several ranks)
    robust: bool = False  # takes the keywords settings (RuleSettings) and global_state
    min_replies: Callable[[RuleSettings], int] | None = None  # fewest replies a round needs under its assumption
    stateful: bool = False  # remembers clients across rounds: takes the keywords clients and memory

    def __call__(self, deltas: Sequence[Delta], weights: Sequence[float], global_state: Delta | None = None,
                 clients: Sequence[str] | None = None, memory: dict[str, float] | None = None) -> Delta:
        """The rule on one round's deltas; ``global_state``: the global adapters they apply to
        (only robust rules read it, to score LoRA layers by s·B·A); ``clients``: who sent each delta,
        ``memory``: the rule's state from earlier rounds, updated in place (only stateful rules read them;
        without them a stateful rule sees this round alone)."""
        if self.stateful:
            return self.fn(deltas, weights, global_state=global_state, clients=clients, memory=memory)
        if self.robust:
            return self.fn(deltas, weights, global_state=global_state)
        return self.fn(deltas, weights)

    def configured(self, settings: RuleSettings) -> Aggregator:
        """This rule with the run's settings bound into ``fn`` (so that callers of ``fn`` get them too)."""
        if not self.robust:
            return self
        return dataclasses.replace(self, fn=functools.partial(self.fn, settings=settings))


AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(name: str, *, help: str, protocol: str = "delta", needs_lora: bool = False,
                        freeze_lora_a: bool = False, mixed_ranks: bool = False, robust: bool = False,
                        min_replies: Callable[[RuleSettings], int] | None = None, stateful: bool = False,
                        ) -> Callable[[AggregateFn], AggregateFn]:
    """Register ``fn`` as rule ``name`` (the run config's ``aggregation``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"aggregator {name!r}: protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")

    def register(fn: AggregateFn) -> AggregateFn:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is already registered (by {AGGREGATORS[name].fn.__module__})")
        if stateful and not robust:
            raise ValueError(f"aggregator {name!r}: stateful rules are robust ones (they take settings)")
        AGGREGATORS[name] = Aggregator(name, fn, help, protocol, needs_lora, freeze_lora_a, mixed_ranks, robust,
                                       min_replies, stateful)
        return fn

    return register


def stack(deltas: Sequence[Delta], name: str) -> torch.Tensor:
    """One tensor of all clients' ``name``, client first: what coordinate-wise rules work on."""
    return torch.stack([d[name] for d in deltas])


def check_replies(rule: str, n: int, need: int, assumption: str) -> None:
    """Refuse a round too small for the rule's assumption, naming the keys that set it."""
    if n < need:
        raise ValueError(f"aggregation={rule} needs at least {need} replies per round ({assumption}), got {n}: "
                         f"lower robust-f, or raise num-clients and min-clients to >= {need}")


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
