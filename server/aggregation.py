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
@register_aggregator("ffa")  # frozen-A LoRA: A never travels, so the mean of the B deltas is exact
def weighted_mean(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """Example-weighted mean per tensor. For LoRA this averages A and B separately, which is
    not the mean of the clients' B·A products (mean(B)·mean(A) has cross terms): see ``exact``."""
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


def _stack(deltas: Sequence[Delta], name: str) -> torch.Tensor:
    return torch.stack([d[name] for d in deltas])


@register_aggregator("median")
def coordinate_median(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """Coordinate-wise median (Yin et al. 2018), unweighted: one client's outlier cannot move it.
    With an even count it takes the mean of the two middle values."""
    return {name: _stack(deltas, name).quantile(0.5, dim=0) if deltas[0][name].is_floating_point()
            else deltas[0][name] for name in deltas[0]}


@register_aggregator("trimmed-mean")
def trimmed_mean(deltas: Sequence[Delta], weights: Sequence[float], trim: float = 0.2) -> Delta:
    """Coordinate-wise mean after dropping the ``trim`` share of largest and smallest values."""
    cut = int(trim * len(deltas))
    if len(deltas) - 2 * cut < 1:
        raise ValueError(f"trimming {cut} of {len(deltas)} values from each side leaves none")
    return {name: _stack(deltas, name).sort(dim=0).values[cut:len(deltas) - cut].mean(dim=0)
            for name in deltas[0]}


@register_aggregator("exact")
def stacked_product_mean(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """FLoRA's stacking: from each client's ``{layer}/B`` and ``{layer}/A`` (B_k·A_k = its change of
    that weight) make B = [w_1 B_1 | .. | w_K B_K] and A = [A_1; ..; A_K], so that B·A equals the
    example-weighted mean of the products exactly, for any mix of client ranks; the result has
    rank Σ r_k, so broadcasting it costs Σ r_k·(in+out) per layer. The server merges it into the
    backbone (server/lte.py), where a re-factorisation to a fixed rank would lose exactness.
    Other tensors get the weighted mean."""
    total = float(sum(weights))
    if not deltas or len(deltas) != len(weights) or total <= 0:
        raise ValueError(f"need one positive weight per delta, got {len(deltas)} deltas and {list(weights)}")
    factors = {name for name in deltas[0] if name.endswith(("/A", "/B"))}
    out = weighted_mean([{k: v for k, v in d.items() if k not in factors} for d in deltas], weights) \
        if len(factors) < len(deltas[0]) else {}
    for name in sorted(factors):
        if name.endswith("/B"):
            out[name] = torch.cat([d[name] * (w / total) for d, w in zip(deltas, weights)], 1)
        else:
            out[name] = torch.cat([d[name] for d in deltas], 0)
    return out
