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
also outliers, more than z robust standard deviations below the round's median cosine), and the
clipped mean (bound: clip-norm, or the median norm of the replies kept) is taken over the rest,
example-weighted.

Many small honest clients agree only weakly (median cosines near 0), and then one round's cosines
cannot tell a sign-flipped reply from an honest one (2 attackers of 8 on BreastMNIST, H200
2026-12-02: from round 3 on, the rule dropped an honest client in most rounds and both attackers in
few). An attacker is against the others in every round, an honest client only by chance, so with
``direction-memory`` β > 0 a reply is scored by its client's discounted sum of median cosines, score
← β·score + cosine, over the rounds it took part in (β = 1: the plain sum, it never forgets; β < 1:
a round k rounds back counts β^k, so a client that turns bad late loses its credit within a few
rounds). Clients are who the server says sent a reply (the partition id a node declared at its first
contact, see server/strategy.py), and the scores are part of the checkpoint.

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


def remembered(cosines: torch.Tensor, clients: Sequence[str], memory: dict[str, float], beta: float) -> torch.Tensor:
    """(n,) each client's score β·(its previous score) + this round's median cosine; ``memory`` updated."""
    scores = torch.stack([beta * memory.get(c, 0.0) + cos for c, cos in zip(clients, cosines)])
    memory.update({c: s.item() for c, s in zip(clients, scores)})
    return scores


@register_aggregator("direction-clipped-mean", robust=True, stateful=True,
                     min_replies=lambda s: 2 * s.byzantine + 2,
                     help="clipped-mean after dropping up to robust-f replies whose effective update points against "
                          "the others (negative median cosine to the other replies, or with direction-memory its "
                          "client's discounted sum over rounds; direction-z: only outliers); bound: clip-norm, or "
                          "the kept replies' median norm (needs n >= 2f+2)")
def direction_clipped_mean(deltas: Sequence[Delta], weights: Sequence[float], *,
                           settings: RuleSettings = RuleSettings(), global_state: Delta | None = None,
                           clients: Sequence[str] | None = None, memory: dict[str, float] | None = None) -> Delta:
    """Example-weighted mean of the kept replies, each clipped to the bound."""
    f = settings.byzantine
    check_replies("direction-clipped-mean", len(deltas), 2 * f + 2,
                  f"a median cosine over mostly honest others: n >= 2·robust-f + 2, robust-f={f}")
    geo = geometry(deltas, global_state, settings.lora_scaling, "direction-clipped-mean")
    cosines = median_cosines(geo)
    if clients is not None and len(set(clients)) != len(deltas):
        raise ValueError(f"direction-clipped-mean: one client per reply, got {len(deltas)} replies from {list(clients)}")
    scores = remembered(cosines, clients or [str(i) for i in range(len(deltas))],
                        {} if memory is None else memory, settings.direction_memory)
    dropped = against(scores, f, settings.direction_z)
    kept = [i for i in range(len(deltas)) if i not in dropped]
    norms = geo.norms()
    bound = settings.clip_norm or norms[kept].quantile(0.5).item()
    factors = clip_factors(geo, bound)
    log.info("direction-clipped-mean: clients %s; median cosines %s; scores %s; dropped %s; bound %.4g; factors %s",
             list(clients or []), [f"{c:.3g}" for c in cosines.tolist()], [f"{c:.3g}" for c in scores.tolist()],
             dropped, bound, [f"{v:.3g}" for v in factors.tolist()])
    return weighted_mean([scaled(deltas[i], factors[i].item()) for i in kept], [weights[i] for i in kept])
