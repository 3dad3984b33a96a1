"""Shared machinery for adapters that re-parametrise a layer's weight (VeRA, DoRA).

Such a layer computes its forward with ``adapted_weight()``, a differentiable
function of the frozen base weight and the adapter's own tensors, so the same
code serves nn.Linear and nn.Conv2d (a conv kernel is treated as its
``(out, in * kh * kw)`` matrix, as LoRAConv2d does) and merging is exact by
construction: ``fold`` writes ``adapted_weight()`` into ``weight``.

Layers are adapted in place by swapping the module's class (``adapt``): the base
``weight``/``bias`` Parameter objects, their state-dict names, hooks, device
and train/eval mode stay as they are, and only the adapter's tensors are new.
``delta_weight``/``fold``/``unfold``/``folded`` mirror ``lora.LoRALayer``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PeftConfig
from .classifier import classifier_names, in_classifier
from .lora import default_target_modules, matches

log = logging.getLogger(__name__)


class ReparamLayer:
    """Mixin listed before nn.Linear/nn.Conv2d; subclasses define the adapted weight and its inverse."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    folded: bool

    @classmethod
    def adapt(cls, module: nn.Module, **kwargs: Any) -> ReparamLayer:
        """Turn ``module`` (exactly the base layer class of ``cls``) into ``cls`` in place and return it."""
        base = next(c for c in cls.__mro__ if c in (nn.Linear, nn.Conv2d))
        if type(module) is not base:
            raise TypeError(f"{cls.__name__} adapts exactly {base.__name__}, got {type(module).__name__}")
        module.__class__ = cls
        module.folded = False
        module._init_adapter(**kwargs)
        return module

    def _init_adapter(self, **kwargs: Any) -> None:
        raise NotImplementedError

    def adapted_weight(self) -> Tensor:
        """The weight the layer computes with while unfolded (differentiable in the adapter tensors)."""
        raise NotImplementedError

    def _unfolded_weight(self) -> Tensor:
        """The base weight recovered from the folded ``weight`` (called while folded)."""
        raise NotImplementedError

    def matrix(self, weight: Tensor) -> Tensor:
        """``weight`` as a matrix: (out, in) for Linear, (out, in/groups * kh * kw) for conv."""
        return weight.flatten(1)

    def delta_weight(self) -> Tensor:
        """``adapted_weight() - weight``, the change a fold applies (as ``LoRALayer.delta_weight``)."""
        return self.adapted_weight() - self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return super().forward(x)
        weight = self.adapted_weight()
        if isinstance(self, nn.Conv2d):
            return self._conv_forward(x, weight, self.bias)
        return F.linear(x, weight, self.bias)

    @torch.no_grad()
    def fold(self) -> None:
        """Write the adapted weight into ``weight`` (a no-op when folded); adapter tensors get no gradient then."""
        if not self.folded:
            self.weight.copy_(self.adapted_weight())
            self.folded = True

    @torch.no_grad()
    def unfold(self) -> None:
        """Undo ``fold`` (exact up to float rounding); a no-op when not folded."""
        if self.folded:
            self.weight.copy_(self._unfolded_weight())
            self.folded = False


def inject(model: nn.Module, cfg: PeftConfig, classes: dict[type[nn.Module], type[ReparamLayer]],
           init: Callable[[str, nn.Module], dict[str, Any]]) -> list[str]:
    """Adapt every ``cfg.target_modules`` layer (default: the family's LoRA targets) outside the head.

    ``init(name, module)`` gives the keyword arguments of the layer's ``_init_adapter``.
    Only exact nn.Linear/nn.Conv2d are adapted (subclasses such as timm's Conv2dSame
    have their own forward); others are skipped with a log line. Returns the adapted names.
    """
    patterns = cfg.target_modules or default_target_modules(model)
    heads = classifier_names(model)
    adapted = []
    for name, module in list(model.named_modules()):
        if in_classifier(name, heads) or not isinstance(module, (nn.Linear, nn.Conv2d)) or not matches(name, patterns):
            continue
        if type(module) not in classes:
            log.info("%s: skipping %s (%s is not exactly nn.Linear/nn.Conv2d)", cfg.method, name,
                     type(module).__name__)
            continue
        classes[type(module)].adapt(module, **init(name, module))
        adapted.append(name)
    if not adapted:
        raise ValueError(f"{cfg.method}: target_modules {patterns} matched no nn.Linear/nn.Conv2d outside the head")
    return adapted
