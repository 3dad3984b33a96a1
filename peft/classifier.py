"""Classifier-head tuning.

The head is resized to the task by the caller (``timm.create_model(...,
num_classes=n)``), so it starts random and must always be trainable; this
component only marks it so. LoRA never wraps it (see ``lora.py``).
"""

from __future__ import annotations

from torch import nn

from .config import PeftConfig
from .registry import register_adapter


def classifier_names(model: nn.Module) -> list[str]:
    """Qualified names of the classifier module(s), or [] if none is found.

    timm records them in ``pretrained_cfg["classifier"]`` (a str such as "head",
    "fc", "head.fc", or a tuple for distilled models); otherwise fall back to
    ``model.get_classifier()``.
    """
    modules = dict(model.named_modules())
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or ()
    names = [names] if isinstance(names, str) else list(names)
    found = [n for n in names if n in modules]
    if found or not hasattr(model, "get_classifier"):
        return found
    classifier = model.get_classifier()
    return [n for n, m in modules.items() if m is classifier]


def in_classifier(name: str, heads: list[str]) -> bool:
    """True if the qualified module/parameter ``name`` lies inside a head."""
    return any(name == h or name.startswith(h + ".") for h in heads)


@register_adapter("head", help="the classifier only (it trains with every other choice too)")
def apply_head(model: nn.Module, cfg: PeftConfig) -> None:
    heads = classifier_names(model)
    if not heads:
        raise ValueError(f"cannot find the classifier head of {type(model).__name__}")
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
