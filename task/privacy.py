"""Differential privacy: DP-SGD on the adapters at each client, client-level DP on the server, and
the privacy ledger that composes every release with Opacus's RDP accountant.

Sample-level DP-SGD (``dp-clip`` > 0): a client samples each local batch by Poisson sampling (every
example independently, rate q = batch-size / n), computes the gradient of every trainable parameter
for every example separately (``per_sample_grads``: torch.func's vmap over grad, so LoRA, norm γ/β
and the head of any timm family need no per-layer formulas), clips each example's whole gradient
to norm ``dp-clip``, sums, adds Gaussian noise of std ``dp-noise`` × clip and divides by the
expected batch q·n (Abadi et al. 2016, as Opacus does); then the run's optimizer steps. Whatever
the client then sends is post-processing of these noisy gradients. The noise multiplier is
``dp-noise`` or, given ``dp-epsilon``, the one Opacus's ``get_noise_multiplier`` finds for the
client's (q, steps per round × num-server-rounds), so a client that takes part in every round ends
at most at that ε.

Client-level DP (``client-dp-clip`` > 0, ``ClientDP``): the server clips each client's whole
update to a norm, sums them with equal weights, adds Gaussian noise of std ``client-dp-noise`` ×
clip and divides by the expected number of clients (DP-FedAvg, McMahan et al. 2018).

The ledger (``Ledger``) keeps, per client and for client-level DP, the history of (noise
multiplier, sample rate, steps); ε is never computed here but by Opacus's accountant over that
history. Only torch and Opacus: no Flower.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from fedmeld.peft import LoRALinear
from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.data import Split, TaskInfo
from fedmeld.task.engine import Inputs, _autocast, _num_correct, loss_fn, train_stats


def _import_opacus() -> tuple[type, Callable[..., float]]:
    """Opacus's RDP accountant and noise calibration. Importing opacus calls ``logging.basicConfig``
    (opacus/utils/module_utils.py), which gives a process without log handlers a second root handler
    and every Flower log line twice: the root logger is put back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    from opacus.accountants import RDPAccountant
    from opacus.accountants.utils import get_noise_multiplier

    root.handlers[:] = handlers
    root.setLevel(level)
    return RDPAccountant, get_noise_multiplier


RDPAccountant, get_noise_multiplier = _import_opacus()

ACCOUNTANT = "rdp"  # Opacus's RDP accountant: the one every ε here comes from
CLIENTS = "clients"  # the ledger's key for client-level DP (sample-level keys are partition ids)


@dataclass(frozen=True)
class DPPlan:
    """One client's DP-SGD in one round: what the accountant needs."""

    sample_rate: float  # q: each example is in a batch with this probability
    steps: int  # noisy gradient steps per round
    noise_multiplier: float  # sigma: noise std / clip

    def metrics(self) -> dict[str, float]:
        """How a client reports its round (train reply metrics, query answers)."""
        return {"dp_sample_rate": self.sample_rate, "dp_steps": self.steps,
                "dp_noise_multiplier": self.noise_multiplier}

    @classmethod
    def from_metrics(cls, metrics: dict) -> DPPlan | None:
        """The plan a client reported, or None if its metrics hold none."""
        keys = ("dp_sample_rate", "dp_steps", "dp_noise_multiplier")
        if not all(k in metrics for k in keys):
            return None
        return cls(float(metrics["dp_sample_rate"]), int(metrics["dp_steps"]), float(metrics["dp_noise_multiplier"]))


@dataclass(frozen=True)
class DPSettings:
    """The run config's DP-SGD keys."""

    clip: float
    noise: float  # 0 with a target epsilon (or for clipping only: epsilon is then infinite)
    epsilon: float  # target over `rounds` rounds; 0: use `noise`
    delta: float
    rounds: int
    secure_rng: bool

    @classmethod
    def of(cls, cfg: RunConfig) -> DPSettings | None:
        """The run's DP-SGD settings, or None when DP-SGD is off (``dp-clip`` = 0)."""
        if not cfg.dp_clip:
            return None
        return cls(cfg.dp_clip, cfg.dp_noise, cfg.dp_epsilon, cfg.dp_delta, cfg.num_server_rounds, cfg.dp_secure_rng)

    def plan(self, num_examples: int, batch_size: int, epochs: int) -> DPPlan:
        """A client's round over ``num_examples``: Poisson rate batch/n, ``epochs`` × ceil(n / batch)
        steps (Opacus's steps per epoch), and the noise multiplier."""
        if num_examples < 1:
            raise ValueError("DP-SGD needs at least one training example")
        q = min(1.0, batch_size / num_examples)
        steps = epochs * math.ceil(num_examples / batch_size)
        sigma = self.noise
        if self.epsilon:
            sigma = get_noise_multiplier(target_epsilon=self.epsilon, target_delta=self.delta, sample_rate=q,
                                         steps=steps * self.rounds, accountant=ACCOUNTANT)
        return DPPlan(q, steps, sigma)


def epsilon(history: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of a history of (noise multiplier, sample rate, steps), by Opacus's RDP
    accountant (0 for no steps, inf for steps without noise)."""
    if not history:
        return 0.0
    if any(sigma == 0 for sigma, _, steps in history if steps):
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [tuple(h) for h in history]
    return float(accountant.get_epsilon(delta=delta))


class Ledger:
    """Per-key histories of (noise multiplier, sample rate, steps): one key per client (its partition
    id) for DP-SGD, ``CLIENTS`` for client-level DP. The server keeps it and its checkpoint holds
    it, so a resumed run keeps its spent budget."""

    def __init__(self, histories: dict[str, list[list]] | None = None) -> None:
        self.histories: dict[str, list[list]] = {k: [list(h) for h in v] for k, v in (histories or {}).items()}

    def charge(self, key: str, plan: DPPlan) -> None:
        """Add a round (consecutive rounds with the same sigma and q merge, as Opacus's history does)."""
        history = self.histories.setdefault(str(key), [])
        if history and history[-1][:2] == [plan.noise_multiplier, plan.sample_rate]:
            history[-1][2] += plan.steps
        else:
            history.append([plan.noise_multiplier, plan.sample_rate, plan.steps])

    def epsilon(self, key: str, delta: float, then: DPPlan | None = None) -> float:
        """ε of ``key`` so far, or after one more round ``then``."""
        history = [tuple(h) for h in self.histories.get(str(key), [])]
        if then is not None:
            history.append((then.noise_multiplier, then.sample_rate, then.steps))
        return epsilon(history, delta)

    def max_epsilon(self, delta: float, keys: Sequence[str] | None = None) -> float:
        """The largest ε over ``keys`` (default: every client of DP-SGD); 0 before any step."""
        keys = [k for k in self.histories if k != CLIENTS] if keys is None else keys
        return max((self.epsilon(k, delta) for k in keys), default=0.0)

    def to_json(self) -> dict[str, list[list]]:
        return {k: [list(h) for h in v] for k, v in self.histories.items()}


class NoiseSource:
    """Where DP's randomness comes from: Poisson sampling and Gaussian noise. Seeded (a
    ``torch.Generator``, reproducible, for experiments: whoever knows the seed, and every node
    does, can subtract the noise) or, with ``secure``, the OS's cryptographically secure generator
    (``os.urandom``: uniform bits, turned into normals by Box-Muller in float64)."""

    def __init__(self, seed: int, secure: bool, device: torch.device) -> None:
        self.secure, self.device = secure, device
        self._cpu = torch.Generator().manual_seed(seed)
        self._dev = torch.Generator(device).manual_seed(seed + 1) if device.type != "cpu" else self._cpu

    def uniform(self, n: int) -> Tensor:
        """(n,) floats in (0, 1) on the CPU."""
        if not self.secure:
            return torch.rand(n, generator=self._cpu, dtype=torch.float64)
        bits = torch.frombuffer(bytearray(os.urandom(8 * n)), dtype=torch.int64) if n else torch.zeros(0, dtype=torch.int64)
        return ((bits & (2**53 - 1)).double() + 0.5) / 2**53

    def normal(self, shape: torch.Size) -> Tensor:
        """Standard normal noise of ``shape`` (float32) on the device."""
        if not self.secure:
            return torch.randn(shape, generator=self._dev, device=self.device)
        n = math.prod(shape)
        u1, u2 = self.uniform(n), self.uniform(n)
        z = torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)
        return z.float().view(shape).to(self.device)

    def poisson(self, n: int, rate: float) -> Tensor:
        """Indices of a Poisson-sampled batch: each of ``n`` examples in it with probability ``rate``."""
        return torch.nonzero(self.uniform(n) < rate).flatten()


def check_model(model: nn.Module) -> None:
    """Refuse a model whose BatchNorm layers update (and, with bn-stats=aggregate, send) running
    statistics: in train mode each example's output depends on the whole batch, so a per-example
    gradient bounds nothing, and the statistics themselves are un-noised functions of the data."""
    live = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)
            and not getattr(m, "stats_frozen", False)]
    if live:
        raise ConfigError(f"DP-SGD with BatchNorm layers whose running statistics train ({', '.join(live[:3])}"
                          f"{', ...' if len(live) > 3 else ''}): set bn-stats=frozen (statistics fixed, BatchNorm in "
                          f"eval mode, γ/β still train with DP), or use a model without BatchNorm (ViT, ConvNeXt)")


@contextmanager
def vmappable(model: nn.Module) -> Iterator[None]:
    """Run ``model`` through ops torch.func can vmap: LoRALinear's two-GEMM path (its fused
    autograd.Function has no vmap rule; the function computed is the same) and attention written
    out instead of scaled_dot_product_attention (which has no batching rule: vmap would loop)."""
    saved = [(m, "fast", m.fast) for m in model.modules() if isinstance(m, LoRALinear)]
    saved += [(m, "fused_attn", m.fused_attn) for m in model.modules() if getattr(m, "fused_attn", False)]
    try:
        for m, attr, _ in saved:
            setattr(m, attr, False)
        yield
    finally:
        for m, attr, value in saved:
            setattr(m, attr, value)


def per_sample_grads(model: nn.Module, x: Tensor, y: Tensor, info: TaskInfo, device: torch.device,
                     precision: str = "fp32") -> tuple[dict[str, Tensor], Tensor, Tensor]:
    """The gradient of each example's loss for every trainable parameter, name -> (N, *shape), plus
    the per-example losses (N,) and logits (N, classes). torch.func's vmap over grad: one batched
    pass, never a Python loop over examples."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        with _autocast(device, precision):
            logits = functional_call(model, p, (xi.unsqueeze(0),))
        loss = loss_fn(logits, yi.unsqueeze(0), info)
        return loss, (loss.detach(), logits.detach().float()[0])

    with vmappable(model):
        grads, (losses, logits) = vmap(grad(one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(
            params, x, y)
    return grads, losses, logits


def clip_and_noise(grads: dict[str, Tensor], clip: float, noise_multiplier: float, expected_batch: float,
                   source: NoiseSource, like: dict[str, Tensor]) -> dict[str, Tensor]:
    """DP-SGD's gradient: each example's gradient (over all parameters at once) clipped to norm
    ``clip``, summed, plus N(0, (sigma·clip)²) per coordinate, divided by the expected batch.
    ``grads``: name -> (N, *shape), empty for an empty batch; ``like``: the parameters."""
    if grads:
        norms = torch.stack([g.flatten(1).float().norm(dim=1) for g in grads.values()]).norm(dim=0)  # (N,)
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)  # clip = inf: 1
        summed = {k: torch.einsum("n,n...->...", factor, g.float()) for k, g in grads.items()}
    else:
        summed = {k: torch.zeros(p.shape, device=p.device) for k, p in like.items()}
    if noise_multiplier:
        summed = {k: s + source.normal(s.shape) * (noise_multiplier * clip) for k, s in summed.items()}
    return {k: (s / expected_batch).to(like[k].dtype) for k, s in summed.items()}


class PrivateOptimizer:
    """The client optimizer (``inner``) with DP-SGD's settings: ``engine.train`` hands training to
    ``train_private`` when given one, which sets privatised gradients before each ``step``."""

    def __init__(self, inner: torch.optim.Optimizer, settings: DPSettings) -> None:
        self.inner, self.dp = inner, settings
        self.param_groups = inner.param_groups  # learning-rate schedules set lr here

    def step(self) -> None:
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)


def train_private(model: nn.Module, data: Split, info: TaskInfo, *, epochs: int, batch_size: int,
                  device: torch.device, seed: int, optimizer: PrivateOptimizer, inputs: Inputs = Inputs(),
                  prox_mu: float = 0.0, lr_at: Callable[[int], float] | None = None,
                  precision: str = "bf16") -> dict[str, float]:
    """``engine.train`` with DP-SGD: Poisson-sampled batches, per-example clipping, Gaussian noise;
    returns engine.train's stats plus the round's DP plan and its ε alone (``dp_round_epsilon``;
    the server composes rounds into the client's ε). FedProx's term depends on no example, so its
    gradient is added after the noise."""
    settings = optimizer.dp
    check_model(model)
    model.to(device).train()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    anchors = {n: p.detach().clone() for n, p in named.items()} if prox_mu else {}
    plan = settings.plan(len(data), batch_size, epochs)
    source = NoiseSource(seed, settings.secure_rng, device)
    aug = torch.Generator().manual_seed(seed + 1) if inputs.augment != "none" else None
    expected = plan.sample_rate * len(data)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, seen = time.perf_counter(), 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no wait per step
    correct = torch.zeros((), dtype=torch.int64, device=device)
    for epoch in range(epochs):
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch)
        for _ in range(plan.steps // epochs):
            idx = source.poisson(len(data), plan.sample_rate)
            grads: dict[str, Tensor] = {}
            if len(idx):
                x, y = inputs(data.images[idx], device, aug), data.labels[idx].to(device)
                grads, losses, logits = per_sample_grads(model, x, y, info, device, precision)
                loss_sum.add_(losses.detach().sum().double())
                correct.add_(_num_correct(logits.detach(), y, info))
                seen += len(idx)
            private = clip_and_noise(grads, settings.clip, plan.noise_multiplier, expected, source, named)
            for name, p in named.items():
                p.grad = private[name] + (prox_mu * (p.detach() - anchors[name]) if prox_mu else 0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {
        **train_stats(loss_sum, correct, seen, start, 0.0, device),
        **plan.metrics(),
        "dp_round_epsilon": epsilon([(plan.noise_multiplier, plan.sample_rate, plan.steps)], settings.delta),
    }


class ClientDP:
    """Client-level DP as an aggregation rule (``client-dp-clip``): each client's whole update
    clipped to norm ``clip``, summed with equal weights (example counts are ignored: they would
    change the sensitivity), N(0, (noise·clip)²) added per coordinate, divided by the expected
    number of clients. Every call is a release, charged to ``ledger`` under ``CLIENTS`` at sample
    rate 1: the server's client sampling draws a fixed-size sample, not the Poisson sample the RDP
    analysis of amplification assumes, so no amplification is claimed. The noise of release k is
    drawn from (seed, k), so a resumed run draws what the uninterrupted run draws."""

    def __init__(self, clip: float, noise: float, expected_clients: int, ledger: Ledger, seed: int = 0,
                 secure: bool = False) -> None:
        self.clip, self.noise, self.expected = clip, noise, expected_clients
        self.ledger, self.seed, self.secure = ledger, seed, secure

    @classmethod
    def of(cls, cfg: RunConfig, ledger: Ledger) -> ClientDP:
        return cls(cfg.client_dp_clip, cfg.client_dp_noise, max(1, round(cfg.num_clients * cfg.fraction_train)),
                   ledger, cfg.seed, cfg.dp_secure_rng)

    def plan(self) -> DPPlan:
        return DPPlan(1.0, 1, self.noise)

    def __call__(self, deltas: Sequence[dict[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
        releases = sum(h[2] for h in self.ledger.histories.get(CLIENTS, []))
        source = NoiseSource(self.seed * 1_000_003 + releases, self.secure, torch.device("cpu"))
        total = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in deltas[0].items()}
        for delta in deltas:
            norm = math.sqrt(sum(float(v.double().square().sum()) for v in delta.values()))
            factor = min(1.0, self.clip / (norm + 1e-12))
            for k, v in delta.items():
                total[k] += v.double() * factor
        if self.noise:
            total = {k: t + source.normal(t.shape).double() * (self.noise * self.clip) for k, t in total.items()}
        self.ledger.charge(CLIENTS, self.plan())
        return {k: (t / self.expected).to(deltas[0][k].dtype) for k, t in total.items()}
