"""Aggregation rules: how client deltas become one global delta.

A rule is a function ``(deltas, weights) -> delta`` over dicts of tensors with identical names,
shapes and dtypes (the strategy has already rejected replies that differ). Add a rule by writing
one function here or in a module of its own and decorating it with ``@register_aggregator("name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Delta = dict[str, torch.Tensor]
Aggregator = Callable[[Sequence[Delta], Sequence[float]], Delta]
AGGREGATORS: dict[str, Aggregator] = {}


def register_aggregator(name: str) -> Callable[[Aggregator], Aggregator]:
    def register(fn: Aggregator) -> Aggregator:
        AGGREGATORS[name] = fn
        return fn

    return register


@register_aggregator("fedavg")
def weighted_mean(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """Example-weighted mean per tensor. For LoRA this averages A and B separately, which is
    not the mean of the clients' B·A products (exact rules arrive with their own modules)."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError(f"need one weight per delta, got {len(deltas)} deltas and {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {list(weights)}")
    return {
        name: sum((d[name].double() * (w / total) for d, w in zip(deltas, weights)),
                  torch.zeros((), dtype=torch.float64)).to(deltas[0][name].dtype)
        for name in deltas[0]
    }
