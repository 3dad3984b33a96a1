"""LoRA for nn.Linear and nn.Conv2d (after loralib / minLoRA).

``y = W x + (alpha / r) * B (A x)`` with B zero-initialised, so an adapted model
starts out computing exactly what the base model computes. The wrappers subclass
the base layer and take over its ``weight``/``bias`` Parameter objects, so the
base weights keep their state-dict names and only ``lora_A``/``lora_B`` are new.

Speed: with a frozen base, LoRA saves the weight-gradient GEMM of full
fine-tuning but the naive side path ``B(A x)`` adds several skinny, memory-bound
passes over x and dY (forward products, their gradients, add, scale) that eat the
saving. ``LoRALinear`` therefore trains through ``MergedLoRALinear`` (one GEMM
through ``W + s B A``; see there). ``LoRAConv2d`` keeps the two-conv side path:
the same trick needs conv weight-gradient kernels for dA, and no target model of
ours (ViT, ConvNeXt MLPs) has a conv LoRA layer to gain from it.

Frozen-A LoRA (``PeftConfig.lora_freeze_a``): A is regenerated from
``lora_seed`` and the module name, so it never travels; only B trains, and the
backward pass keeps just ``x A^T`` (rank x tokens) instead of x.
"""

from __future__ import annotations

import logging
import math
import zlib
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import PeftConfig
from .head import classifier_names, in_head
from .registry import register_adapter

log = logging.getLogger(__name__)


class LoRALayer:
    """Mixin holding what LoRALinear and LoRAConv2d share.

    Subclasses list it before the torch layer so ``super().forward`` is the base
    layer's forward, and implement ``_lora_path`` (x -> B A x, unscaled).
    """

    weight: nn.Parameter
    lora_A: nn.Parameter  # (r, *weight.shape[1:])
    lora_B: nn.Parameter  # (out, r)

    def _init_lora(self, rank: int, alpha: float, dropout: float) -> None:
        self.rank = rank
        self.lora_alpha = alpha
        self.scaling = alpha / rank
        self.lora_dropout = dropout  # a float, not a module: no copy of x when 0
        self.fast = True  # LoRALinear: train through the merged weight (False: naive side path)
        self.reset_lora()

    def reset_lora(self) -> None:
        """(Re)create A (kaiming-uniform) and B (zeros) next to ``weight``."""
        w = self.weight
        self.lora_A = nn.Parameter(w.new_empty(self.rank, *w.shape[1:]))
        self.lora_B = nn.Parameter(w.new_zeros(w.shape[0], self.rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @torch.no_grad()
    def freeze_a(self, seed: int) -> None:
        """Regenerate A from ``seed`` (on the CPU, so every device agrees) and freeze it; only B trains."""
        a = torch.empty(self.lora_A.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
        self.lora_A.copy_(a)
        self.lora_A.requires_grad_(False)

    def _adopt(self, base: nn.Module) -> LoRALayer:
        """Take over ``base``'s weight/bias objects; LoRA params move to their device/dtype."""
        self.weight, self.bias = base.weight, base.bias
        self.reset_lora()
        self.train(base.training)
        return self

    def _lora_path(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if self.merged:
            return y
        if self.lora_dropout:
            x = F.dropout(x, self.lora_dropout, self.training)
        return y + self.scaling * self._lora_path(x)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` shaped like ``weight`` (for conv: the equivalent kernel)."""
        return (self.scaling * (self.lora_B @ self.lora_A.flatten(1))).view_as(self.weight)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the LoRA delta into ``weight``; forward then skips the side path.

        A no-op when already merged, so merging a whole model twice is safe.
        While merged, lora_A/lora_B get no gradients: merge for inference/export.
        """
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` (exact up to float rounding); a no-op when not merged."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.lora_alpha}, merged={self.merged}"


class LoRALinear(LoRALayer, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha, dropout)

    @classmethod
    def from_module(cls, module: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Wrap ``module``, sharing its weight/bias Parameters (built on meta: no copy)."""
        new = cls(module.in_features, module.out_features, module.bias is not None,
                  rank=rank, alpha=alpha, dropout=dropout, device="meta")
        return new._adopt(module)

    def _lora_path(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        base_frozen = not (self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if not self.fast or self.merged or (self.lora_dropout and self.training) or not base_frozen:
            return super().forward(x)
        # Compute in the autocast dtype, as F.linear would: no float32 copies of x or W.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        grad = torch.is_grad_enabled()
        return MergedLoRALinear.apply(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, dtype,
                                      grad and self.lora_A.requires_grad, grad and self.lora_B.requires_grad)


class MergedLoRALinear(torch.autograd.Function):
    """``y = x (W + s B A)^T + b`` with W and b frozen, in one GEMM as in full fine-tuning.

    With ``h = x A^T`` and ``g = dY B``: dX = dY (W + s B A), dB = s dY^T h,
    dA = s g^T x, so backward reads dY twice and x once beyond the dX GEMM, and
    saves x only when A trains (frozen A: just h, rank x tokens). Casts to the
    compute dtype happen inside, not as autograd nodes: in eager mode every node
    costs CPU time that a small model's step cannot hide.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dtype: torch.dtype, grad_A: bool, grad_B: bool) -> Tensor:
        a, b, x_c = lora_A.to(dtype), lora_B.to(dtype), x.to(dtype)
        merged = torch.addmm(weight.to(dtype), b, a, alpha=scaling)
        x2 = x_c.reshape(-1, x_c.shape[-1])
        h = x2 @ a.t() if grad_B else None
        ctx.save_for_backward(merged, b if grad_A else None, x2 if grad_A else None, h)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.lora_dtype = scaling, x.shape, x.dtype, lora_A.dtype
        return F.linear(x_c, merged, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, dy: Tensor):
        merged, b, x2, h = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).to(merged.dtype)
        dx = (dy2 @ merged).view(ctx.x_shape).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        d_A = ((dy2 @ b).t() @ x2).to(ctx.lora_dtype).mul_(ctx.scaling) if x2 is not None else None
        d_B = (dy2.t() @ h).to(ctx.lora_dtype).mul_(ctx.scaling) if h is not None else None
        return dx, None, None, d_A, d_B, None, None, None, None


class LoRAConv2d(LoRALayer, nn.Conv2d):
    """A is a conv with the layer's kernel/stride/padding/dilation, B a 1x1 projection.

    Only ``groups=1`` with zero padding: then ``B * (A * x) == (B A) * x`` and
    ``merge`` is exact.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 device=None, dtype=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           bias=bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha, dropout)

    @classmethod
    def from_module(cls, module: nn.Conv2d, rank: int, alpha: float, dropout: float = 0.0) -> LoRAConv2d:
        """Wrap ``module``, sharing its weight/bias Parameters (built on meta: no copy)."""
        reason = unsupported_reason(module)
        if reason:
            raise ValueError(f"LoRAConv2d cannot wrap this conv: {reason}")
        new = cls(module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                  module.dilation, module.bias is not None, rank=rank, alpha=alpha, dropout=dropout,
                  device="meta")
        return new._adopt(module)

    def _lora_path(self, x: Tensor) -> Tensor:
        h = F.conv2d(x, self.lora_A, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.lora_B[:, :, None, None])


_WRAPPERS: dict[type[nn.Module], type[LoRALayer]] = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` can't be LoRA-wrapped, or None if it can.

    Subclasses (timm's Conv2dSame, an existing LoRA layer, ...) are refused
    because the wrapper replaces their forward.
    """
    if type(module) not in _WRAPPERS:
        return f"{type(module).__name__} is not exactly nn.Linear/nn.Conv2d"
    if isinstance(module, nn.Conv2d) and module.groups > 1:
        return f"grouped/depthwise conv (groups={module.groups})"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


# Per-family defaults, keyed by timm class name (no timm import needed). Patterns
# are matched as name suffixes, so "attn.proj" skips ViT's patch_embed.proj and
# "layer*.conv1" keeps ResNet's stem conv out (LoRA goes inside residual blocks).
FAMILY_TARGETS: dict[str, list[str]] = {
    "VisionTransformer": ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"],
    "ConvNeXt": ["mlp.fc1", "mlp.fc2"],
    "ResNet": ["layer*.conv1", "layer*.conv2", "layer*.conv3"],
    "EfficientNet": ["conv_pw", "conv_pwl"],  # pointwise only; conv_dw is depthwise
}


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear/Conv2d outside the classifier head, by qualified name."""
    heads = classifier_names(model)
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not in_head(name, heads)}


def default_target_modules(model: nn.Module) -> list[str]:
    """Target patterns for ``model``'s timm family; fallback: every Linear/Conv2d but the head."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILY_TARGETS:
            return list(FAMILY_TARGETS[cls.__name__])
    return list(_candidates(model))


def matches(name: str, patterns: list[str]) -> bool:
    """Exact name, ``.pattern`` suffix, or fnmatch (``blocks.*.attn.qkv``)."""
    return any(name == p or name.endswith("." + p) or fnmatchcase(name, p) for p in patterns)


def module_seed(seed: int, name: str) -> int:
    """A per-module seed that every process derives alike (``hash()`` is salted per process)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def inject_lora(model: nn.Module, patterns: list[str], rank: int, alpha: float, dropout: float = 0.0,
                frozen_a_seed: int | None = None) -> list[str]:
    """Replace matching layers in place with LoRA wrappers; return the wrapped names.

    With ``frozen_a_seed``, each A is regenerated from it and the module name, and frozen.
    """
    candidates = _candidates(model)
    wrapped = []
    for name, module in candidates.items():
        if not matches(name, patterns):
            continue
        reason = unsupported_reason(module)
        if reason:
            log.info("LoRA: skipping %s: %s", name, reason)
            continue
        parent_name, _, child = name.rpartition(".")
        lora = _WRAPPERS[type(module)].from_module(module, rank, alpha, dropout)
        if frozen_a_seed is not None:
            lora.freeze_a(module_seed(frozen_a_seed, name))
        setattr(model.get_submodule(parent_name), child, lora)
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"LoRA target_modules {patterns} matched no wrappable nn.Linear/nn.Conv2d; "
                         f"available: {list(candidates)[:12]}")
    return wrapped


@register_adapter("lora")
def apply_lora(model: nn.Module, cfg: PeftConfig) -> None:
    patterns = cfg.target_modules or default_target_modules(model)
    inject_lora(model, patterns, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                frozen_a_seed=cfg.lora_seed if cfg.lora_freeze_a else None)
