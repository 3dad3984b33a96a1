"""BitFit (Ben Zaken et al., 2022): train the bias terms only.

Every parameter named ``bias`` trains, the norms' beta included, as in the
paper; convolutions built without bias (ResNet's, before a BatchNorm) have
none, so there BitFit amounts to the BatchNorm betas (and the head's bias).
"""

from __future__ import annotations

from torch import nn

from .config import PeftConfig
from .registry import register_adapter


@register_adapter("bitfit", help="the bias terms (BitFit)")
def apply_bitfit(model: nn.Module, cfg: PeftConfig) -> None:
    for name, p in model.named_parameters():
        if name.rpartition(".")[2] == "bias":
            p.requires_grad_(True)
