"""Norm tuning and the BatchNorm running-statistics policy.

The ``norm`` component makes the affine gamma/beta of every LayerNorm (incl.
timm's LayerNorm2d), BatchNorm (incl. timm's BatchNormAct2d) and GroupNorm
trainable: few parameters that re-centre features for a new domain.

Running statistics are not parameters, but any train-mode forward changes them,
whatever the method. ``PeftConfig.bn_stats`` decides what happens to them:

- "aggregate" (default): running_mean/running_var of every BatchNorm are part of
  ``adapter_state``, so they travel and are averaged like any other tensor. The
  server evaluates and exports one global model, which needs statistics of the
  federation's data, not of the pretraining set. (FedBN-style local stats can
  come later.)
- "frozen": every BatchNorm is kept in eval mode, even under ``model.train()``,
  by a forward-pre-hook (survives deepcopy, no ``train()`` monkey-patching), so
  the statistics never change and never travel.

``num_batches_tracked`` never travels: it is a counter, not something to average.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .config import PeftConfig
from .registry import register_adapter

NORM_TYPES = (nn.LayerNorm, _BatchNorm, nn.GroupNorm)


@register_adapter("norm", help="the γ/β of every LayerNorm, BatchNorm and GroupNorm")
def apply_norm(model: nn.Module, cfg: PeftConfig) -> None:
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)


BN_STATISTICS = ("running_mean", "running_var")  # the names BatchNorm statistics travel under (state-dict suffixes)


def bn_stats(model: nn.Module) -> dict[str, Tensor]:
    """running_mean/running_var of every BatchNorm whose statistics can change (not frozen), by
    state-dict name: what has to travel."""
    return {
        name: buf
        for prefix, module in model.named_modules()
        if isinstance(module, _BatchNorm) and not getattr(module, "stats_frozen", False)
        for name, buf in module.named_buffers(prefix=prefix, recurse=False)
        if not name.endswith("num_batches_tracked")
    }


def _keep_eval(module: nn.Module, args: tuple) -> None:
    module.eval()


def freeze_bn_stats(model: nn.Module) -> None:
    """Make every BatchNorm run in eval mode (running stats used, never updated)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.register_forward_pre_hook(_keep_eval)
            module.stats_frozen = True
