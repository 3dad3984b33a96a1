"""LoRA for nn.Linear and nn.Conv2d (after loralib / minLoRA).

``y = W x + (alpha / r) * B (A x)`` with B zero-initialised, so an adapted model
starts out computing exactly what the base model computes. The wrappers subclass
the base layer and take over its ``weight``/``bias`` Parameter objects, so the
base weights keep their state-dict names and only ``lora_A``/``lora_B`` are new.

Speed: with a frozen base, LoRA saves the weight-gradient GEMM of full
fine-tuning but the naive side path ``B(A x)`` adds several skinny, memory-bound
passes over x and dY (forward products, their gradients, add, scale) that eat the
saving. ``LoRALinear`` therefore trains through ``MergedLoRALinear`` (one GEMM
through ``W + s B A``; see there), with the compute-dtype copy of the frozen W
kept between steps (``LoRALinear.frozen_casts``), and each timm MLP's GELU folded
into its LoRA fc2 (``recompute_activations``: the GELU output is recomputed in backward,
not kept; ``PeftConfig.lora_recompute_act``). ``LoRAConv2d`` keeps the
two-conv side path: the same trick needs conv weight-gradient kernels for dA, and
no target model of ours (ViT, ConvNeXt MLPs) has a conv LoRA layer to gain from it.

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
from .classifier import classifier_names, in_classifier
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
        self.folded = False

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
        if self.folded:
            return y
        if self.lora_dropout:
            x = F.dropout(x, self.lora_dropout, self.training)
        return y + self.scaling * self._lora_path(x)

    def delta_weight(self) -> Tensor:
        """``scaling * B @ A`` shaped like ``weight`` (for conv: the equivalent kernel)."""
        return (self.scaling * (self.lora_B @ self.lora_A.flatten(1))).view_as(self.weight)

    @torch.no_grad()
    def fold(self) -> None:
        """Fold the LoRA delta into ``weight``; forward then skips the side path.

        A no-op when already folded, so folding a whole model twice is safe.
        While folded, lora_A/lora_B get no gradients: fold for inference/export.
        """
        if not self.folded:
            self.weight.add_(self.delta_weight())
            self.folded = True

    @torch.no_grad()
    def unfold(self) -> None:
        """Undo ``fold`` (exact up to float rounding); a no-op when not folded."""
        if self.folded:
            self.weight.sub_(self.delta_weight())
            self.folded = False

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.lora_alpha}, folded={self.folded}"


class LoRALinear(LoRALayer, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_lora(rank, alpha, dropout)
        self._casts: tuple[tuple, tuple[Tensor | None, ...]] | None = None  # see frozen_casts
        self.register_module("input_act", None)  # a GELU folded in from the layer before: recompute_activations
        self.input_act_mode: str | None = None  # its F.gelu ``approximate``

    @classmethod
    def from_module(cls, module: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
        """Wrap ``module``, sharing its weight/bias Parameters (built on meta: no copy)."""
        new = cls(module.in_features, module.out_features, module.bias is not None,
                  rank=rank, alpha=alpha, dropout=dropout, device="meta")
        return new._adopt(module)

    def _lora_path(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.lora_A), self.lora_B)

    def frozen_casts(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``weight``, ``bias`` and, when frozen, ``lora_A`` in ``dtype`` (None where absent or trainable).

        A frozen base is cast once and reused: re-casting every step re-reads the float32
        weight (4 bytes/param) and launches a kernel per tensor, and a small model's eager
        step is bound by such launches. The price is the copy itself, held between steps
        (2 bytes/param in bf16: 0.17 GiB for ViT-B/16). The cache is keyed on each
        tensor's storage and version counter, so fold/unfold, ``load_state_dict``, optimizer
        steps and ``.to()`` all invalidate it; only writes through ``.data`` escape it.
        Traced (torch.compile) and inference-mode calls cast afresh: the compiler fuses the
        casts, and inference tensors must not leak into a later training step.
        """
        a = None if self.lora_A.requires_grad else self.lora_A
        sources = (self.weight, self.bias, a)
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return tuple(None if t is None else t.to(dtype) for t in sources)  # type: ignore[return-value]
        key = (dtype, *(None if t is None else (t.data_ptr(), t._version) for t in sources))
        if self._casts is None or self._casts[0] != key:
            with torch.no_grad():
                self._casts = key, tuple(None if t is None else t.to(dtype) for t in sources)
        return self._casts[1]  # type: ignore[return-value]

    def _apply(self, fn, recurse: bool = True):
        self._casts = None  # a move/cast of the module frees the old copies at once
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def fold(self) -> None:
        self._casts = None
        super().fold()

    @torch.no_grad()
    def unfold(self) -> None:
        self._casts = None
        super().unfold()

    def fold_input_act(self, act: nn.Module) -> None:
        """Apply ``act`` (a GELU) to this layer's input inside the layer (see ``recompute_activations``)."""
        mode = gelu_mode(act)
        if mode is None:
            raise ValueError(f"LoRALinear can fold only a GELU activation, got {type(act).__name__}")
        self.input_act, self.input_act_mode = act, mode

    def forward(self, x: Tensor) -> Tensor:
        weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
        if (not self.fast or self.folded or weight.requires_grad or (bias is not None and bias.requires_grad)
                or (self.lora_dropout and self.training)):
            return super().forward(x if self.input_act is None else self.input_act(x))
        # Compute in the autocast dtype, as F.linear would: no float32 copies of x or W.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        w, b, a = self.frozen_casts(dtype)
        return MergedLoRALinear.apply(x, w, b, lora_A if a is None else a, lora_B, self.scaling, dtype,
                                      self.input_act_mode, torch.is_grad_enabled())


class MergedLoRALinear(torch.autograd.Function):
    """``y = act(x) (W + s B A)^T + b`` with W and b frozen, in one GEMM as in full fine-tuning.

    With ``h = act(x) A^T`` and ``g = dY B``: dX = act'(x) * dY (W + s B A), dB = s dY^T h,
    dA = s g^T act(x), so backward reads dY twice and act(x) once beyond the dX GEMM.
    Activations kept: act(x) only when A trains (frozen A: just h, rank x tokens); with an
    ``act`` (GELU, folded in by ``recompute_activations``) x instead, which the GELU needed anyway,
    and act(x) is recomputed in backward (one elementwise pass). A Triton kernel that applied the
    GELU inside the dA GEMM instead saved up to 90 us of GPU time per call on an H100 but cost
    ~190 us more CPU time per call, and eager steps are often CPU-bound: not used.

    Written for eager mode, where a step is often CPU-bound and every op costs launch time:
    ``weight``/``bias`` (and a frozen A) arrive already cast (LoRALinear.frozen_casts), the
    scale rides in the GEMMs' alpha, and on CUDA the GEMMs write each gradient in the dtype
    autograd wants (float32 for the LoRA factors and for an input autocast had to cast),
    which saves a cast kernel and its launch per gradient. Traced (torch.compile), the
    compiler fuses those casts itself, so the plain ops are used.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                scaling: float, dtype: torch.dtype, act: str | None, grad: bool) -> Tensor:
        # needs_input_grad ignores no_grad/inference mode: ``grad`` (grad mode at the call) does not.
        grad_x, grad_A, grad_B = (grad and ctx.needs_input_grad[i] for i in (0, 3, 4))
        a = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)
        b = lora_B if lora_B.dtype == dtype else lora_B.to(dtype)
        ctx.x_dtype = x.dtype  # dX must come back in the input's dtype, also when autocast casts it here
        if x.dtype != dtype:
            x = x.to(dtype)
        x_in = x.reshape(-1, x.shape[-1])
        x2 = x_in if act is None else F.gelu(x_in, approximate=act)
        h = F.linear(x2, a) if grad_B else None
        merged = torch.addmm(weight, b, a, alpha=scaling)
        keep = x_in if act is not None and (grad_x or grad_A) else (x2 if grad_A else None)
        # lora_A/lora_B themselves only tell backward their dtype and shape (no copies kept).
        ctx.save_for_backward(merged if grad_x else None, a, b, keep, h, lora_A, lora_B)
        ctx.scaling, ctx.act, ctx.x_shape = scaling, act, x.shape
        ctx.eager_cuda = x.is_cuda and not torch.compiler.is_compiling()
        y = F.linear(x2, merged, bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: Tensor):
        merged, a, b, kept, h, lora_A, lora_B = ctx.saved_tensors
        s, act, eager_cuda = ctx.scaling, ctx.act, ctx.eager_cuda
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = d_A = d_B = None
        if merged is not None:
            if eager_cuda and act is None and ctx.x_dtype == torch.float32 != merged.dtype:
                dx = torch.mm(dy2, merged, out_dtype=torch.float32)
            else:
                dx = dy2.mm(merged)
            if act is not None:
                dx = torch.ops.aten.gelu_backward(dx, kept, approximate=act)
            dx = dx.view(ctx.x_shape)
        if ctx.needs_input_grad[3]:
            g = dy2.mm(b)
            d_A = _scaled_mm(lora_A, a, g.t(), kept if act is None else F.gelu(kept, approximate=act), s, eager_cuda)
        if h is not None:
            d_B = _scaled_mm(lora_B, b, dy2.t(), h, s, eager_cuda)
        return dx, None, None, d_A, d_B, None, None, None, None


def _scaled_mm(param: Tensor, like: Tensor, m1: Tensor, m2: Tensor, scaling: float, eager_cuda: bool) -> Tensor:
    """``scaling * m1 @ m2``, the gradient of ``param`` (``like``: its compute-dtype copy).

    Eager on CUDA, a float32 parameter's gradient leaves the GEMM in float32 (addmm's
    ``out_dtype``); elsewhere in ``like``'s dtype, and autograd casts it. ``beta=0``: the first
    argument only gives the output's shape and dtype, it is never read.
    """
    if eager_cuda and param.dtype == torch.float32 != like.dtype:
        return torch.addmm(param, m1, m2, beta=0, alpha=scaling, out_dtype=torch.float32)
    return torch.addmm(like, m1, m2, beta=0, alpha=scaling)


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
            if isinstance(m, (nn.Linear, nn.Conv2d)) and not in_classifier(name, heads)}


def default_target_modules(model: nn.Module) -> list[str]:
    """Target patterns for ``model``'s timm family; fallback: every Linear/Conv2d but the head."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILY_TARGETS:
            return list(FAMILY_TARGETS[cls.__name__])
    return list(_candidates(model))


def matches(name: str, patterns: list[str]) -> bool:
    """Exact name, ``.pattern`` suffix, or fnmatch (``blocks.*.attn.qkv``)."""
    return any(name == p or name.endswith("." + p) or fnmatchcase(name, p) for p in patterns)


_GELU_BY_NAME = {"GELU": "none", "GELUTanh": "tanh"}  # timm.layers' GELU modules (no timm import needed)


def gelu_mode(act: nn.Module) -> str | None:
    """``F.gelu``'s ``approximate`` for a GELU module (torch's or timm's); None for anything else."""
    if isinstance(act, nn.GELU):
        return act.approximate
    return _GELU_BY_NAME.get(type(act).__name__)


def recompute_activations(model: nn.Module) -> list[str]:
    """Move the GELU of each timm ``Mlp`` into its LoRA ``fc2``; return the MLPs' names.

    Why: in ``fc2(gelu(fc1(x)))`` the GELU keeps its input for backward and a LoRA fc2 with a
    trainable A keeps the GELU's output (for dA): two tokens x hidden activations per block.
    Folded, fc2 keeps only the GELU's input and recomputes the output in backward, one
    elementwise pass for about a fifth of a ViT's activation memory. The math is unchanged
    (same ops, same order); state-dict keys too (GELU has no parameters). Only MLPs whose
    ``drop1`` is a no-op and ``norm`` an Identity, so nothing else sits between act and fc2.
    """
    folded = []
    for name, mlp in model.named_modules():
        if type(mlp).__name__ != "Mlp" or not isinstance(getattr(mlp, "fc2", None), LoRALinear):
            continue
        act, drop, norm = mlp.act, getattr(mlp, "drop1", None), getattr(mlp, "norm", None)
        noop_drop = isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and drop.p == 0)
        if gelu_mode(act) is None or not noop_drop or not isinstance(norm, nn.Identity):
            continue
        mlp.fc2.fold_input_act(act)
        mlp.act = nn.Identity()
        folded.append(name)
    return folded


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


@register_adapter("lora", wraps_weights=True, help="LoRA on the target layers (lora-rank, lora-alpha, target-modules)")
def apply_lora(model: nn.Module, cfg: PeftConfig) -> None:
    patterns = cfg.target_modules or default_target_modules(model)
    inject_lora(model, patterns, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                frozen_a_seed=cfg.lora_seed if cfg.lora_freeze_a else None)
    if cfg.lora_recompute_act:
        recompute_activations(model)
