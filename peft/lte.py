"""Multi-head LoRA for LTE ("LoRA-the-Explorer", Huh et al. 2024): H heads, one shared base.

Each wrapped layer keeps one base ``weight`` and H pairs of factors, ``lora_A`` (H, r, *in) and
``lora_B`` (H, out, r). In training the batch is cut into H consecutive micro-batches and head h
adds ``s * B_h A_h x`` to micro-batch h, all heads in one batched op (``bmm`` for Linear, a grouped
conv for Conv2d), so each head is a virtual worker that sees only its own data. ``merge`` folds
the heads' mean update into the base:

- "resetless" (the authors' default): the base gets the mean over heads of each head's change in
  s·B·A since the last merge; A and B keep training. A snapshot of the factors at the last merge
  is subtracted in the forward pass, so right after a merge every head computes the same merged
  weight. The merge is exact, and the changes telescope: the total change since ``reset_heads``
  is mean_h s·B_h·A_h, a rank <= H·r product, however many merges happened.
- "reinit" (ReLoRA-style): the base gets mean_h s·B_h·A_h, then B = 0 and A is re-drawn. The
  merged factors are kept in a ledger, so the change since ``reset_heads`` is still known as
  low-rank factors (rank grows by H·r per merge). The optimizer's moments for A and B are not
  reset: LTE's resetless default avoids that question altogether.

In eval mode a layer computes with base + the heads' pending mean update, i.e. the model a merge
would give, so evaluation needs no merge and does not depend on the batch size.

Everything else that trains (the "dense" parameters: norms, biases, embeddings, the classifier) is
one shared copy trained on the whole batch, not H copies averaged at merge. For plain SGD that is
the same as averaging per-head copies after every step; it needs no Python loop over heads and no
H-fold memory, and across a federation the dense parameters are averaged between clients anyway.

Conv2d is supported for ``groups=1`` and zero padding (as in ``peft.lora``): then a conv with A
followed by a 1x1 conv with B equals a conv with the kernel B·A, so merges are exact.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classifier import classifier_names, in_classifier
from .config import MERGE_MODES, PeftConfig
from .lora import matches, unsupported_reason
from .registry import register_adapter

Factors = tuple[Tensor, Tensor]  # (B (out, R), A (R, *in)) with B @ A.flatten(1) shaped like weight.flatten(1)


class MultiLoRALayer:
    """What MultiLoRALinear and MultiLoRAConv2d share; listed before the torch layer."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    lora_A: nn.Parameter  # (H, r, *weight.shape[1:])
    lora_B: nn.Parameter  # (H, out, r)
    snap_A: Tensor  # the factors at the last resetless merge (zeros before it)
    snap_B: Tensor

    def _init_heads(self, heads: int, rank: int, alpha: float, mode: str) -> None:
        if mode not in MERGE_MODES:
            raise ValueError(f"LTE merge mode {mode!r}; valid: {', '.join(MERGE_MODES)}")
        self.heads, self.rank, self.lora_alpha, self.mode = heads, rank, alpha, mode
        self.scaling = alpha / rank
        w = self.weight
        self.lora_A = nn.Parameter(w.new_empty(heads, rank, *w.shape[1:]))
        self.lora_B = nn.Parameter(w.new_zeros(heads, w.shape[0], rank))
        self.register_buffer("snap_A", torch.zeros_like(self.lora_A), persistent=False)
        self.register_buffer("snap_B", torch.zeros_like(self.lora_B), persistent=False)
        self.reset_heads()

    @torch.no_grad()
    def reset_heads(self, generator: torch.Generator | None = None) -> None:
        """Fresh heads (A uniform as LoRA's kaiming init, B = 0), no snapshot, empty ledger."""
        bound = 1 / math.sqrt(self.weight[0].numel())
        a = torch.empty(self.lora_A.shape).uniform_(-bound, bound, generator=generator)
        self.lora_A.copy_(a)
        self.lora_B.zero_()
        self.snap_A.zero_()
        self.snap_B.zero_()
        self.has_snapshot = False
        self.ledger: list[Factors] = []

    def _live(self) -> tuple[Tensor, Tensor]:
        """Per-head factors of the change since the last merge: (H, out, R'), (H, R', *in)."""
        if not self.has_snapshot:
            return self.lora_B, self.lora_A
        return torch.cat([self.lora_B, -self.snap_B], 2), torch.cat([self.lora_A, self.snap_A], 1)

    def pending_delta(self) -> Tensor:
        """mean_h s·(B_h A_h - snapshot_h): what the next merge adds to ``weight``."""
        b, a = self._live()
        delta = torch.einsum("hor,hri->oi", b, a.flatten(2)) * (self.scaling / self.heads)
        return delta.view_as(self.weight)

    def delta_weight(self) -> Tensor:
        """What eval mode adds to ``weight``: the pending merge (as ``LoRALayer.delta_weight``)."""
        return self.pending_delta()

    @torch.no_grad()
    def merge_step(self, generator: torch.Generator | None = None) -> None:
        """Fold the heads' mean update into ``weight`` (see the module docstring for the modes)."""
        self.weight.add_(self.pending_delta().to(self.weight.dtype))
        if self.mode == "resetless":
            self.snap_A.copy_(self.lora_A)
            self.snap_B.copy_(self.lora_B)
            self.has_snapshot = True
        else:
            ledger = [*self.ledger, self._head_factors()]
            self.reset_heads(generator)
            self.ledger = ledger

    def _head_factors(self) -> Factors:
        """The heads stacked along the rank: (s/H)·[B_1 .. B_H] and [A_1; ..; A_H]."""
        b = self.lora_B.detach().permute(1, 0, 2).reshape(self.weight.shape[0], -1)
        return b * (self.scaling / self.heads), self.lora_A.detach().flatten(0, 1).clone()

    def factors_since_reset(self) -> Factors:
        """Low-rank factors of everything the heads changed since ``reset_heads``, merged or not."""
        parts = [*self.ledger, self._head_factors()]
        return torch.cat([b for b, _ in parts], 1), torch.cat([a for _, a in parts], 0)

    def _check_batch(self, x: Tensor) -> None:
        if x.shape[0] % self.heads:
            raise ValueError(f"LTE: a training batch of {x.shape[0]} does not split into {self.heads} heads; "
                             f"use a batch size divisible by lte-heads")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, heads={self.heads}, rank={self.rank}, alpha={self.lora_alpha}, mode={self.mode}"


class MultiLoRALinear(MultiLoRALayer, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, heads: int, rank: int,
                 alpha: float, mode: str = "resetless", device=None, dtype=None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_heads(heads, rank, alpha, mode)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return F.linear(x, self.weight + self.pending_delta(), self.bias)
        self._check_batch(x)
        b, a = self._live()
        xh = x.reshape(self.heads, -1, x.shape[-1])  # consecutive micro-batches, one per head
        side = torch.bmm(torch.bmm(xh, a.transpose(1, 2)), b.transpose(1, 2))
        return F.linear(x, self.weight, self.bias) + self.scaling * side.reshape(*x.shape[:-1], -1)


class MultiLoRAConv2d(MultiLoRALayer, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, *, heads: int, rank: int, alpha: float, mode: str = "resetless",
                 device=None, dtype=None) -> None:
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           bias=bias, device=device, dtype=dtype)
        self._init_heads(heads, rank, alpha, mode)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return self._conv_forward(x, self.weight + self.pending_delta(), self.bias)
        self._check_batch(x)
        b, a = self._live()
        h, (n, c, hi, wi) = self.heads, x.shape
        # heads into channels, so one grouped conv runs every head on its own micro-batch
        xg = x.reshape(h, n // h, c, hi, wi).transpose(0, 1).reshape(n // h, h * c, hi, wi)
        mid = F.conv2d(xg, a.flatten(0, 1), None, self.stride, self.padding, self.dilation, groups=h)
        out = F.conv2d(mid, b.flatten(0, 1)[:, :, None, None], groups=h)
        side = out.reshape(n // h, h, -1, *out.shape[2:]).transpose(0, 1).reshape(n, -1, *out.shape[2:])
        return self._conv_forward(x, self.weight, self.bias) + self.scaling * side


def _wrap(module: nn.Module, heads: int, rank: int, alpha: float, mode: str) -> MultiLoRALayer:
    """A multi-head wrapper sharing ``module``'s weight/bias Parameters (built on meta: no copy)."""
    kw = dict(heads=heads, rank=rank, alpha=alpha, mode=mode, device="meta")
    if isinstance(module, nn.Conv2d):
        new = MultiLoRAConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.bias is not None, **kw)
    else:
        new = MultiLoRALinear(module.in_features, module.out_features, module.bias is not None, **kw)
    new.weight, new.bias = module.weight, module.bias
    new._init_heads(heads, rank, alpha, mode)  # again, now on the weight's device and dtype
    return new.train(module.training)


def inject_lte(model: nn.Module, heads: int, rank: int, alpha: float, mode: str = "resetless",
               patterns: list[str] | None = None, train_rest: bool = True) -> list[str]:
    """Wrap Linear/Conv2d layers outside the classifier head in place; return the wrapped names.

    ``patterns=None`` wraps every supported layer: LTE trains the whole network through heads.
    Wrapped base weights are frozen; with ``train_rest`` every other parameter trains as a shared
    replica, otherwise the others keep their ``requires_grad`` (e.g. as ``apply_peft`` set it).
    """
    classifiers = classifier_names(model)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or in_classifier(name, classifiers):
            continue
        if (patterns and not matches(name, patterns)) or unsupported_reason(module):
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, _wrap(module, heads, rank, alpha, mode))
        wrapped.append(name)
    if not wrapped:
        raise ValueError(f"LTE: no supported nn.Linear/nn.Conv2d matched {patterns or 'any layer'}")
    if train_rest:
        model.requires_grad_(True)
    for layer in lte_layers(model).values():
        layer.weight.requires_grad_(False)
    return wrapped


def lte_layers(model: nn.Module) -> dict[str, MultiLoRALayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALayer)}


def dense_names(model: nn.Module) -> list[str]:
    """Trainable parameters that are not LoRA factors: trained directly, averaged at merges."""
    return [n for n, p in model.named_parameters() if p.requires_grad and not n.rsplit(".", 1)[-1].startswith("lora_")]


def merge_lte(model: nn.Module) -> None:
    for layer in lte_layers(model).values():
        layer.merge_step()


def reset_lte(model: nn.Module, generator: torch.Generator | None = None) -> None:
    for layer in lte_layers(model).values():
        layer.reset_heads(generator)


@register_adapter("lte", alone=True, wraps_weights=True, updates_backbone=True,
                  help="LTE: the whole network through lte-heads parallel LoRA heads per layer, merged into the "
                       "backbone every lte-merge-every steps (everything else trains directly)")
def apply_lte(model: nn.Module, cfg: PeftConfig) -> None:
    inject_lte(model, cfg.lte_heads, cfg.lora_rank, cfg.lora_alpha, cfg.lte_merge_mode, cfg.target_modules)
