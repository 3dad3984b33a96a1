"""VeRA: vector-based random matrix adaptation (Kopiczko et al., ICLR 2024).

``W' = W + diag(b) B diag(d) A``: A (r x in) and B (out x r) are frozen random
matrices shared by every adapted layer of the same shape and regenerated from
``PeftConfig.vera_seed`` on each client, so they never travel; only the scaling
vectors d (r) and b (out) train. b starts at 0 (the model starts as the base),
d at 0.1 as in the paper. A and B are non-persistent buffers: they are not
parameters (not counted as trainable), not in the state dict, and not in
``adapter_state``. ``module.to(device)`` gives each layer its own copy on the
device; the values stay shared.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import PeftConfig
from .lora import module_seed
from .registry import register_adapter
from .reparam import ReparamLayer, inject

D_INIT = 0.1


def shared_matrices(out_features: int, in_features: int, rank: int, seed: int) -> tuple[Tensor, Tensor]:
    """Kaiming-uniform A (rank, in) and B (out, rank) from ``seed`` and the shape, on the CPU so every device agrees."""
    gen = torch.Generator().manual_seed(module_seed(seed, f"vera:{out_features}x{in_features}:r{rank}"))
    a, b = torch.empty(rank, in_features), torch.empty(out_features, rank)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
    nn.init.kaiming_uniform_(b, a=math.sqrt(5), generator=gen)
    return a, b


class VeRALayer(ReparamLayer):
    vera_A: Tensor  # (r, in) frozen, shared
    vera_B: Tensor  # (out, r) frozen, shared
    vera_d: nn.Parameter  # (r,)
    vera_b: nn.Parameter  # (out,)

    def _init_adapter(self, vera_A: Tensor, vera_B: Tensor, d_init: float = D_INIT) -> None:
        w = self.matrix(self.weight)
        if vera_A.shape[1] != w.shape[1] or vera_B.shape[0] != w.shape[0]:
            raise ValueError(f"VeRA: A {tuple(vera_A.shape)} / B {tuple(vera_B.shape)} do not fit weight "
                             f"matrix {tuple(w.shape)}")
        self.register_buffer("vera_A", vera_A, persistent=False)
        self.register_buffer("vera_B", vera_B, persistent=False)
        self.vera_d = nn.Parameter(w.new_full((vera_A.shape[0],), d_init))
        self.vera_b = nn.Parameter(w.new_zeros(w.shape[0]))

    def delta_weight(self) -> Tensor:
        """``diag(b) B diag(d) A`` shaped like ``weight``."""
        delta = self.vera_b[:, None] * (self.vera_B @ (self.vera_d[:, None] * self.vera_A))
        return delta.view_as(self.weight)

    def adapted_weight(self) -> Tensor:
        return self.weight + self.delta_weight()

    def _unfolded_weight(self) -> Tensor:
        return self.weight - self.delta_weight()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, vera_rank={self.vera_A.shape[0]}, folded={self.folded}"


class VeRALinear(VeRALayer, nn.Linear):
    pass


class VeRAConv2d(VeRALayer, nn.Conv2d):
    pass


@register_adapter("vera", wraps_weights=True, help="VeRA: frozen random matrices shared per layer shape (vera-rank), trained scaling vectors")
def apply_vera(model: nn.Module, cfg: PeftConfig) -> None:
    shared: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}

    def init(name: str, module: nn.Module) -> dict[str, Tensor]:
        shape = tuple(module.weight.flatten(1).shape)
        if shape not in shared:  # one pair per shape: the layers hold the same tensors
            shared[shape] = tuple(t.to(module.weight) for t in shared_matrices(*shape, cfg.vera_rank, cfg.vera_seed))
        vera_A, vera_B = shared[shape]
        return {"vera_A": vera_A, "vera_B": vera_B}

    inject(model, cfg, {nn.Linear: VeRALinear, nn.Conv2d: VeRAConv2d}, init)
