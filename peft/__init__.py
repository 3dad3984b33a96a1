"""Small pure-PyTorch adapters (LoRA, DoRA, VeRA, BitFit, norm, head, full) for timm models.

Importing the package registers the built-in components; a new adapter type is
one module with a ``@register_adapter("name")`` function, imported here.
"""

from . import lora, dora, vera, bitfit, norm, head, full  # noqa: F401  (registers components)
from .api import (adapter_state, apply_peft, count_parameters, load_adapter_state, merge_adapters,
                  merged_state_dict, resize_ranks, unmerge_adapters)
from .config import PeftConfig
from .dora import DoRAConv2d, DoRALinear
from .galore import GaLoreAdamW, galore_param_groups
from .lora import LoRAConv2d, LoRALinear, default_target_modules
from .registry import ADAPTERS, register_adapter
from .vera import VeRAConv2d, VeRALinear

__all__ = [
    "PeftConfig", "apply_peft", "adapter_state", "load_adapter_state", "count_parameters",
    "merge_adapters", "unmerge_adapters", "merged_state_dict", "resize_ranks", "register_adapter", "ADAPTERS",
    "default_target_modules", "LoRALinear", "LoRAConv2d", "DoRALinear", "DoRAConv2d", "VeRALinear", "VeRAConv2d",
    "GaLoreAdamW", "galore_param_groups",
]
