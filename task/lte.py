"""LTE's local training: the LoRA heads of ``peft/lte.py`` trained by the ordinary loop of
``task/engine.py``, with a merge step every ``lte-merge-every`` optimizer steps and once at the end
(optionally dropping the heads' AdamW moments at each merge: ``lte-reset-moments``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from fedmeld.peft.lte import lte_layers, merge_lte, reset_lte
from fedmeld.task.config import RunConfig
from fedmeld.task.data import Split, TaskInfo
from fedmeld.task.engine import Inputs, adamw, train
from fedmeld.task.schedule import lr_at


def lora_heads(cfg: RunConfig) -> int:
    """LoRA heads per wrapped layer: lte-heads for LTE, one for exact aggregation."""
    return cfg.lte_heads if cfg.peft == "lte" else 1


def for_heads(data: Split, batch_size: int, heads: int) -> Split:
    """Drop the few samples that would leave a last batch not divisible by the heads."""
    extra = (len(data) % batch_size) % heads
    return data.subset(range(len(data) - extra)) if extra else data


def forget_heads(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Drop the optimizer's state (moments, step count) of every head factor: they restart from zero."""
    for layer in lte_layers(model).values():
        optimizer.state.pop(layer.lora_A, None)
        optimizer.state.pop(layer.lora_B, None)


@contextmanager
def merge_every(model: nn.Module, steps: int, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """A merge step before every ``steps``-th training forward pass after the first, i.e. right
    after each ``steps``-th optimizer step, without a hook in the training loop. With
    ``optimizer``, the heads' optimizer state is dropped at each merge."""
    count = 0

    def hook(module: nn.Module, args: tuple) -> None:
        nonlocal count
        if module.training:
            if count and count % steps == 0:
                merge_lte(module)
                if optimizer is not None:
                    forget_heads(optimizer, module)
            count += 1

    handle = model.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def train_lte(model: nn.Module, data: Split, info: TaskInfo, cfg: RunConfig, *, epochs: int,
              device: torch.device, seed: int, server_round: int = 1, reset: bool = True,
              merge: bool = True) -> dict[str, float]:
    """``task.engine.train`` through the heads at the round's learning rates, merging on the
    schedule and once at the end. ``reset`` re-draws the heads first; ``merge=False`` never merges
    (a plain multi-head LoRA)."""
    if reset:
        reset_lte(model, torch.Generator().manual_seed(seed))
    data = for_heads(data, cfg.batch_size, lora_heads(cfg))
    model.to(device)
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], cfg.lr, cfg.weight_decay)
    forget = optimizer if merge and cfg.lte_reset_moments else None
    with merge_every(model, cfg.lte_merge_every, forget) if merge else nullcontext():
        stats = train(model, data, info, epochs=epochs, batch_size=cfg.batch_size, lr=cfg.lr,
                      weight_decay=cfg.weight_decay, device=device, seed=seed, inputs=Inputs.of(cfg),
                      optimizer=optimizer, lr_at=lambda epoch: lr_at(cfg, server_round, epoch),
                      precision=cfg.precision)
    if merge:
        merge_lte(model)
    return stats
