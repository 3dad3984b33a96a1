"""Exact LoRA aggregation (FLoRA's stacking): the mean of the clients' B·A products, merged into the
backbone by the backbone-merge protocol (task/backbone_merge.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import Delta, register_aggregator
from .mean import weighted_mean


@register_aggregator("exact", protocol="backbone-merge", needs_lora=True, mixed_ranks=True,
                     help="the example-weighted mean of the clients' s·B·A products, merged into the backbone; "
                          "clients re-initialise LoRA each round (FLoRA-style); mixed client-ranks are exact")
def stacked_product_mean(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """FLoRA's stacking: from each client's ``{layer}/B`` and ``{layer}/A`` (B_k·A_k = its change of
    that weight) make B = [w_1 B_1 | .. | w_K B_K] and A = [A_1; ..; A_K], so that B·A equals the
    example-weighted mean of the products exactly, for any mix of client ranks; the result has
    rank Σ r_k, so broadcasting it costs Σ r_k·(in+out) per layer. The server merges it into the
    backbone, where a re-factorisation to a fixed rank would lose exactness.
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
