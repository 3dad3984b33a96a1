"""Build the timm backbone with its PEFT adapters, identically on every node.

The backbone never travels: every node rebuilds it from the model name and either the same
pretrained weights or the same seeded random init, so only adapter state has to cross the wire.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import build_model_with_cfg, register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from fedmeld.peft import GaLoreAdamW, PeftConfig, apply_peft, galore_param_groups
from fedmeld.peft.hf import AdapterMismatch, load_hf_peft, read_hf_peft
from fedmeld.peft.lora import matches
from fedmeld.task.config import ConfigError, RunConfig, model_kwargs, peft_method
from fedmeld.task.data import TaskInfo
from fedmeld.task.engine import adamw, cpu_rng
from fedmeld.task.privacy import DPSettings, PrivateOptimizer

log = logging.getLogger(__name__)


_VIT_CFG = {"classifier": "head", "first_conv": "patch_embed.proj"}  # first_conv: timm adapts a file's channels


@register_model
def vit_pico_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A ViT small enough to train from scratch on a CPU: 28-px input in 4-px patches (49 tokens),
    width 64, depth 4. Registered with timm, so ``model=vit_pico_patch4_28`` works in any run."""
    args = dict(img_size=28, patch_size=4, embed_dim=64, depth=4, num_heads=2, mlp_ratio=2.0)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or _VIT_CFG
    return build_model_with_cfg(VisionTransformer, "vit_pico_patch4_28", pretrained, **{**args, **kwargs})


@register_model
def vit_nano_patch4_28(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """vit_pico's GPU-sized sibling: 28-px input in 4-px patches, width 192 (vit_tiny's), depth 6.
    Wide enough that a few low-rank factors per layer weigh far less than the layer."""
    args = dict(img_size=28, patch_size=4, embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0)
    kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or _VIT_CFG
    return build_model_with_cfg(VisionTransformer, "vit_nano_patch4_28", pretrained, **{**args, **kwargs})


class WeightsError(RuntimeError):
    """Pretrained weights that could not be loaded; the message says how to provide them."""


def peft_config(cfg: RunConfig) -> PeftConfig:
    """The run config's adapter keys as a PeftConfig; the resized classifier head always trains."""
    targets = [t.strip() for t in cfg.target_modules.split(",") if t.strip()] or None
    return PeftConfig(method=peft_method(cfg.peft), lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, lora_freeze_a=cfg.aggregator.freeze_lora_a, lora_seed=cfg.seed,
                      vera_rank=cfg.vera_rank, vera_seed=cfg.seed, target_modules=targets,
                      lte_heads=cfg.lte_heads, lte_merge_mode=cfg.lte_merge_mode, bn_stats=cfg.bn_stats)


def is_local(name: str, cfg: RunConfig) -> bool:
    """Adapter tensors that stay on the client (``local-params``): never sent, never averaged."""
    patterns = [p.strip() for p in cfg.local_params.split(",") if p.strip()]
    return bool(patterns) and matches(name, patterns)


def create_backbone(cfg: RunConfig, info: TaskInfo) -> nn.Module:
    """The plain timm model (no adapters), as `timm.create_model` gives it to anyone (with
    ``stem=small``, its stem replaced: ``small_stem``)."""
    kwargs: dict = {}
    if cfg.weights:
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights_file(cfg))})
    else:
        kwargs["pretrained"] = cfg.pretrained
    try:
        model, _ = timm_model(cfg, info, **kwargs)
    except RuntimeError as err:
        if cfg.weights:
            raise WeightsError(f"could not load {cfg.weights} into {cfg.model}: {err}") from err
        raise
    except (OSError, ValueError) as err:  # huggingface_hub's offline and not-found errors derive from these
        if kwargs["pretrained"]:
            raise WeightsError(
                f"could not fetch pretrained weights for {cfg.model} ({type(err).__name__}: {err}). "
                f"Offline, point weights=/path/to/file at a local file, or fill the Hugging Face cache "
                f"and set HF_HUB_OFFLINE=1, or set pretrained=false for random init."
            ) from err
        raise
    if cfg.stem == "small":
        small_stem(model, keep_weights=bool(kwargs["pretrained"]))
    if cfg.init == "torch":
        torch_default_init(model)
    return model


def weights_file(cfg: RunConfig) -> Path:
    """The file ``weights`` names for this run's model: the file itself, or ``DIR/<model>.safetensors``
    when it names a directory (one grid over several models then takes one ``weights=DIR``, as
    ``fedmeld pretrain`` writes them). ``$VAR``s are expanded, so a preset can say where without
    knowing the machine (``weights = "$FEDMELD_PRETRAINED/fractal"``)."""
    path = Path(os.path.expandvars(cfg.weights)).expanduser()
    if "$" in str(path):
        raise WeightsError(f"weights={cfg.weights}: an environment variable in it is not set; export it "
                           f"or give the path itself")
    if path.is_dir():
        candidate = path / f"{cfg.model}.safetensors"
        if not candidate.is_file():
            held = sorted(p.name for p in path.glob("*.safetensors")) or ["no .safetensors file"]
            raise WeightsError(f"weights directory {path} holds no {candidate.name} for model={cfg.model} "
                               f"(it holds {', '.join(held)}); pretrain one (fedmeld pretrain --model {cfg.model} "
                               f"--out {candidate}) or point weights= at a file")
        return candidate
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; set weights= to a .safetensors/.pth file for "
                           f"{cfg.model} (or a directory holding {cfg.model}.safetensors), or weights=\"\" "
                           f"to use pretrained/random init")
    return path


@torch.no_grad()
def torch_default_init(model: nn.Module) -> None:
    """Every conv, linear and norm layer as PyTorch constructs it (``init=torch``), instead of
    timm's init (Kaiming-normal convs, zeroed last BatchNorms, truncated-normal ViT weights). Seeded
    like any random init: the caller's RNG state decides the draw."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
            module.reset_parameters()


def build_model(cfg: RunConfig, info: TaskInfo) -> nn.Module:
    """The backbone with the run's adapters applied and everything else frozen; with ``init-adapter``,
    the adapter's tensors come from that Hugging Face peft directory (on every node, so a client's
    own ``local-params`` start from it too)."""
    with cpu_rng(cfg.seed):  # init draws from the global RNG; the in-process backend builds in threads
        model = apply_peft(create_backbone(cfg, info), peft_config(cfg))
    if cfg.init_adapter:
        load_init_adapter(model, cfg)
    return model


def load_init_adapter(model: nn.Module, cfg: RunConfig) -> None:
    """Load ``init-adapter`` into the adapted ``model``; ConfigError (one line, with the fix) if it
    does not fit the run."""
    try:
        config, tensors = read_hf_peft(cfg.init_adapter)
        kept = load_hf_peft(model, config, tensors, model_name=cfg.model)
    except AdapterMismatch as err:
        raise ConfigError(f"init-adapter={cfg.init_adapter}: {err}") from None
    if kept:
        log.info("init-adapter %s holds no value for %d trained tensors (e.g. %s): they start as the backbone's",
                 cfg.init_adapter, len(kept), kept[0])


@torch.no_grad()
def small_stem(model: nn.Module, keep_weights: bool) -> None:
    """A stem that keeps small inputs large (``stem=small``): a 28 px image reaches ResNet's last
    stage at 4x4 instead of 1x1. ResNet: a 3x3 stride-1 conv and no max-pool (MedMNIST v2's CIFAR-style
    "(28)" ResNets; a deep stem keeps its convs at stride 1); ConvNeXt: a 2x2 stride-2 patchify;
    EfficientNet: the stem conv at stride 1. With pretrained weights (``keep_weights``) a replaced
    kernel is the centre of the pretrained one, else it is initialised as timm initialises convs."""
    if isinstance(getattr(model, "maxpool", None), nn.Module) and hasattr(model, "conv1"):  # timm ResNets
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = _smaller_conv(model.conv1, kernel=3, stride=1, keep_weights=keep_weights)
        else:  # deep stem (resnet10t, resnet*d): its first conv strides
            next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d)).stride = (1, 1)
        model.maxpool = nn.Identity()
    elif isinstance(getattr(model, "stem", None), nn.Sequential) and isinstance(model.stem[0], nn.Conv2d) \
            and model.stem[0].stride == (4, 4):  # ConvNeXt's patchify stem
        model.stem[0] = _smaller_conv(model.stem[0], kernel=2, stride=2, keep_weights=keep_weights)
    elif isinstance(getattr(model, "conv_stem", None), nn.Conv2d):  # EfficientNet, MobileNet
        model.conv_stem.stride = (1, 1)
    else:
        raise ConfigError(f"stem=small is defined for timm's ResNet, ConvNeXt and EfficientNet families, not "
                          f"{type(model).__name__}; use stem=default (ViTs: choose the patch size instead)")


def _smaller_conv(conv: nn.Conv2d, kernel: int, stride: int, keep_weights: bool) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, conv.out_channels, kernel, stride, padding=(kernel - 1) // 2 if stride == 1
                    else 0, bias=conv.bias is not None).to(conv.weight)
    if keep_weights:
        top = (conv.kernel_size[0] - kernel) // 2
        new.weight.copy_(conv.weight[:, :, top:top + kernel, top:top + kernel])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
        if new.bias is not None:
            nn.init.zeros_(new.bias)
    return new


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer | PrivateOptimizer:
    """The client optimizer over what trains; made afresh each round, as clients hold no state.
    With DP-SGD (``dp-clip``) it carries the DP settings, and ``engine.train`` trains privately."""
    if cfg.optimizer == "galore-adamw":
        groups = galore_param_groups(model, cfg.galore_rank, cfg.galore_update_gap, cfg.galore_scale)
        opt = GaLoreAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    settings = DPSettings.of(cfg)
    return opt if settings is None else PrivateOptimizer(opt, settings)


def timm_model(cfg: RunConfig, info: TaskInfo, **kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model`` of the run's architecture, seeded, and the keyword arguments that define
    that architecture (num_classes, in_chans, img_size where the family takes it, model-args): what
    timm needs to rebuild it (``task/export.py``). ``kwargs``: how to load it (pretrained, ...).

    Transformers fix their position embeddings to an input size, so they get the data's; CNNs take
    any size and refuse the keyword."""
    args = {"num_classes": info.num_classes, "in_chans": info.in_chans, **model_kwargs(cfg.model_args)}
    torch.default_generator.manual_seed(cfg.seed)  # the CPU's only: a CUDA generator may be training in another thread
    try:
        sized = {**args, "img_size": cfg.model_size}
        return timm.create_model(cfg.model, **sized, **kwargs), sized
    except TypeError as err:
        if "img_size" not in str(err):
            raise
    torch.default_generator.manual_seed(cfg.seed)
    return timm.create_model(cfg.model, **args, **kwargs), args
