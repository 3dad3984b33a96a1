"""The example-weighted mean: FedAvg, and frozen-A LoRA (FFA-LoRA) whose mean is exact."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import Delta, register_aggregator


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


register_aggregator("fedavg", mixed_ranks=True,
                    help="example-weighted mean of the deltas; for LoRA of A and B separately, which is NOT the mean "
                         "of the B·A products; client-ranks are zero-padded (HetLoRA)")(weighted_mean)
register_aggregator("ffa", needs_lora=True, freeze_lora_a=True,
                    help="frozen-A LoRA: A regenerated from seed on every node, only B trains and travels, so the "
                         "mean is exact")(weighted_mean)
