"""Poisoned-client drills: the attacks a partition can be turned into, one registry like the rules'.

An attack either poisons the attacker's training data before it trains (``kind="data"``) or
replaces the update it sends (``kind="update"``: a function of the honest delta, the run's
``attack-scale`` k and a seeded generator). The run config names the attack (``attack``), its
strength (``attack-scale``) and the partitions that run it (``attackers``); the ClientApp applies it
between the honest client and the wire (``client/app.py``), so every protocol and runtime drills
the same way, and the server sees nothing but the replies.

The server rejects a reply whose BatchNorm running variances it would make negative
(``server/strategy.check_statistics``), so ``sign-flip`` and ``scale``, adversaries that want their
reply used, send their variances honest and attack everything else; ``noise`` is a broken client
and sends noise everywhere, which the server rejects where it would break a variance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedmeld.task.aggregators.effective import scaled
from fedmeld.task.data import Split, TaskInfo
from fedmeld.task.wire import State

DataAttack = Callable[[Split, TaskInfo], Split]
UpdateAttack = Callable[[State, float, torch.Generator], State]
KINDS = ("data", "update")


@dataclass(frozen=True)
class Attack:
    """A registered attack and where it strikes."""

    name: str
    fn: DataAttack | UpdateAttack
    help: str
    kind: str  # data: poisons the training split; update: replaces the delta sent

    def on_data(self, split: Split, info: TaskInfo) -> Split:
        """The split the attacker trains on (``split`` itself for update attacks)."""
        return self.fn(split, info) if self.kind == "data" else split

    def on_update(self, delta: State, scale: float, seed: int) -> State:
        """The delta the attacker sends instead of its honest ``delta`` (itself for data attacks)."""
        if self.kind != "update":
            return delta
        return self.fn(delta, scale, torch.Generator().manual_seed(seed))


ATTACKS: dict[str, Attack] = {}


def register_attack(name: str, *, help: str, kind: str) -> Callable[[Callable], Callable]:
    """Register ``fn`` as attack ``name`` (the run config's ``attack``)."""
    if kind not in KINDS:
        raise ValueError(f"attack {name!r}: kind {kind!r}; valid: {', '.join(KINDS)}")

    def register(fn: Callable) -> Callable:
        if name in ATTACKS or name == "none":
            raise ValueError(f"attack {name!r} is already registered or reserved")
        ATTACKS[name] = Attack(name, fn, help, kind)
        return fn

    return register


def passing_validation(delta: State, factor: float) -> State:
    """``factor``·Δ on every floating tensor but the BatchNorm running variances, sent honest: a
    scaled or flipped variance delta would make some global variance negative and get the whole
    reply rejected, while scaled running means and parameters pass."""
    variances = {k: v for k, v in delta.items() if k.endswith("running_var")}
    return {**scaled({k: v for k, v in delta.items() if k not in variances}, factor), **variances}


@register_attack("sign-flip", kind="update",
                 help="sends -k times its honest delta (k: attack-scale; BatchNorm running variances honest)")
def sign_flip(delta: State, scale: float, generator: torch.Generator) -> State:
    """−k·Δ: gradient ascent, k times as far. On LoRA factors the weight update becomes
    −k·s(dB·A + B·dA) + k²·s·dB·dA: its first-order part flipped."""
    return passing_validation(delta, -scale)


@register_attack("scale", kind="update",
                 help="sends k times its honest delta (k: attack-scale; BatchNorm running variances honest)")
def scale_update(delta: State, scale: float, generator: torch.Generator) -> State:
    """k·Δ: the honest direction, boosted (what a client that wants more say would do)."""
    return passing_validation(delta, scale)


@register_attack("noise", kind="update",
                 help="sends Gaussian noise instead of its delta, per tensor k times the honest delta's RMS")
def gaussian_noise(delta: State, scale: float, generator: torch.Generator) -> State:
    """Per tensor, N(0, (k·rms(Δ))²) in place of Δ: a broken or random client, sized like a real one."""
    def noise(t: torch.Tensor) -> torch.Tensor:
        rms = t.double().square().mean().sqrt().item()
        return torch.randn(t.shape, generator=generator, dtype=t.dtype) * (scale * rms)

    return {k: noise(t) if t.is_floating_point() else t for k, t in delta.items()}


@register_attack("label-flip", kind="data",
                 help="trains on flipped labels: y -> C-1-y (binary: 1-y; multi-label: every bit flipped)")
def label_flip(split: Split, info: TaskInfo) -> Split:
    """Labels mirrored (C − 1 − y; multi-label: 1 − y per label); images untouched. The client
    then trains honestly on them, so its update looks like a real one."""
    flipped = 1 - split.labels if info.multi_label else info.num_classes - 1 - split.labels
    return Split(split.images, flipped)


def parse_attackers(value: str) -> tuple[int, ...]:
    """``attackers`` (comma-separated partition ids) as sorted ids; ValueError if malformed."""
    ids = sorted({int(p) for p in value.split(",") if p.strip()})
    if any(i < 0 for i in ids):
        raise ValueError(f"partition ids must be >= 0, got {value!r}")
    return tuple(ids)
