"""Apply adapters to a model and move their state in and out of it.

``adapter_state`` is what a client ships: the model's own names for trainable
parameters plus travelling buffers, so server-side aggregation is a plain
per-key average and loading needs no name mapping.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import PeftConfig
from .lora import LoRALayer
from .lte import MultiLoRALayer
from .norm import bn_stats, freeze_bn_stats
from .registry import application_order
from .reparam import ReparamLayer

FOLDABLE = (LoRALayer, ReparamLayer)  # layers with delta_weight/fold/unfold: LoRA, DoRA, VeRA


def apply_peft(model: nn.Module, cfg: PeftConfig) -> nn.Module:
    """Freeze ``model``, apply cfg's components (``registry.application_order``) in place; return it."""
    cfg.validate()
    if hasattr(model, "peft_config"):
        raise ValueError("apply_peft: model is already adapted")
    model.requires_grad_(False)
    for adapter in application_order(set(cfg.components)):
        adapter.apply(model, cfg)
    if cfg.bn_stats == "frozen":
        freeze_bn_stats(model)
    model.peft_config = PeftConfig.from_dict(cfg.to_dict())  # a copy: later edits to cfg don't leak in
    return model


def _config(model: nn.Module) -> PeftConfig:
    cfg = getattr(model, "peft_config", None)
    if not isinstance(cfg, PeftConfig):
        raise ValueError("model has no peft_config: call apply_peft first")
    return cfg


def _adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The live tensors that make up the adapter state, by state-dict name."""
    cfg = _config(model)
    if "full" in cfg.components:
        return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("num_batches_tracked")}
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    tensors.update(bn_stats(model))  # empty when bn_stats="frozen"
    return tensors


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached clones of the adapter tensors, sorted by name."""
    tensors = _adapter_tensors(model)
    return {name: tensors[name].detach().clone() for name in sorted(tensors)}


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, Tensor], strict: bool = True) -> None:
    """Copy ``state`` into the model's tensors in place.

    Shape mismatches always raise ValueError (before anything is copied);
    ``strict`` also raises KeyError on missing or unexpected keys, otherwise
    those are ignored.
    """
    targets = _adapter_tensors(model)
    if strict:
        missing, unexpected = sorted(targets.keys() - state.keys()), sorted(state.keys() - targets.keys())
        if missing or unexpected:
            raise KeyError(f"adapter state mismatch: missing {missing}, unexpected {unexpected}")
    common = [k for k in state if k in targets]
    for k in common:
        if state[k].shape != targets[k].shape:
            raise ValueError(f"adapter state {k!r}: shape {tuple(state[k].shape)} != {tuple(targets[k].shape)}")
    for k in common:
        targets[k].copy_(state[k])


def resize_ranks(state: dict[str, Tensor], like: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` with every LoRA factor cut or zero-padded along its rank dimension (rows of
    ``lora_A``, columns of ``lora_B``) to its shape in ``like``; other tensors as they are.

    How factors of different ranks meet (HetLoRA): a client of rank r takes the first r
    components of the global factors, and its factors are zero-padded back for averaging.
    """
    out = {}
    for name, t in state.items():
        target = like.get(name)
        leaf = name.rsplit(".", 1)[-1]
        if target is None or t.shape == target.shape or leaf not in ("lora_A", "lora_B"):
            out[name] = t
            continue
        dim = 0 if leaf == "lora_A" else 1
        if t.dim() != target.dim() or [s for i, s in enumerate(t.shape) if i != dim] != \
                [s for i, s in enumerate(target.shape) if i != dim]:
            raise ValueError(f"{name}: shape {tuple(t.shape)} differs from {tuple(target.shape)} beyond the rank")
        rank = min(t.shape[dim], target.shape[dim])
        resized = t.new_zeros(target.shape)
        resized.narrow(dim, 0, rank).copy_(t.narrow(dim, 0, rank))
        out[name] = resized
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; total includes adapter parameters."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def fold_adapters(model: nn.Module) -> None:
    """Fold every LoRA/DoRA/VeRA delta into its base weight (no-op for folded layers)."""
    for module in model.modules():
        if isinstance(module, FOLDABLE):
            module.fold()


def unfold_adapters(model: nn.Module) -> None:
    """Undo ``fold_adapters``."""
    for module in model.modules():
        if isinstance(module, FOLDABLE):
            module.unfold()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """State dict of the equivalent plain model: adapters folded in, their own keys dropped.

    Computed without touching the model, so no fold/unfold rounding drift.
    It loads strictly into the un-adapted architecture (same timm name and
    num_classes). LTE's layers give the weight they compute with in eval mode
    (base + the heads' pending merge).
    """
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, (*FOLDABLE, MultiLoRALayer)):
            prefix = f"{name}." if name else ""
            own = [k for k, _ in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))]
            for key in set(own) - {"weight", "bias"}:
                state.pop(prefix + key, None)  # non-persistent buffers (VeRA's A, B) are not in it
            if not getattr(module, "folded", False):
                state[prefix + "weight"] = module.weight + module.delta_weight()
    return state
