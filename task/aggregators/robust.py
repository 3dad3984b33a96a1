"""Coordinate-wise robust rules: one client's outlier cannot move them (they ignore the weights).

They work on the tensors as they travel, so for LoRA on A and B apart, not on the weight update
s·B·A (a coordinate-wise median of the updates would be a full-rank matrix that the delta protocol
cannot send back as factors); krum, multi-krum and clipped-mean score s·B·A.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import Delta, RuleSettings, check_replies, register_aggregator, stack


@register_aggregator("median", min_replies=lambda s: 2 * s.byzantine + 1,
                     help="coordinate-wise median, unweighted (needs n >= 2f+1, f: robust-f)")
def coordinate_median(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """Coordinate-wise median (Yin et al. 2018), unweighted: one client's outlier cannot move it.
    With an even count it takes the mean of the two middle values."""
    return {name: stack(deltas, name).quantile(0.5, dim=0) if deltas[0][name].is_floating_point()
            else deltas[0][name] for name in deltas[0]}


@register_aggregator("trimmed-mean", robust=True, min_replies=lambda s: 2 * s.byzantine + 1,
                     help="coordinate-wise mean after dropping the robust-f largest and smallest values, unweighted "
                          "(needs n >= 2f+1)")
def trimmed_mean(deltas: Sequence[Delta], weights: Sequence[float], *, settings: RuleSettings = RuleSettings(),
                 global_state: Delta | None = None) -> Delta:
    """Coordinate-wise mean after dropping the f = robust-f largest and smallest values (Yin et
    al. 2018): f Byzantine values can sit only inside the honest range."""
    cut = settings.byzantine
    check_replies("trimmed-mean", len(deltas), 2 * cut + 1, f"n >= 2·robust-f + 1, robust-f={cut}")
    return {name: stack(deltas, name).sort(dim=0).values[cut:len(deltas) - cut].mean(dim=0)
            if deltas[0][name].is_floating_point() else deltas[0][name] for name in deltas[0]}
