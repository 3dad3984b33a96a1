"""DoRA: weight-decomposed low-rank adaptation (Liu et al., ICML 2024).

``W' = m * V / ||V||_c`` with ``V = W + (alpha / r) B A``: LoRA moves the
direction, the trainable magnitude m (one per output unit) its length.
``||V||_c`` is the norm of each output row over the input dimension(s), as in
the paper and PEFT; m starts at ``||W||_c`` and B at 0, so the layer starts as
the base. The norm is differentiated through (the paper's detach is a memory
saving for LLMs, not needed here). ``lora_A``/``lora_B`` have LoRA's names and
shapes, so LoRA-aware aggregation treats DoRA's direction like LoRA.

``fold`` stores ``||V||_c`` (a vector), which is all ``unfold`` needs to
recover W from W'.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .config import PeftConfig
from .registry import register_adapter
from .reparam import ReparamLayer, inject


class DoRALayer(ReparamLayer):
    lora_A: nn.Parameter  # (r, *weight.shape[1:]) as in LoRALayer
    lora_B: nn.Parameter  # (out, r)
    lora_magnitude: nn.Parameter  # (out,)
    folded_norm: Tensor | None  # ||V||_c at fold time

    def _init_adapter(self, rank: int, alpha: float) -> None:
        w = self.weight
        self.rank, self.lora_alpha, self.scaling = rank, alpha, alpha / rank
        self.lora_A = nn.Parameter(w.new_empty(rank, *w.shape[1:]))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(w.new_zeros(w.shape[0], rank))
        self.lora_magnitude = nn.Parameter(self.row_norm(w.detach()))
        self.register_buffer("folded_norm", None, persistent=False)

    def row_norm(self, weight: Tensor) -> Tensor:
        """``||weight||_c``: the L2 norm of each output row over the input dimension(s)."""
        return self.matrix(weight).norm(dim=1)

    def _rows(self, v: Tensor) -> Tensor:
        """A per-output vector shaped to broadcast against ``weight``."""
        return v.view(-1, *[1] * (self.weight.dim() - 1))

    def lora_delta(self) -> Tensor:
        """``(alpha / r) B A`` shaped like ``weight``."""
        return (self.scaling * (self.lora_B @ self.lora_A.flatten(1))).view_as(self.weight)

    def adapted_weight(self) -> Tensor:
        v = self.weight + self.lora_delta()
        return v * self._rows(self.lora_magnitude / self.row_norm(v))

    @torch.no_grad()
    def fold(self) -> None:
        if not self.folded:
            self.folded_norm = self.row_norm(self.weight + self.lora_delta())
        super().fold()

    def _unfolded_weight(self) -> Tensor:
        return self.weight * self._rows(self.folded_norm / self.lora_magnitude) - self.lora_delta()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.lora_alpha}, folded={self.folded}"


class DoRALinear(DoRALayer, nn.Linear):
    pass


class DoRAConv2d(DoRALayer, nn.Conv2d):
    pass


@register_adapter("dora", wraps_weights=True, help="DoRA: a trained magnitude and a LoRA direction per target layer")
def apply_dora(model: nn.Module, cfg: PeftConfig) -> None:
    inject(model, cfg, {nn.Linear: DoRALinear, nn.Conv2d: DoRAConv2d},
           lambda name, module: {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha})
