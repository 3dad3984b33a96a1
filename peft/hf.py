"""Hugging Face peft's LoRA format for our LoRA and DoRA: out (``save_hf_peft``) and in (``load_hf_peft``).

HF peft loads an adapter onto a plain timm model with ``PeftModel.from_pretrained(model, dir)``, from
``adapter_config.json`` and ``adapter_model.safetensors`` (verified with peft 0.21.2). Its keys are
``base_model.model.`` + module path + tensor, the adapter name removed:

- ``lora_A.weight``: (r, in) for Linear, (r, C_in, k, k) for Conv2d, as our ``lora_A``;
- ``lora_B.weight``: (out, r) for Linear, (C_out, r, 1, 1) for Conv2d (ours: (out, r) for both);
- DoRA's ``lora_magnitude_vector``: (out,) for Linear, (1, C_out, 1, 1) for Conv2d (ours: (out,));
- each module in ``modules_to_save`` (the head, trained norms, BatchNorms whose statistics travel)
  under its own state-dict names, BatchNorm's ``num_batches_tracked`` included.

HF's LoRA computes ``W x + (lora_alpha / r) B A x`` (``use_rslora``: alpha / sqrt(r)) and its DoRA
``m V / ||V||_c`` with ``V = W + s B A``, as ours, so the tensors carry over unchanged. The trap: a
file whose keys lack the prefix loads in HF peft with only a warning and no effect, so
``load_hf_peft`` places every key or refuses the file, and tests compare outputs, not only loading.

Pure torch + json + safetensors (no ``peft`` import): one mapping, ``_hf_views``, gives every HF key
as a view of the live tensor it stands for; export clones the views, import copies into them.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .api import _adapter_tensors
from .dora import DoRALayer
from .lora import LoRALayer
from .lte import MultiLoRALayer
from .reparam import ReparamLayer

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_LORA_KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")


class NotRepresentable(ValueError):
    """A model whose adapters HF peft's LoRA cannot express; the message says why."""


class AdapterMismatch(ValueError):
    """An HF peft adapter that does not fit the model; the message says what differs and how to fix it."""


def _lora_layers(model: nn.Module) -> dict[str, LoRALayer | DoRALayer]:
    """Every LoRA/DoRA layer by module name; NotRepresentable if any layer is one HF's LoRA can't hold."""
    layers: dict[str, LoRALayer | DoRALayer] = {}
    for name, module in model.named_modules():
        if isinstance(module, (LoRALayer, DoRALayer)):
            if module.folded:
                raise NotRepresentable(f"{name} is folded; unfold_adapters(model) first")
            if isinstance(module, nn.Conv2d) and module.dilation != (1, 1):
                raise NotRepresentable(f"{name} is a dilated conv: HF peft's LoRA A conv has no dilation")
            layers[name] = module
        elif isinstance(module, (ReparamLayer, MultiLoRALayer)):
            raise NotRepresentable(f"{name} is a {type(module).__name__}: HF peft's LoRA has no equivalent")
    if not layers:
        raise NotRepresentable("the model has no LoRA/DoRA layer, and HF peft's LoRA format needs at least one")
    return layers


def _trained_owners(model: nn.Module, layers: dict[str, nn.Module]) -> list[str]:
    """Modules outside the LoRA layers that own a trained parameter or a travelling BatchNorm
    statistic: what HF peft keeps whole in ``modules_to_save``."""
    owners = set()
    for name in _adapter_tensors(model):
        owner, _, leaf = name.rpartition(".")
        if owner in layers:
            if leaf in ("lora_A", "lora_B", "lora_magnitude"):
                continue
            raise NotRepresentable(f"{name} trains (bitfit?), but {owner} is a LoRA layer and HF peft cannot "
                                   f"also keep it in modules_to_save")
        if not owner:
            raise NotRepresentable(f"{name} is a parameter of the model itself; modules_to_save holds modules")
        owners.add(owner)
    _check_hf_matching(model, owners, layers)
    return sorted(owners)


def _check_hf_matching(model: nn.Module, owners: set[str], layers: dict[str, nn.Module]) -> None:
    """HF peft wraps every module whose name *ends with* a ``modules_to_save`` entry (no dot needed)
    and keeps LoRA off every module on such a path: refuse names for which that means other
    modules than ours."""
    for name, module in model.named_modules():
        hit = next((o for o in owners if name.endswith(o)), None)
        if hit and name not in owners and (next(module.parameters(), None) is not None
                                           or next(module.buffers(), None) is not None):
            raise NotRepresentable(f"HF peft would also keep {name!r} in modules_to_save (its name ends with {hit!r})")
    for name in layers:
        if any(re.match(rf"(^|.*\.){o}($|\..*)", name) for o in owners):
            raise NotRepresentable(f"HF peft would keep LoRA off {name!r}: it lies on a modules_to_save path")


def _hf_views(model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """HF peft's ``adapter_config.json`` fields for ``model`` and every key of its
    ``adapter_model.safetensors`` as a view of the live tensor (writing a view writes the model)."""
    layers = _lora_layers(model)
    ranks = {m.rank for m in layers.values()}
    alphas = {float(m.lora_alpha) for m in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise NotRepresentable(f"LoRA layers differ in rank {sorted(ranks)} or alpha {sorted(alphas)}")
    views: dict[str, Tensor] = {}
    for name, m in layers.items():
        conv = isinstance(m, nn.Conv2d)
        views[f"{name}.lora_A.weight"] = m.lora_A.data
        views[f"{name}.lora_B.weight"] = m.lora_B.data[:, :, None, None] if conv else m.lora_B.data
        if isinstance(m, DoRALayer):
            views[f"{name}.lora_magnitude_vector"] = m.lora_magnitude.data.view(1, -1, 1, 1) if conv \
                else m.lora_magnitude.data
    owners = _trained_owners(model, layers)
    for owner in owners:
        views.update({f"{owner}.{k}": v for k, v in model.get_submodule(owner).state_dict().items()})
    dora = any(isinstance(m, DoRALayer) for m in layers.values())
    config = {"peft_type": "LORA", "r": ranks.pop(), "lora_alpha": alphas.pop(),
              "lora_dropout": 0.0 if dora else float(next(iter(layers.values())).lora_dropout),
              "target_modules": sorted(layers), "modules_to_save": owners or None, "use_dora": dora,
              "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "inference_mode": True, "task_type": None}
    return config, {PREFIX + k: v for k, v in views.items()}


def to_hf_peft(model: nn.Module, base_model: str | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(adapter_config, tensors)`` of HF peft's LoRA format for an adapted model (``apply_peft``);
    ``base_model``: the timm name, recorded as ``base_model_name_or_path``. Raises NotRepresentable."""
    config, views = _hf_views(model)
    return {**config, "base_model_name_or_path": base_model}, {k: v.detach().cpu().clone() for k, v in views.items()}


def save_hf_peft(model: nn.Module, directory: str | Path, base_model: str | None = None,
                 metadata: dict[str, str] | None = None) -> Path:
    """Write ``directory`` as HF peft writes an adapter (``PeftModel.from_pretrained`` loads it);
    ``metadata`` goes into the safetensors header (HF drops unknown config fields, with a warning)."""
    config, tensors = to_hf_peft(model, base_model)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / WEIGHTS_FILE),
              metadata={"format": "pt", **(metadata or {})})
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_hf_peft(directory: str | Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(adapter_config, tensors)`` of an HF peft adapter directory; AdapterMismatch if it is not one."""
    directory = Path(directory).expanduser()
    files = [directory / CONFIG_FILE, directory / WEIGHTS_FILE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise AdapterMismatch(f"{directory} is not an HF peft adapter directory: {', '.join(missing)} missing "
                              f"(HF peft's save_pretrained writes both; .bin adapters are not read)")
    return json.loads(files[0].read_text()), load_file(str(files[1]))


def _architecture(name: str) -> str:
    """A timm name without hub prefix or pretrained tag: ``timm/resnet18.a1_in1k`` -> ``resnet18``."""
    return name.removeprefix("hf-hub:").removeprefix("timm/").split(".", 1)[0]


def _check_config(config: dict[str, Any], ours: dict[str, Any], model_name: str | None) -> float:
    """Refuse an adapter the model cannot compute as HF peft does (``ours``: the model's own
    ``_hf_views`` config); return the factor that scales B so that our alpha/r gives HF's scale."""
    if config.get("peft_type") != "LORA":
        raise AdapterMismatch(f"peft_type {config.get('peft_type')!r}: only LoRA (and DoRA) adapters import")
    base = config.get("base_model_name_or_path")
    if base and model_name and _architecture(base) != _architecture(model_name):
        raise AdapterMismatch(f"the adapter was trained on {base!r}, this run's model is {model_name!r}; "
                              f"set model={_architecture(base)}")
    for key, plain in (("rank_pattern", {}), ("alpha_pattern", {}), ("lora_bias", False),
                       ("target_parameters", None), ("fan_in_fan_out", False), ("bias", "none")):
        if config.get(key) not in (plain, None):
            raise AdapterMismatch(f"{key}={config[key]!r} is not supported (only {plain!r}; train biases through "
                                  f"modules_to_save)")
    if bool(config.get("use_dora")) != ours["use_dora"]:
        kind = {True: "DoRA", False: "LoRA"}
        raise AdapterMismatch(f"the adapter is {kind[bool(config.get('use_dora'))]}, this run trains "
                              f"{kind[ours['use_dora']]}; set peft accordingly")
    r = config.get("r", 8)  # LoraConfig's defaults, as HF peft reads a config without them
    if r != ours["r"]:
        raise AdapterMismatch(f"the adapter has rank r={r}, this run lora-rank={ours['r']}; set lora-rank={r}")
    alpha = config.get("lora_alpha", 8)
    hf_scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return hf_scale / (ours["lora_alpha"] / ours["r"])


@torch.no_grad()
def load_hf_peft(model: nn.Module, config: dict[str, Any], tensors: dict[str, Tensor],
                 model_name: str | None = None) -> list[str]:
    """Copy an HF peft LoRA/DoRA adapter into an adapted model (``apply_peft``) in place; return the
    names of the model's trained tensors the adapter does not hold (they keep their values).

    ``model_name`` (the timm name) is checked against the adapter's ``base_model_name_or_path``.
    A different lora_alpha (or ``use_rslora``) is exact: B is rescaled so that our alpha/r gives HF's
    scale. Everything else that differs (type, rank, target modules, tensors this model does not
    train, shapes, keys without HF's prefix) raises AdapterMismatch before anything is copied."""
    try:
        ours, views = _hf_views(model)
    except NotRepresentable as err:
        raise AdapterMismatch(f"this run's adapters have no HF peft equivalent: {err}") from None
    b_factor = _check_config(config, ours, model_name)
    layers = set(ours["target_modules"])
    unprefixed = sorted(k for k in tensors if not k.startswith(PREFIX))
    if unprefixed:
        raise AdapterMismatch(f"keys without HF peft's {PREFIX!r} prefix (HF peft itself would ignore them): "
                              f"{unprefixed[:4]}")
    names = {k[len(PREFIX):] for k in tensors}
    wrapped = {n.rsplit(".", 2)[0] for n in names if n.endswith(".lora_A.weight")}
    if wrapped != layers:
        raise AdapterMismatch(f"target modules differ: only in the adapter {sorted(wrapped - layers)[:6]}, only "
                              f"in this run {sorted(layers - wrapped)[:6]}; set target-modules to the "
                              f"adapter's target_modules {config.get('target_modules')!r}")
    unknown = sorted(k for k in tensors if k not in views)
    if unknown:
        raise AdapterMismatch(f"the adapter holds tensors this run does not train: {unknown[:6]} (add norm to peft "
                              f"for trained norms; bn-stats=aggregate for BatchNorm statistics)")
    for key, t in tensors.items():
        if t.shape != views[key].shape:
            raise AdapterMismatch(f"{key}: shape {tuple(t.shape)} in the adapter, {tuple(views[key].shape)} in this "
                                  f"run (num_classes, in_chans or model args differ?)")
    missing_lora = sorted(k for k in views if k not in tensors and k.endswith(_LORA_KEYS))
    if missing_lora:
        raise AdapterMismatch(f"the adapter lacks {missing_lora[:4]}")
    for key, t in tensors.items():
        views[key].copy_(t * b_factor if key.endswith("lora_B.weight") and b_factor != 1 else t)
    return sorted(k[len(PREFIX):] for k in views if k not in tensors and not k.endswith("num_batches_tracked"))
