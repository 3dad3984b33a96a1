"""The direction-checked clipped mean: drop replies that point against the others, clip the rest.

A norm bound alone (``clipped.py``) caps how far a reply moves the model, not where: a sign-flipped
reply clipped to an honest norm still moves it every round (the drill table's sign flip ×5 column:
clipped mean 7–10 points below clean fedavg). Here each reply k is first scored by the median, over the other
replies j, of the cosine between the first-order parts of their effective updates (``effective.py``:
u = s·(dB·A + B·dA) per LoRA layer, every other trained tensor as it is; BatchNorm statistics left
out). The first-order part is the direction a reply moves the weights in, and it flips with the
deltas; the second-order s·dB·dA does not (a reply of −k·dA, −k·dB makes −k·u + k²·w), so a
sign-flipped reply's whole update need not point against the others. With at most
f Byzantine replies among n >= 2f + 2, a reply's n − 1 others are mostly honest, so an honest
reply's median cosine is the cosine to a typical honest client, positive when honest clients agree
(IID data); a reply that points against them (sign flip) has a negative one. Up to f replies with a
negative median cosine are dropped, most negative first (with ``direction-z`` > 0 only those that are
also outliers, more than z robust standard deviations below the round's median cosine), and the clipped mean (bound: clip-norm, or
the median norm of the replies kept) is taken over the rest, example-weighted.

What it assumes: honest clients' updates agree in direction (cosine > 0 to a typical other honest
client). Under strong label skew honest clients may disagree; then at most f of them are dropped,
as the Byzantine budget allows, and the norm bound still holds for every reply kept.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import Delta, RuleSettings, check_replies, register_aggregator
from .clipped import clip_factors
from .effective import Geometry, geometry, scaled
from .mean import weighted_mean

log = logging.getLogger(__name__)


def median_cosines(geo: Geometry) -> torch.Tensor:
    """(n,) each reply's median cosine (first-order updates u) to the other replies, over what training
    changes (``Geometry.first_gram`` leaves BatchNorm statistics out: running variances travel honest even
    from an attacker, see task/attacks.py, and their large shared part would pull every cosine to theirs)."""
    norms = geo.first_gram.diagonal().clamp_min(0).sqrt()
    cos = geo.first_gram / (norms[:, None] * norms[None, :]).clamp_min(torch.finfo(torch.float64).tiny)
    n = len(cos)
    others = cos[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)
    return others.quantile(0.5, dim=1)


def against(cosines: torch.Tensor, byzantine: int, z: float = 0.0) -> list[int]:
    """The replies to drop: at most ``byzantine``, most negative first, each with a median cosine below 0 and,
    with ``z`` > 0, also below median − z·1.4826·MAD of the round's median cosines (an outlier: many small
    honest clients agree weakly, cosines near 0 of either sign, and a plain sign test drops some of them)."""
    threshold = 0.0
    if z > 0:
        centre = cosines.median()
        threshold = min(0.0, (centre - z * 1.4826 * (cosines - centre).abs().median()).item())
    order = sorted(range(len(cosines)), key=lambda i: (cosines[i].item(), i))
    return sorted(i for i in order[:byzantine] if cosines[i] < threshold)


@register_aggregator("direction-clipped-mean", robust=True,
                     min_replies=lambda s: 2 * s.byzantine + 2,
                     help="clipped-mean after dropping up to robust-f replies whose effective update points against "
                          "the others (negative median cosine to the other replies; direction-z: only outliers); "
                          "bound: clip-norm, or the kept "
                          "replies' median norm (needs n >= 2f+2)")
def direction_clipped_mean(deltas: Sequence[Delta], weights: Sequence[float], *,
                           settings: RuleSettings = RuleSettings(), global_state: Delta | None = None) -> Delta:
    """Example-weighted mean of the kept replies, each clipped to the bound."""
    f = settings.byzantine
    check_replies("direction-clipped-mean", len(deltas), 2 * f + 2,
                  f"a median cosine over mostly honest others: n >= 2·robust-f + 2, robust-f={f}")
    geo = geometry(deltas, global_state, settings.lora_scaling, "direction-clipped-mean")
    cosines = median_cosines(geo)
    dropped = against(cosines, f, settings.direction_z)
    kept = [i for i in range(len(deltas)) if i not in dropped]
    norms = geo.norms()
    bound = settings.clip_norm or norms[kept].quantile(0.5).item()
    factors = clip_factors(geo, bound)
    log.info("direction-clipped-mean: median cosines %s; dropped %s; bound %.4g; factors %s",
             [f"{c:.3g}" for c in cosines.tolist()], dropped, bound, [f"{v:.3g}" for v in factors.tolist()])
    return weighted_mean([scaled(deltas[i], factors[i].item()) for i in kept], [weights[i] for i in kept])
