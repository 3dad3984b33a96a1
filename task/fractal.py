"""Fractal images for formula-driven pretraining (FractalDB, Kataoka et al. 2020; OFDB, Nakamura et al. 2023).

A category is an iterated function system (IFS): 2-4 contractive affine maps of the plane with
probabilities. Categories are drawn on the CPU from a seed, so every machine gets the same ones, and
kept only if their attractor fills a sensible share of the image (no dots, no lines). Images are
rendered in batches on the training device (the chaos game: many points iterate the maps in parallel,
then land in a per-image histogram), so a GPU never waits for data.

What makes the task hard enough to learn from: each instance jitters its category's map
parameters (FractalDB's intra-category variation), and the rendering augments (``augment``): ``none``;
``light``, a flip, a zoom, a shift and the point density; ``full``, a rotation too, and in intensity
(blur, levels, inversion, noise).
Images are grayscale in [-1, 1], the engine's normalisation (MedMNIST's mean 0.5, std 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAX_MAPS = 4
AUGMENTS = ("none", "light", "full")
_MIN_FILL, _MAX_FILL = 0.06, 0.6  # share of pixels a category's attractor covers at 32 px


@dataclass(frozen=True)
class FractalConfig:
    """What decides the images: the categories (``seed``, ``categories``) and how they are rendered."""

    categories: int = 1000
    seed: int = 0
    resolution: int = 64
    particles: int = 256      # chaos-game points per image, iterated in parallel
    steps: int = 48           # iterations; each adds every particle to the image after ``warmup``
    warmup: int = 12
    jitter: float = 0.1       # instance jitter: each map coefficient times U(1 - jitter, 1 + jitter)
    augment: str = "light"    # AUGMENTS: none (only the jitter varies), light, full

    def __post_init__(self) -> None:
        if self.categories < 2 or self.resolution < 8 or not 0 <= self.warmup < self.steps or self.particles < 1 \
                or self.augment not in AUGMENTS:
            raise ValueError(f"FractalConfig needs categories >= 2, resolution >= 8, particles >= 1, "
                             f"0 <= warmup < steps and augment in {AUGMENTS}; got {self}")


def ifs_categories(categories: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``categories`` IFS drawn from ``seed`` on the CPU: maps (C, MAX_MAPS, 6) as (a, b, c, d, e, f) of
    x' = a x + b y + e, y' = c x + d y + f, and their probabilities (C, MAX_MAPS), 0 for unused maps.
    A candidate whose attractor fills less than 6 % or more than 60 % of a 32-px image is redrawn."""
    gen = torch.Generator().manual_seed(seed)
    kept_maps, kept_probs, found = [], [], 0
    while found < categories:
        maps, probs = _draw_systems(4 * (categories - found) + 8, gen)
        fill = (render(maps, probs, FractalConfig(categories=2, resolution=32, jitter=0.0, augment="none"),
                       gen, torch.device("cpu")) > -1).float().mean((1, 2, 3))
        good = (fill > _MIN_FILL) & (fill < _MAX_FILL)
        kept_maps.append(maps[good])
        kept_probs.append(probs[good])
        found += int(good.sum())
    return torch.cat(kept_maps)[:categories], torch.cat(kept_probs)[:categories]


def _draw_systems(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random IFS of 2..MAX_MAPS maps, each A = R(theta) diag(s1, ±s2) R(phi) with 0.25 <= s2 <=
    s1 <= 0.8 (contractive under the jitter too) and a shift in [-1, 1]²; probability ∝ |det A|."""
    u = torch.rand(n, MAX_MAPS, 7, generator=gen)
    theta, phi = u[..., 0] * 2 * math.pi, u[..., 1] * 2 * math.pi
    s1 = 0.35 + 0.45 * u[..., 2]
    s2 = (0.25 + (s1 - 0.25) * u[..., 3]) * torch.where(u[..., 4] < 0.5, -1.0, 1.0)
    rot = lambda a: torch.stack([torch.stack([a.cos(), -a.sin()], -1), torch.stack([a.sin(), a.cos()], -1)], -2)
    diag = torch.diag_embed(torch.stack([s1, s2], -1))
    a = rot(theta) @ diag @ rot(phi)  # (n, M, 2, 2)
    shift = u[..., 5:7] * 2 - 1
    maps = torch.cat([a.flatten(-2), shift], -1)  # a, b, c, d, e, f
    used = torch.arange(MAX_MAPS) < torch.randint(2, MAX_MAPS + 1, (n, 1), generator=gen)
    probs = (s1 * s2.abs()) * used
    return maps, probs / probs.sum(-1, keepdim=True)


class FractalImages:
    """Labelled batches of fractal images on ``device``; batch ``step`` is the same whenever it is drawn
    (its generator is seeded from the config's seed and the step), so an interrupted pretraining resumes
    on exactly the images it would have seen."""

    def __init__(self, cfg: FractalConfig, device: torch.device) -> None:
        self.cfg, self.device = cfg, device
        maps, probs = ifs_categories(cfg.categories, cfg.seed)
        self.maps, self.probs = maps.to(device), probs.to(device)

    def batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 1, R, R) in [-1, 1], labels (B,) int64), both on the device."""
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed * 1_000_003 + step)
        labels = torch.randint(self.cfg.categories, (batch_size,), generator=gen, device=self.device)
        return render(self.maps[labels], self.probs[labels], self.cfg, gen, self.device), labels


def render(maps: torch.Tensor, probs: torch.Tensor, cfg: FractalConfig, gen: torch.Generator,
           device: torch.device) -> torch.Tensor:
    """One image per IFS of ``maps`` (B, M, 6) / ``probs`` (B, M), rendered with the chaos game on
    ``device``; random draws come from ``gen`` (a generator on ``device``). (B, 1, R, R) in [-1, 1]."""
    b, m, _ = maps.shape
    maps, probs = maps.to(device), probs.to(device)
    rand = lambda *shape: torch.rand(*shape, generator=gen, device=device)
    if cfg.jitter:
        maps = maps * (1 + cfg.jitter * (2 * rand(b, m, 6) - 1))
    cum = probs.cumsum(-1)
    cum = cum / cum[:, -1:]
    xy = torch.zeros(b, cfg.particles, 2, device=device)
    collected = []
    for step in range(cfg.steps):
        k = torch.searchsorted(cum, rand(b, cfg.particles)).clamp_(max=m - 1)  # (B, P) map per particle
        p = maps.gather(1, k[..., None].expand(-1, -1, 6))
        x, y = xy.unbind(-1)
        xy = torch.stack([p[..., 0] * x + p[..., 1] * y + p[..., 4], p[..., 2] * x + p[..., 3] * y + p[..., 5]], -1)
        if step >= cfg.warmup:
            collected.append(xy)
    points = torch.cat(collected, 1).nan_to_num_(0.0).clamp_(-1e3, 1e3)  # (B, N, 2)
    return _raster(_place(points, cfg, rand), cfg, rand)


def _place(points: torch.Tensor, cfg: FractalConfig, rand) -> torch.Tensor:
    """Points centred and scaled into the unit square (pixel units of the image): the attractor's box
    fills 80 % of the side; augmented, it is flipped (and under ``full`` rotated), zoomed (x0.75-1.3)
    and shifted first."""
    b = points.shape[0]
    if cfg.augment != "none":
        angle = rand(b) * 2 * math.pi if cfg.augment == "full" else torch.zeros(b, device=points.device)
        flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
        rot = torch.stack([torch.stack([angle.cos() * flip, -angle.sin()], -1),
                           torch.stack([angle.sin() * flip, angle.cos()], -1)], -2)  # (B, 2, 2)
        points = points @ rot.transpose(1, 2)
    low, high = points.amin(1, keepdim=True), points.amax(1, keepdim=True)
    centre, extent = (low + high) / 2, (high - low).amax(-1, keepdim=True).clamp_min(1e-6)
    scale = 0.8 / extent
    offset = torch.full_like(centre, 0.5)
    if cfg.augment != "none":
        scale = scale * (0.75 + 0.55 * rand(b, 1, 1))
        offset = offset + 0.15 * (2 * rand(b, 1, 2) - 1)
    return ((points - centre) * scale + offset) * cfg.resolution


def _raster(pixels: torch.Tensor, cfg: FractalConfig, rand) -> torch.Tensor:
    """Point density as grayscale: hits per pixel over a saturation count (random per image unless
    ``none``); under ``full``, a random blur, foreground/background levels (inverted half the time) and
    uniform noise."""
    b, r = pixels.shape[0], cfg.resolution
    ij = pixels.floor().long()
    inside = ((ij >= 0) & (ij < r)).all(-1)
    flat = (ij[..., 1] * r + ij[..., 0]).clamp_(0, r * r - 1)
    counts = torch.zeros(b, r * r, device=pixels.device).scatter_add_(1, flat, inside.float())
    image = counts.view(b, 1, r, r)
    saturate = torch.ones(b, 1, 1, 1, device=pixels.device) if cfg.augment == "none" else 1 + 3 * rand(b, 1, 1, 1)
    image = (image / saturate).clamp_(max=1.0)
    if cfg.augment != "full":
        return image * 2 - 1
    blurred = F.avg_pool2d(image, 3, stride=1, padding=1, count_include_pad=False)
    image = torch.where(rand(b, 1, 1, 1) < 0.5, blurred, image)
    fg, bg = 0.6 + 0.4 * rand(b, 1, 1, 1), 0.3 * rand(b, 1, 1, 1)
    invert = rand(b, 1, 1, 1) < 0.5
    fg, bg = torch.where(invert, bg, fg), torch.where(invert, fg, bg)
    noise = (2 * rand(*image.shape) - 1) * (0.1 * rand(b, 1, 1, 1))  # uniform, up to ±0.1
    image = bg + (fg - bg) * image + noise
    return image.clamp_(0, 1) * 2 - 1
