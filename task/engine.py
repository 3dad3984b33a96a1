"""Local training and evaluation loops: plain PyTorch, shared by clients and the server.

Data stays a uint8 tensor until it is on the device, where each batch is scaled to [-1, 1]
(MedMNIST's own normalisation, mean 0.5 and std 0.5), resized and augmented (``Inputs``); a call
moves its whole split to the device once (a byte per pixel) and needs no DataLoader workers.
Every random choice a training call makes (batch order, augmentation, dropout) comes from its
``seed``, never from what ran before it in the process: clients that share a process compute what
they would alone, also when the in-process backend trains them in threads, one per device.

On CUDA the loop never waits for the GPU inside an epoch (loss and accuracy add up on the
device, read once at the end; small host tensors travel pinned and non-blocking), AdamW is fused,
activations are ``channels_last``, and with ``compile_mode="cudagraphs"`` a full batch's forward
and backward is one replayed CUDA graph, so small models are no longer bound by kernel launches.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from medmnist.evaluator import getACC, getAUC
from torch import nn

from fedmeld.task.config import AUGMENTS, COMPILE_MODES, PRECISIONS, RESIZE_MODES, RunConfig
from fedmeld.task import trace
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


def _check_precision(precision: str) -> None:
    """Once per train or evaluate call, not per batch."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; valid: {', '.join(PRECISIONS)}")


def _autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast on CUDA (``precision="bf16"``), where it is fast and safe for training; full
    precision on the CPU or with ``precision="fp32"``. ``cache=False`` while a CUDA graph is captured
    (autocast's weight-cast cache must not outlive the capture)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=cache) \
        if device.type == "cuda" and precision == "bf16" else nullcontext()


def adamw(params: Sequence[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The client optimizer: AdamW, fused into one kernel per step when every parameter is on CUDA
    (the default multi-tensor version launches several per step); the CPU keeps the default."""
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


_CPU_RNG = threading.RLock()


@contextmanager
def cpu_rng(seed: int) -> Iterator[None]:
    """The process's global CPU generator seeded with ``seed`` for the block and restored after,
    held by one thread at a time: model init (on the CPU) and CPU training draw from it, and the
    in-process backend runs clients in threads."""
    with _CPU_RNG:
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_rng_state(state)


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """The generator a training call on ``device`` draws from (dropout), seeded for the call and
    restored after. On CUDA only that device's generator (and that device as the thread's
    current one, which graph capture needs), so threads on other devices are untouched."""
    if device.type != "cuda":
        with cpu_rng(seed):
            yield
        return
    with torch.cuda.device(device):
        state = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(seed)
        try:
            yield
        finally:
            torch.cuda.set_rng_state(state)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on ``device`` without waiting for the device: a plain host-to-CUDA copy
    synchronises with the GPU, a pinned non-blocking one does not."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


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
        """(N, C, H, W) uint8 (on the host or already on ``device``) -> (N, C, size, size) floats on
        ``device``; ``generator`` (training only) drives the augmentation."""
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
        return torch.where(_to(flip, x.device)[:, None, None, None], x.flip(-1), x)
    angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(10)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.25  # ±1/8 of the side, in [-1, 1] units
    sign = 1 - 2 * flip.float()
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos * sign, -sin, shift[:, 0]], 1),
                         torch.stack([sin * sign, cos, shift[:, 1]], 1)], 1)  # (N, 2, 3)
    grid = F.affine_grid(_to(theta, x.device).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def loss_fn(logits: torch.Tensor, labels: torch.Tensor, info: TaskInfo) -> torch.Tensor:
    if info.multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    return F.cross_entropy(logits.float(), labels[:, 0])


def train(model: nn.Module, data: Split, info: TaskInfo, *, epochs: int, batch_size: int, lr: float,
          weight_decay: float, device: torch.device, seed: int, inputs: Inputs = Inputs(),
          prox_mu: float = 0.0, optimizer: torch.optim.Optimizer | None = None,
          lr_at: Callable[[int], float] | None = None, precision: str = "bf16",
          compile_mode: str = "off") -> dict[str, float]:
    """Train the parameters that require grad (with ``optimizer``, default ``adamw``); returns loss,
    accuracy, seconds (``compile_seconds`` of them spent compiling or capturing) and peak memory.

    ``prox_mu > 0`` adds FedProx's (mu/2)·||w - w_start||², which keeps a client near the global
    model it started the round from. ``lr_at(epoch)`` sets the learning rate of each local epoch
    (a schedule, ``task/schedule.py``); without it every epoch uses ``lr``. ``compile_mode``
    (the ``compile`` key, CUDA only for ``cudagraphs``): ``off``; ``default``, ``torch.compile``;
    ``cudagraphs``, full batches replay one captured CUDA graph (``_GraphedStep``). The device's
    RNG (dropout) is reseeded from ``seed`` for the call and restored afterwards."""
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f"compile {compile_mode!r}; valid: {', '.join(COMPILE_MODES)}")
    _check_precision(precision)
    if compile_mode == "cudagraphs" and device.type != "cuda":
        raise ValueError(f"compile=cudagraphs needs a CUDA device, not {device}; use compile=off (or default) here")
    with _seeded(device, seed):
        if getattr(optimizer, "dp", None) is not None:  # DP-SGD (make_optimizer with dp-clip): task/privacy.py
            from fedmeld.task.privacy import train_private
            return train_private(model, data, info, epochs=epochs, batch_size=batch_size, device=device, seed=seed,
                                 optimizer=optimizer, inputs=inputs, prox_mu=prox_mu, lr_at=lr_at, precision=precision)
        return _train(model, data, info, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                      device=device, seed=seed, inputs=inputs, prox_mu=prox_mu, optimizer=optimizer, lr_at=lr_at,
                      precision=precision, compile_mode=compile_mode)


def place(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``; with ``channels_last`` its 4-D parameters (conv kernels) in that layout.
    Not ``model.to(memory_format=...)``: it also converts 5-D tensors, and refuses LTE's per-head conv
    factors (H, r, C, kh, kw)."""
    model.to(device)
    if channels_last:
        for p in model.parameters():
            if p.dim() == 4:
                p.data = p.data.contiguous(memory_format=torch.channels_last)
    return model


def _train(model: nn.Module, data: Split, info: TaskInfo, *, epochs: int, batch_size: int, lr: float,
           weight_decay: float, device: torch.device, seed: int, inputs: Inputs, prox_mu: float,
           optimizer: torch.optim.Optimizer | None, lr_at: Callable[[int], float] | None,
           precision: str, compile_mode: str) -> dict[str, float]:
    cuda = device.type == "cuda"
    place(model, device, channels_last=cuda).train()
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if prox_mu else []
    opt = optimizer or adamw(params, lr, weight_decay)
    gen = torch.Generator().manual_seed(seed)
    aug = torch.Generator().manual_seed(seed + 1) if inputs.augment != "none" else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    images, labels = data.images.to(device), data.labels.to(device)  # (N, C, H, W) uint8, (N, L) int64
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sum of batch loss x batch size
    correct = torch.zeros((), dtype=torch.int64, device=device)
    forward = torch.compile(model) if compile_mode == "default" else model  # dynamo caches per model

    def step(x: torch.Tensor, y: torch.Tensor, module: nn.Module = forward) -> None:
        """Forward, loss and backward of one batch, its loss and correct count added up on the device."""
        with _autocast(device, precision, cache=compile_mode != "cudagraphs"):
            logits = module(x)
        task_loss = loss = loss_fn(logits, y, info)
        if prox_mu:
            loss = loss + prox_mu / 2 * sum((p - a).pow(2).sum() for p, a in zip(params, anchors))
        loss.backward()
        loss_sum.add_(task_loss.detach(), alpha=len(y))
        correct.add_(_num_correct(logits.detach(), y, info))

    graphed = _GraphedStep(step, params, device) if compile_mode == "cudagraphs" else None
    compile_seconds, seen = 0.0, 0
    for epoch in range(epochs):
        if lr_at is not None:
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch)
        order = _to(torch.randperm(len(data), generator=gen), device)
        # drop a last batch of one: BatchNorm cannot train on it
        batches = [b for b in order.split(batch_size) if len(b) > 1 or len(order) == 1]
        for idx in batches:
            x, y = inputs(images[idx], device, aug), labels[idx]
            if cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            if graphed is not None and len(idx) == batch_size:
                graphed(x, y)
            elif compile_mode == "default" and len(idx) == batch_size:
                opt.zero_grad(set_to_none=True)
                first = time.perf_counter() if not seen else None
                step(x, y)
                if first is not None:  # the call's first compiled step: it compiles, once per process and shape
                    if cuda:
                        torch.cuda.synchronize(device)
                    compile_seconds = time.perf_counter() - first
            else:  # eager; under compile, a last batch of another size (no recompilation for it)
                if graphed is not None:
                    graphed.zero_grad()
                else:
                    opt.zero_grad(set_to_none=True)
                step(x, y, model)
            opt.step()
            seen += len(idx)
    if graphed is not None:
        compile_seconds = graphed.capture_seconds
    opt.zero_grad(set_to_none=True)  # frees the gradients (and a graph's memory with them)
    return train_stats(loss_sum, correct, seen, start, compile_seconds, device)


def train_stats(loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, start: float, compile_seconds: float,
                device: torch.device) -> dict[str, float]:
    """What a training call reports (and traces), from its on-device sums: the call's one wait for
    the device (every training loop, DP-SGD's too, accumulates on the device)."""
    totals = torch.stack([loss_sum, correct.double()]).tolist()
    seconds = time.perf_counter() - start
    trace.record("train", seconds=seconds, samples=seen, compile_seconds=compile_seconds)
    return {
        "train_loss": totals[0] / max(seen, 1),
        "train_accuracy": totals[1] / max(seen, 1),
        "train_seconds": seconds,
        "compile_seconds": compile_seconds,
        "peak_memory_mb": _peak_memory_mb(device),
        "samples_seen": seen,
    }


class _GraphedStep:
    """``step(x, y)`` (forward, loss, backward) of full batches as one replayed CUDA graph.

    Why: an eager step of a small model (ViT-S at batch 128) launches over a thousand kernels and
    is bound by the CPU launching them; a graph replay is one launch. The first full batch runs
    eagerly on a side stream (it warms up cuBLAS, autograd and LoRA's cast cache, and is a real
    training step); the second is captured and replayed, and every later one is copied into the
    captured input buffers and replayed. The optimizer steps outside the graph, so a schedule's
    learning rates apply as usual. The gradients then live in the graph's memory: an eager step
    in between (a smaller last batch) zeroes them in place instead of setting them to None.
    A graph lives for one training call, so whatever changes between calls (loaded adapter state,
    a merged backbone, a new optimizer) cannot leave it stale."""

    def __init__(self, step: Callable[[torch.Tensor, torch.Tensor], None], params: list[nn.Parameter],
                 device: torch.device) -> None:
        self.step, self.params, self.device = step, params, device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.x = self.y = None  # the captured input buffers
        self.warm = False
        self.capture_seconds = 0.0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph is not None:
            self.x.copy_(x)
            self.y.copy_(y)
            self.graph.replay()
        elif not self.warm:
            self.zero_grad()
            current, side = torch.cuda.current_stream(self.device), _side_stream(self.device)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                self.step(x, y)
            current.wait_stream(side)
            self.warm = True
        else:
            start = time.perf_counter()
            self.x, self.y = x.clone(), y.clone()
            for p in self.params:
                p.grad = None  # the captured backward allocates the gradients it writes
            self.graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(self.graph, stream=_side_stream(self.device), capture_error_mode="thread_local"):
                    self.step(self.x, self.y)
            except RuntimeError as err:
                raise RuntimeError(f"compile=cudagraphs: this model's training step cannot be captured as a "
                                   f"CUDA graph ({err}); use compile=off or compile=default") from err
            self.capture_seconds = time.perf_counter() - start
            self.graph.replay()

    def zero_grad(self) -> None:
        if self.graph is None:
            for p in self.params:
                p.grad = None
        else:
            torch._foreach_zero_([p.grad for p in self.params if p.grad is not None])


_STREAMS = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream graphed steps warm up and capture on: one per thread and device, reused by every
    call. cuBLAS keeps a workspace (tens of MiB) for each stream it ever ran on and never frees it,
    so a new stream per call leaked that much every round (measured: 1.4 GiB over 21 calls)."""
    streams = _STREAMS.__dict__.setdefault("by_device", {})
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in streams:
        streams[index] = torch.cuda.Stream(device)
    return streams[index]


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, info: TaskInfo, *, device: torch.device,
             batch_size: int = 256, inputs: Inputs = Inputs(), precision: str = "bf16") -> EvalResult:
    """Loss plus ACC and AUC computed exactly as medmnist's Evaluator computes them."""
    _check_precision(precision)
    began = time.perf_counter()
    model.to(device).eval()
    images, labels = data.images.to(device), data.labels.to(device)
    scores, loss_sum = [], torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(data), batch_size):
        x, y = inputs(images[start:start + batch_size], device), labels[start:start + batch_size]
        with _autocast(device, precision):
            logits = model(x).float()
        loss_sum.add_(loss_fn(logits, y, info), alpha=len(y))
        scores.append(torch.sigmoid(logits) if info.multi_label else logits.softmax(-1))
    y_score = torch.cat(scores).cpu().numpy()  # the call's one wait for the device
    trace.record("evaluate", seconds=time.perf_counter() - began, samples=len(data))
    y_true = data.labels.numpy()
    return EvalResult(loss_sum.item() / max(len(data), 1), medmnist_acc(y_true, y_score, info),
                      medmnist_auc(y_true, y_score, info), y_score)


def medmnist_acc(y_true: np.ndarray, y_score: np.ndarray, info: TaskInfo) -> float:
    return float(getACC(y_true, y_score, info.task))


def medmnist_auc(y_true: np.ndarray, y_score: np.ndarray, info: TaskInfo) -> float:
    """medmnist's AUC; NaN where a split holds one class only (a tiny local validation split) or the
    scores are not finite (a diverged global model: the round is recorded, the run goes on)."""
    if not info.multi_label and len(np.unique(y_true)) < 2:
        return math.nan
    if not np.isfinite(y_score).all():  # a diverged model (e.g. poisoned): recorded as such, not a crash
        return math.nan
    return float(getAUC(y_true, y_score, info.task))


def _num_correct(logits: torch.Tensor, y: torch.Tensor, info: TaskInfo) -> torch.Tensor:
    """Correct predictions in a batch, as a 0-dim int64 tensor on the logits' device (no wait)."""
    if info.multi_label:
        return ((logits > 0) == y.bool()).all(dim=1).sum()
    return (logits.argmax(-1) == y[:, 0]).sum()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # peak RSS of the process: the closest CPU analogue

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
