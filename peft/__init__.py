"""Small pure-PyTorch adapters (LoRA, DoRA, VeRA, BitFit, norm, classifier, full, LTE) for timm models.

Importing the package imports every module in it, which registers the built-in adapters: a new
adapter type is one module here with a ``@register_adapter("name", help=...)`` function, and
nothing else lists it.
"""

import importlib
import pkgutil

from .api import (adapter_state, apply_peft, count_parameters, fold_adapters, load_adapter_state,
                  merged_state_dict, resize_ranks, unfold_adapters)
from .config import PeftConfig
from .dora import DoRAConv2d, DoRALinear
from .galore import GaLoreAdamW, galore_param_groups
from .lora import LoRAConv2d, LoRALinear, default_target_modules
from .registry import ADAPTERS, Adapter, register_adapter
from .vera import VeRAConv2d, VeRALinear

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "PeftConfig", "apply_peft", "adapter_state", "load_adapter_state", "count_parameters",
    "fold_adapters", "unfold_adapters", "merged_state_dict", "resize_ranks", "register_adapter", "ADAPTERS",
    "Adapter", "default_target_modules", "LoRALinear", "LoRAConv2d", "DoRALinear", "DoRAConv2d", "VeRALinear",
    "VeRAConv2d", "GaLoreAdamW", "galore_param_groups",
]
