"""Krum and Multi-Krum (Blanchard et al. 2017): keep the replies closest to their neighbours.

Each reply is scored by the summed squared distances of its effective update (``effective.py``:
s·B·A per LoRA layer, every other tensor as it is) to its n − f − 2 nearest others; with n ≥ 2f + 3
replies of which at most f are Byzantine, the best score belongs to a reply close to honest ones
however the f others are placed. Scores ignore the example counts (a client reports its own count,
so a Byzantine one could claim any).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from . import Delta, RuleSettings, check_replies, register_aggregator
from .effective import geometry
from .mean import weighted_mean

log = logging.getLogger(__name__)


def krum_scores(sq_dist: torch.Tensor, byzantine: int) -> torch.Tensor:
    """(n,) each reply's sum of squared distances to its n − f − 2 nearest other replies."""
    n = len(sq_dist)
    others = sq_dist.masked_fill(torch.eye(n, dtype=torch.bool), float("inf"))
    return others.sort(dim=1).values[:, : n - byzantine - 2].sum(1)


def select(deltas: Sequence[Delta], settings: RuleSettings, global_state: Delta | None, keep: int,
           rule: str) -> list[int]:
    """The ``keep`` best-scored replies, best first (ties: the earlier reply)."""
    f = settings.byzantine
    # krum keeps 1 (needs 2f+3); multi-krum keeps krum-m (also needs m+f): the need follows ``keep``
    check_replies(rule, len(deltas), max(2 * f + 3, keep + f), f"n >= 2·robust-f + 3 and n >= kept + robust-f, "
                  f"robust-f={f}")
    scores = krum_scores(geometry(deltas, global_state, settings.lora_scaling, rule).sq_dist, f)
    kept = sorted(range(len(deltas)), key=lambda i: (scores[i].item(), i))[:keep]
    log.info("%s kept replies %s of %d (in the order aggregated; scores %s)", rule, kept, len(deltas),
             [f"{v:.3g}" for v in scores.tolist()])
    return kept


def _need(settings: RuleSettings) -> int:
    return max(2 * settings.byzantine + 3, settings.krum_keep + settings.byzantine)


@register_aggregator("krum", robust=True, min_replies=lambda s: 2 * s.byzantine + 3,
                     help="the one reply whose effective update (s·B·A per LoRA layer, other tensors as they are) "
                          "is closest to its n-f-2 nearest others (f: robust-f; needs n >= 2f+3)")
def krum(deltas: Sequence[Delta], weights: Sequence[float], *, settings: RuleSettings = RuleSettings(),
         global_state: Delta | None = None) -> Delta:
    """The best-scored reply's delta, as it is."""
    best = select(deltas, settings, global_state, 1, "krum")[0]
    return {k: v.clone() for k, v in deltas[best].items()}


@register_aggregator("multi-krum", robust=True, min_replies=_need,
                     help="the example-weighted mean of the krum-m best-scored replies (0: n-f; krum's scores; "
                          "needs n >= 2f+3 and n >= m+f)")
def multi_krum(deltas: Sequence[Delta], weights: Sequence[float], *, settings: RuleSettings = RuleSettings(),
               global_state: Delta | None = None) -> Delta:
    """Example-weighted mean of the m best-scored replies' deltas (m = krum-m, or n − f)."""
    keep = settings.krum_keep or len(deltas) - settings.byzantine
    chosen = select(deltas, settings, global_state, keep, "multi-krum")
    return weighted_mean([deltas[i] for i in chosen], [weights[i] for i in chosen])
