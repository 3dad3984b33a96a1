"""GaLore: gradient low-rank projection (Zhao et al., ICML 2024) as an AdamW.

For a matrix parameter with gradient G (m x n), Adam runs on a rank-r
projection of G instead of G, so its moments cost r * max(m, n) instead of
m * n; the result is projected back and scaled:

    P = top-r singular vectors of G on its smaller side, refreshed every ``update_gap`` steps
    R = G P^T (m >= n, P: r x n)   or   P^T G (m < n, P: m x r)
    W <- W - lr * scale * back(Adam(R)),  back(N) = N P  or  P N

As in the authors' reference implementation (``galore-torch``), the moments are
kept when P is refreshed. Other parameters (and groups without ``rank``) get
plain AdamW, computed exactly as ``torch.optim.AdamW`` does, whose decoupled
weight decay applies to every parameter.

The authors project the 2-D weights of linear layers. ``galore_param_groups``
also projects conv kernels, viewed as their (out, in * kh * kw) matrix as
LoRAConv2d does (a 1x1 conv is a linear layer), unless ``project_conv=False``;
matrices whose smaller side is not larger than the rank (depthwise kernels, the
classifier head) stay with plain AdamW: projecting them would save nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW whose param groups with a ``rank`` run Adam in GaLore's projected space."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, rank: int | None = None,
                 update_gap: int = 200, scale: float = 0.25) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"GaLoreAdamW: invalid lr={lr}, betas={betas}, eps={eps} or weight_decay={weight_decay}")
        if update_gap < 1:
            raise ValueError(f"GaLoreAdamW: update_gap must be >= 1, got {update_gap}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_gap=update_gap, scale=scale)
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["rank"] is not None and any(p.dim() < 2 for p in group["params"]):
                raise ValueError("GaLoreAdamW: a group with a rank may hold only parameters with >= 2 dims")

    @staticmethod
    def _project(grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        """The low-rank gradient; refreshes the projector from this gradient's SVD when it is due."""
        g = grad.flatten(1)
        if state["step"] % group["update_gap"] == 0:
            u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
            state["left"] = g.shape[0] < g.shape[1]
            state["projector"] = (u[:, :group["rank"]] if state["left"] else vh[:group["rank"]]).to(g.dtype)
        p = state["projector"]
        return p.T @ g if state["left"] else g @ p.T

    @staticmethod
    def _project_back(update: Tensor, state: dict[str, Any]) -> Tensor:
        p = state["projector"]
        return p @ update if state["left"] else update @ p

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                state.setdefault("step", 0)
                grad = p.grad if group["rank"] is None else self._project(p.grad, state, group)
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(grad), torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]

                p.mul_(1 - lr * group["weight_decay"])
                exp_avg.lerp_(grad, 1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (exp_avg / (1 - beta1 ** t)) / (exp_avg_sq / (1 - beta2 ** t)).sqrt().add_(eps)
                if group["rank"] is not None:
                    update = group["scale"] * self._project_back(update, state).view_as(p)
                p.add_(update, alpha=-lr)
        return loss


def galore_param_groups(model: nn.Module, rank: int, update_gap: int = 200, scale: float = 0.25,
                        project_conv: bool = True) -> list[dict[str, Any]]:
    """Param groups for GaLoreAdamW: projected matrices, then everything else that trains (plain AdamW)."""
    projected, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        matrix = p.dim() == 2 or (p.dim() > 2 and project_conv)
        (projected if matrix and min(p.shape[0], p[0].numel()) > rank else plain).append((name, p))
    log.info("GaLore rank %d: %d matrices (%d params) projected; %d tensors (%d params) with plain AdamW%s",
             rank, len(projected), sum(p.numel() for _, p in projected), len(plain),
             sum(p.numel() for _, p in plain), "" if project_conv else ", conv kernels among them (project_conv=False)")
    groups = [{"params": [p for _, p in projected], "rank": rank, "update_gap": update_gap, "scale": scale},
              {"params": [p for _, p in plain], "rank": None}]
    return [g for g in groups if g["params"]]
