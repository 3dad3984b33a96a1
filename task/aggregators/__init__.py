"""The aggregation-rule registry: the one list of rules.

A rule is a function ``(deltas, weights) -> delta`` over dicts of tensors with identical names,
shapes and dtypes (the server has already rejected replies that differ), registered with
``@register_aggregator("name", help=...)`` in a module of this package; every module here is
imported below, so adding a rule is one new module. The run config's ``aggregation`` choices and
``--help`` come from this registry, and the flags declared at registration tell the rest of
fedmeld what a rule needs (LoRA, frozen A, a protocol).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Delta = dict[str, torch.Tensor]
AggregateFn = Callable[[Sequence[Delta], Sequence[float]], Delta]
PROTOCOLS = ("delta", "backbone-merge")


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

    def __call__(self, deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
        return self.fn(deltas, weights)


AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(name: str, *, help: str, protocol: str = "delta", needs_lora: bool = False,
                        freeze_lora_a: bool = False, mixed_ranks: bool = False) -> Callable[[AggregateFn], AggregateFn]:
    """Register ``fn`` as rule ``name`` (the run config's ``aggregation``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"aggregator {name!r}: protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")

    def register(fn: AggregateFn) -> AggregateFn:
        if name in AGGREGATORS:
            raise ValueError(f"aggregator {name!r} is already registered (by {AGGREGATORS[name].fn.__module__})")
        AGGREGATORS[name] = Aggregator(name, fn, help, protocol, needs_lora, freeze_lora_a, mixed_ranks)
        return fn

    return register


def stack(deltas: Sequence[Delta], name: str) -> torch.Tensor:
    """One tensor of all clients' ``name``, client first: what coordinate-wise rules work on."""
    return torch.stack([d[name] for d in deltas])


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
