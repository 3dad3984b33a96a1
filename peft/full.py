"""Full fine-tuning: the baseline every adapter is compared against."""

from __future__ import annotations

from torch import nn

from .config import PeftConfig
from .registry import register_adapter


@register_adapter("full", alone=True, help="every parameter (the baseline; with optimizer=galore-adamw, GaLore)")
def apply_full(model: nn.Module, cfg: PeftConfig) -> None:
    model.requires_grad_(True)
