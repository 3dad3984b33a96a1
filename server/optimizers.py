"""Server optimizers on the aggregated delta (Reddi et al. 2021, "Adaptive Federated Optimization").

The mean client delta acts as a negative pseudo-gradient. ``sgd`` with lr 1 is FedAvg; ``momentum``
is FedAvgM; ``adam`` and ``yogi`` are FedAdam and FedYogi. Written here rather than taken from
Flower's FedAvgM/FedAdam/FedYogi strategies because those classes aggregate whole weight records
themselves, while ours receive deltas that must first pass our reply checks and aggregation rule;
the update rules are a few lines each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

Delta = dict[str, torch.Tensor]


@dataclass
class ServerOptimizer:
    """Turns each round's aggregated delta into the step applied to the global state."""

    rule: str = "sgd"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity floor of FedAdam/FedYogi
    state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def step(self, delta: Delta) -> Delta:
        if self.rule not in RULES:
            raise ValueError(f"unknown server optimizer {self.rule!r}; valid: {', '.join(RULES)}")
        return {name: self.lr * RULES[self.rule](self, name, d.double()).to(d.dtype) for name, d in delta.items()}

    def state_tensors(self, prefix: str = "") -> Delta:
        """The moments as flat tensors for a checkpoint: ``{prefix}{name}/{moment}``."""
        return {f"{prefix}{name}/{key}": t for name, moments in self.state.items() for key, t in moments.items()}

    def load_state_tensors(self, tensors: Delta, prefix: str = "") -> None:
        """The moments back from ``state_tensors``' keys (others ignored)."""
        self.state = {}
        for key, t in tensors.items():
            if key.startswith(prefix):
                name, moment = key[len(prefix):].rsplit("/", 1)
                self.state.setdefault(name, {})[moment] = t

    def _moment(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor:
        return self.state.setdefault(name, {}).setdefault(key, torch.zeros_like(like))


def _sgd(opt: ServerOptimizer, name: str, d: torch.Tensor) -> torch.Tensor:
    return d


def _momentum(opt: ServerOptimizer, name: str, d: torch.Tensor) -> torch.Tensor:
    m = opt._moment(name, "m", d).mul_(opt.beta1).add_(d)
    return m.clone()


def _adaptive(second_moment: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]):
    def step(opt: ServerOptimizer, name: str, d: torch.Tensor) -> torch.Tensor:
        m = opt._moment(name, "m", d).mul_(opt.beta1).add_((1 - opt.beta1) * d)
        v = opt._moment(name, "v", d)
        v.copy_(second_moment(v, d * d, opt.beta2))
        return m / (v.sqrt() + opt.tau)

    return step


RULES: dict[str, Callable[[ServerOptimizer, str, torch.Tensor], torch.Tensor]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "adam": _adaptive(lambda v, d2, b2: b2 * v + (1 - b2) * d2),
    "yogi": _adaptive(lambda v, d2, b2: v - (1 - b2) * d2 * torch.sign(v - d2)),
}
