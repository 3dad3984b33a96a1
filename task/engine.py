"""Local training and evaluation loops: plain PyTorch, shared by clients and the server.

Data stays a uint8 tensor until a batch is on the device, where it is scaled to [-1, 1] (MedMNIST's
own normalisation, mean 0.5 and std 0.5), resized and augmented (``Inputs``); that keeps
host-to-device traffic at a byte per pixel and needs no DataLoader workers. Every random choice a
training call makes (batch order, augmentation, dropout) comes from its ``seed``, never from what
ran before it in the process: clients that share a process compute what they would alone.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.evaluator import getACC, getAUC
from torch import nn

from fedmeld.task.config import AUGMENTS, PRECISIONS, RESIZE_MODES, RunConfig
from fedmeld.task.data import Split, TaskInfo



@dataclass
class EvalResult:
    loss: float
    accuracy: float
    auc: float
    scores: np.ndarray  # (N, num_classes) probabilities, what medmnist's Evaluator takes


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} but CUDA is not available here; use device=auto or cpu")
    return torch.device(name)


def _autocast(device: torch.device, precision: str):
    """bf16 autocast on CUDA (``precision="bf16"``), where it is fast and safe for training; full
    precision on the CPU or with ``precision="fp32"``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and precision == "bf16" \
        else nullcontext()


@dataclass(frozen=True)
class Inputs:
    """How uint8 images become model inputs on the device: scaled to [-1, 1], resized to ``size``
    (0: as stored) with ``resize`` (MedMNIST's "(224)" benchmark rows upsample with nearest), and in
    training augmented (``augment``): none; flip (horizontal, p = 0.5); light (flip, rotation within
    ±10°, shift within ±1/8 of the side). Augmentation draws its parameters from a CPU generator,
    so CPU and GPU runs draw the same ones."""

    size: int = 0
    resize: str = "bilinear"
    augment: str = "none"

    @classmethod
    def of(cls, cfg: RunConfig) -> Inputs:
        return cls(cfg.input_size, cfg.resize, cfg.augment)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES or self.augment not in AUGMENTS:
            raise ValueError(f"Inputs: resize {self.resize!r} (valid: {RESIZE_MODES}), augment {self.augment!r} "
                             f"(valid: {AUGMENTS})")

    def __call__(self, images: torch.Tensor, device: torch.device,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """(N, C, H, W) uint8 on the host -> (N, C, size, size) floats on ``device``; ``generator``
        (training only) drives the augmentation."""
        x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
        if self.size and self.size != x.shape[-1]:
            corners = {} if self.resize == "nearest" else {"align_corners": False}
            x = F.interpolate(x, size=(self.size, self.size), mode=self.resize, **corners)
        if generator is not None and self.augment != "none":
            x = _augment(x, self.augment, generator)
        return x


def _augment(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    flip = torch.rand(n, generator=generator) < 0.5
    if kind == "flip":
        return torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.25  # ±1/8 of the side, in [-1, 1] units
    sign = 1 - 2 * flip.float()
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, info: TaskInfo) -> torch.Tensor:
    if info.multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels[:, 0])


def train(model: nn.Module, data: Split, info: TaskInfo, *, epochs: int, batch_size: int, lr: float,
          weight_decay: float, device: torch.device, seed: int, inputs: Inputs = Inputs(),
          prox_mu: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
          lr_at: Callable[[int], float] | None = None, precision: str = "bf16") -> dict[str, float]:
    """Train the parameters that require grad (with ``optimizer``, default AdamW); returns loss,
    accuracy, seconds and peak memory.

    ``prox_mu > 0`` adds FedProx's (mu/2)·||w - w_start||², which keeps a client near the global
    model it started the round from. ``lr_at(epoch)`` sets the learning rate of each local epoch
    (a schedule, ``task/schedule.py``); without it every epoch uses ``lr``. The global RNG (dropout)
    is reseeded from ``seed`` for the call and restored afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _train(model, data, info, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      device=device, seed=seed, inputs=inputs, prox_mu=prox_mu, optimizer=optimizer, lr_at=lr_at,
                      precision=precision)


def _train(model: nn.Module, data: Split, info: TaskInfo, *, epochs: int, batch_size: int, lr: float,
           weight_decay: float, device: torch.device, seed: int, inputs: Inputs, prox_mu: float,
           optimizer: torch.optim.Optimizer | None, lr_at: Callable[[int], float] | None,
           precision: str) -> dict[str, float]:
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if prox_mu else []
    opt = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    aug = torch.Generator().manual_seed(seed + 1) if inputs.augment != "none" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, total_loss, correct, seen = time.perf_counter(), 0.0, 0, 0
    for epoch in range(epochs):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch)
        order = torch.randperm(len(data), generator=gen)
        # drop a last batch of one: BatchNorm cannot train on it
        batches = [b for b in order.split(batch_size) if len(b) > 1 or len(order) == 1]
        for idx in batches:
            x, y = inputs(data.images[idx], device, aug), data.labels[idx].to(device)
            with _autocast(device, precision):
                logits = model(x)
            task_loss = loss = loss_fn(logits, y, info)
            if prox_mu:
                loss = loss + prox_mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += task_loss.item() * len(idx)
            correct += _num_correct(logits, y, info)
            seen += len(idx)
    return {
        "train_loss": total_loss / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "train_seconds": time.perf_counter() - start,
        "peak_memory_mb": _peak_memory_mb(device),
        "samples_seen": seen,
    }


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, info: TaskInfo, *, device: torch.device,
             batch_size: int = 256, inputs: Inputs = Inputs(), precision: str = "bf16") -> EvalResult:
    """Loss plus ACC and AUC computed exactly as medmnist's Evaluator computes them."""
    model.to(device).eval()
    scores, total_loss = [], 0.0
    for start in range(0, len(data), batch_size):
        x = inputs(data.images[start:start + batch_size], device)
        y = data.labels[start:start + batch_size].to(device)
        with _autocast(device, precision):
            logits = model(x).float()
        total_loss += loss_fn(logits, y, info).item() * len(y)
        scores.append((torch.sigmoid(logits) if info.multi_label else logits.softmax(-1)).cpu())
    y_score = torch.cat(scores).numpy()
    y_true = data.labels.numpy()
    return EvalResult(total_loss / max(len(data), 1), medmnist_acc(y_true, y_score, info),
                      medmnist_auc(y_true, y_score, info), y_score)


def medmnist_acc(y_true: np.ndarray, y_score: np.ndarray, info: TaskInfo) -> float:
    return float(getACC(y_true, y_score, info.task))


def medmnist_auc(y_true: np.ndarray, y_score: np.ndarray, info: TaskInfo) -> float:
    """medmnist's AUC; NaN where a split holds one class only (a tiny local validation split)."""
    if not info.multi_label and len(np.unique(y_true)) < 2:
        return math.nan
    return float(getAUC(y_true, y_score, info.task))


def _num_correct(logits: torch.Tensor, y: torch.Tensor, info: TaskInfo) -> int:
    if info.multi_label:
        return int(((logits > 0) == y.bool()).all(dim=1).sum())
    return int((logits.argmax(-1) == y[:, 0]).sum())


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # peak RSS of the process: the closest CPU analogue

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
