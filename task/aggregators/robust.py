"""Coordinate-wise robust rules: one client's outlier cannot move them (they ignore the weights)."""

from __future__ import annotations

from collections.abc import Sequence

from . import Delta, register_aggregator, stack


@register_aggregator("median", help="coordinate-wise median, unweighted")
def coordinate_median(deltas: Sequence[Delta], weights: Sequence[float]) -> Delta:
    """Coordinate-wise median (Yin et al. 2018), unweighted: one client's outlier cannot move it.
    With an even count it takes the mean of the two middle values."""
    return {name: stack(deltas, name).quantile(0.5, dim=0) if deltas[0][name].is_floating_point()
            else deltas[0][name] for name in deltas[0]}


@register_aggregator("trimmed-mean", help="coordinate-wise mean after dropping 20% of the values at each side")
def trimmed_mean(deltas: Sequence[Delta], weights: Sequence[float], trim: float = 0.2) -> Delta:
    """Coordinate-wise mean after dropping the ``trim`` share of largest and smallest values."""
    cut = int(trim * len(deltas))
    if len(deltas) - 2 * cut < 1:
        raise ValueError(f"trimming {cut} of {len(deltas)} values from each side leaves none")
    return {name: stack(deltas, name).sort(dim=0).values[cut:len(deltas) - cut].mean(dim=0)
            for name in deltas[0]}
