"""peft/galore.py: GaLoreAdamW against a GaLore written by hand, and its parameter groups."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fedmeld.peft import GaLoreAdamW, PeftConfig, apply_peft, galore_param_groups


def reference_galore(w: torch.Tensor, grads: list[torch.Tensor], rank: int, gap: int, scale: float, lr: float,
                     betas: tuple[float, float], eps: float, wd: float) -> torch.Tensor:
    """GaLore by hand: SVD projector every ``gap`` steps, Adam on the projection, project back, scale."""
    (b1, b2), m, v = betas, 0.0, 0.0
    for t, g in enumerate(grads, start=1):
        if (t - 1) % gap == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            left = g.shape[0] < g.shape[1]
            proj = u[:, :rank] if left else vh[:rank]
        r = proj.T @ g if left else g @ proj.T
        m = b1 * m + (1 - b1) * r
        v = b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
        w = w * (1 - lr * wd) - lr * scale * (proj @ n if left else n @ proj)
    return w


@pytest.mark.parametrize("shape", [(6, 4), (3, 5), (4, 2, 3, 3)])  # right projection, left, conv kernel
def test_galore_step_matches_reference(shape):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(5)]
    hyper = dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    param = nn.Parameter(w0.clone())
    opt = GaLoreAdamW([{"params": [param], "rank": 2, "update_gap": 2, "scale": 0.5}], **hyper)
    before = param.detach().clone()
    for i, g in enumerate(grads):
        param.grad = g.clone()
        opt.step()
        if i == 0:  # one step from zero moments: a rank-2 update (plus weight decay)
            step = param.detach() - before * (1 - hyper["lr"] * hyper["weight_decay"])
            assert torch.linalg.matrix_rank(step.flatten(1)) == 2
    flat = [g.flatten(1) for g in grads]
    expected = reference_galore(w0.flatten(1), flat, rank=2, gap=2, scale=0.5, lr=hyper["lr"],
                                betas=hyper["betas"], eps=hyper["eps"], wd=hyper["weight_decay"])
    torch.testing.assert_close(param.detach().flatten(1), expected, rtol=1e-5, atol=1e-6)
    never_refreshed = reference_galore(w0.flatten(1), flat, rank=2, gap=10, scale=0.5, lr=hyper["lr"],
                                       betas=hyper["betas"], eps=hyper["eps"], wd=hyper["weight_decay"])
    assert not torch.allclose(param.detach().flatten(1), never_refreshed, atol=1e-4)


def test_galore_without_rank_is_adamw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 2))
    twin = copy.deepcopy(model)
    opts = [GaLoreAdamW(model.parameters(), lr=0.01, weight_decay=0.1),
            torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1)]
    x = torch.randn(32, 8)
    for _ in range(5):
        for net, opt in zip((model, twin), opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_galore_param_groups_and_training(tiny_timm_eval, images):
    model = apply_peft(tiny_timm_eval("vit"), PeftConfig(method="full"))
    groups = galore_param_groups(model, rank=4, update_gap=100)  # one SVD per matrix: slow on a CPU
    projected = {id(p) for p in groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in projected}
    assert groups[0]["rank"] == 4 and groups[1]["rank"] is None
    assert "blocks.0.attn.qkv.weight" in names and "patch_embed.proj.weight" in names
    assert not any(n.endswith(".bias") or "norm" in n or n.startswith("head.") for n in names)  # head: 3 rows
    no_conv = galore_param_groups(model, rank=4, project_conv=False)
    assert "patch_embed.proj.weight" not in {n for n, p in model.named_parameters()
                                             if any(p is q for q in no_conv[0]["params"])}

    opt = GaLoreAdamW(groups, lr=1e-3)
    x, y = images(4), torch.arange(4) % 3
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model.train()(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
