"""Learning-rate schedules over a federation's rounds.

The schedule runs over t = (round − 1) + epoch / local-epochs, measured in rounds, so one local
epoch per round reproduces a centralized per-epoch schedule (MedMNIST's: lr × 0.1 at epochs 50 and
75 of 100 is ``lr-schedule=multistep lr-milestones=50,75``). Clients and server compute it with
this one function from the run config and the round the server sends, so simulation and
deployment train with the same rates, and metrics.jsonl records each round's.
"""

from __future__ import annotations

import math

from fedmeld.task.config import RunConfig


def milestones(cfg: RunConfig) -> list[int]:
    return [int(m) for m in cfg.lr_milestones.split(",") if m.strip()]


def lr_at(cfg: RunConfig, server_round: int, epoch: int = 0) -> float:
    """The learning rate of local epoch ``epoch`` (from 0) of round ``server_round`` (from 1):
    a linear warmup over the first ``lr-warmup`` rounds, then ``lr-schedule``."""
    t = (server_round - 1) + epoch / cfg.local_epochs
    if t < cfg.lr_warmup:
        return cfg.lr * (t + 1 / cfg.local_epochs) / cfg.lr_warmup
    if cfg.lr_schedule == "cosine":
        span = max(cfg.num_server_rounds - cfg.lr_warmup, 1e-9)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min((t - cfg.lr_warmup) / span, 1.0)))
    if cfg.lr_schedule == "multistep":
        return cfg.lr * cfg.lr_gamma ** sum(t >= m for m in milestones(cfg))
    return cfg.lr
