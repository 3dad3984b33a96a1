"""The clipped (norm-bounded) mean: no client moves the model by more than its share of a bound.

Each client's delta is scaled by λ_k ∈ (0, 1] so that its effective update (``effective.py``:
s·B·A per LoRA layer, every other tensor as it is) has norm at most ``c`` (clip-norm; 0: the median
of the round's norms, which with n ≥ 2f + 1 replies of which at most f are Byzantine is no larger
than the largest honest client's norm), then the example-weighted mean is taken. A LoRA layer's update is not linear in
the factor deltas, so λ_k is found by bisection on ‖v_k(λ)‖ (``Geometry.norms``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import Delta, RuleSettings, check_replies, register_aggregator
from .effective import Geometry, geometry, scaled
from .mean import weighted_mean

log = logging.getLogger(__name__)


def clip_factors(geo: Geometry, bound: float, steps: int = 60) -> torch.Tensor:
    """(n,) λ_k: 1 where ‖v_k‖ <= bound, else a λ in [0, 1) with ‖v_k(λ)‖ <= bound, within 2⁻⁶⁰ of
    a λ where ‖v_k(λ)‖ crosses the bound (bisection from ‖v_k(0)‖ = 0 <= bound < ‖v_k(1)‖)."""
    over = geo.norms() > bound
    low, high = torch.zeros(len(over), dtype=torch.float64), torch.ones(len(over), dtype=torch.float64)
    for _ in range(steps):
        mid = (low + high) / 2
        ok = geo.norms(mid) <= bound
        low, high = torch.where(ok, mid, low), torch.where(ok, high, mid)
    return torch.where(over, low, torch.ones_like(low))


@register_aggregator("clipped-mean", robust=True, min_replies=lambda s: 1 if s.clip_norm else 2 * s.byzantine + 1,
                     help="example-weighted mean after scaling each client's delta so that its effective update "
                          "(s·B·A per LoRA layer, other tensors as they are) has norm <= clip-norm (0: the round's "
                          "median norm; then needs n >= 2f+1)")
def clipped_mean(deltas: Sequence[Delta], weights: Sequence[float], *, settings: RuleSettings = RuleSettings(),
                 global_state: Delta | None = None) -> Delta:
    """Example-weighted mean of the clipped deltas; the bound is clip-norm, or the median norm."""
    if not settings.clip_norm:
        f = settings.byzantine
        check_replies("clipped-mean", len(deltas), 2 * f + 1, f"the median norm as bound: n >= 2·robust-f + 1, "
                                                             f"robust-f={f}; or set clip-norm > 0")
    geo = geometry(deltas, global_state, settings.lora_scaling, "clipped-mean")
    bound = settings.clip_norm or geo.norms().quantile(0.5).item()
    factors = clip_factors(geo, bound)
    log.info("clipped-mean: bound %.4g; norms %s; factors %s (in the order aggregated)", bound,
             [f"{v:.3g}" for v in geo.norms().tolist()], [f"{v:.3g}" for v in factors.tolist()])
    return weighted_mean([scaled(d, lam.item()) for d, lam in zip(deltas, factors)], weights)
