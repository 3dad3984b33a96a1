"""Run outputs that other tools open without fedmeld: timm's ``config.json`` beside the merged models,
and Hugging Face peft adapter directories.

``config.json`` is timm's hub layout (``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg`` with ``input_size``, ``interpolation``, ``mean``, ``std``, ``crop_pct``), so
plain timm rebuilds ``model_merged.safetensors`` and ``model_selected.safetensors`` and their
preprocessing (README, "Use the outputs elsewhere")::

    cfg = json.load(open(f"{run}/config.json"))
    model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=f"{run}/model_merged.safetensors"))

fedmeld feeds the model uint8 pixels scaled to [-1, 1] (mean 0.5, std 0.5 per channel) and
resized on the device to ``input_size`` with ``F.interpolate(mode=resize)`` (``task/engine.py``
``Inputs``); timm's ``create_transform(**resolve_data_config(model=model))`` does the same on PIL
images (bit-equal when no resize happens; PIL's resize differs slightly from torch's otherwise).

Two cases plain timm cannot build, for which ``load_exported`` exists: ``stem=small`` (timm has no
argument for fedmeld's small stem; ``model_args`` then holds ``fedmeld_stem``, which every timm
constructor refuses with a TypeError instead of building the default stem and loading weights that
fit it silently, as resnet10t's would), and fedmeld's own registered models (``vit_pico_patch4_28``,
``vit_nano_patch4_28``: importing ``fedmeld.task.model`` registers them).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import timm
from safetensors.torch import load_file
from torch import nn

from fedmeld.peft.hf import NotRepresentable, save_hf_peft
from fedmeld.task.config import RunConfig
from fedmeld.task.data import TaskInfo
from fedmeld.task.model import small_stem, timm_model
from fedmeld.task.wire import State

log = logging.getLogger(__name__)
TIMM_CONFIG = "config.json"
MERGED = "model_merged.safetensors"
STEM_ARG = "fedmeld_stem"  # model_args key that plain timm refuses (see the module docstring)
_DEFAULT_CFG_KEYS = ("first_conv", "classifier", "fixed_input_size")  # timm's own, kept from the model's defaults


def timm_config(cfg: RunConfig, info: TaskInfo, plain_state: State) -> dict[str, Any]:
    """``config.json`` for the run's merged models. The model is rebuilt from it and ``plain_state``
    loaded strictly first, so a config that would not rebuild the export raises RuntimeError here
    instead of misleading a user."""
    model, args = timm_model(cfg, info, pretrained=False)
    if cfg.stem == "small":
        small_stem(model, keep_weights=False)
        args[STEM_ARG] = cfg.stem
    model.load_state_dict(plain_state, strict=True)
    size, chans = cfg.model_size, info.in_chans
    pretrained_cfg = {k: model.pretrained_cfg[k] for k in _DEFAULT_CFG_KEYS if k in model.pretrained_cfg}
    pretrained_cfg |= {"input_size": [chans, size, size], "interpolation": cfg.resize, "mean": [0.5] * chans,
                       "std": [0.5] * chans, "crop_pct": 1.0, "crop_mode": "center", "num_classes": info.num_classes}
    return {"architecture": cfg.model, "num_classes": info.num_classes, "num_features": model.num_features,
            "model_args": args, "pretrained_cfg": pretrained_cfg}


def write_timm_config(run_dir: Path, cfg: RunConfig, info: TaskInfo, plain_state: State) -> Path | None:
    """``run_dir/config.json`` (written to a temporary name and renamed, as every run file), or None,
    with a warning, if the model does not rebuild from timm's arguments: the end of a run still writes
    its summary."""
    try:
        config = timm_config(cfg, info, plain_state)
    except RuntimeError as err:  # load_state_dict's missing/unexpected keys and shape mismatches
        log.warning("%s not written: timm does not rebuild the merged model from its arguments: %s",
                    TIMM_CONFIG, str(err).splitlines()[0])
        return None
    path, tmp = run_dir / TIMM_CONFIG, run_dir / f".{TIMM_CONFIG}.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_exported(directory: str | Path, weights: str = MERGED) -> nn.Module:
    """The merged model ``weights`` of a run directory in eval mode, rebuilt from its config.json
    (its preprocessing in ``model.pretrained_cfg``: ``timm.data.resolve_data_config(model=model)``).
    What plain timm does, plus fedmeld's small stem and registered models."""
    directory = Path(directory)
    config = json.loads((directory / TIMM_CONFIG).read_text())
    args = dict(config["model_args"])
    stem = args.pop(STEM_ARG, "default")
    model = timm.create_model(config["architecture"], pretrained=False,
                              pretrained_cfg_overlay=config["pretrained_cfg"], **args)
    if stem == "small":
        small_stem(model, keep_weights=False)
    model.load_state_dict(load_file(str(directory / weights)), strict=True)
    return model.eval()


def write_hf_peft(model: nn.Module, cfg: RunConfig, directory: Path, server_round: int) -> str | None:
    """``directory`` as an HF peft adapter of ``model`` as it stands (the global model of
    ``server_round``); None when written, else why HF peft cannot hold the run's adapters."""
    if cfg.protocol != "delta":
        return (f"aggregation={cfg.aggregation} with peft={cfg.peft} merges the low-rank updates into the backbone "
                f"(the {cfg.protocol} protocol): there is no adapter on the original backbone")
    try:
        save_hf_peft(model, directory, base_model=cfg.model, metadata={"round": str(server_round)})
    except NotRepresentable as err:
        return f"peft={cfg.peft}: {err}"
    return None
