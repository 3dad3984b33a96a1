"""Tests for VeRA, DoRA, BitFit and GaLoreAdamW: tiny random-init timm models, CPU, no downloads."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
from torch import nn

from fedmeld.peft import (DoRAConv2d, DoRALinear, GaLoreAdamW, PeftConfig, VeRAConv2d, VeRALinear, adapter_state,
                  apply_peft, count_parameters, galore_param_groups, load_adapter_state, fold_adapters,
                  merged_state_dict, unfold_adapters)
from fedmeld.peft.norm import NORM_TYPES
from fedmeld.peft.reparam import ReparamLayer
from fedmeld.peft.vera import D_INIT, shared_matrices

MODELS = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "resnet": ("resnet10t", {}),
}
HEADS = {"vit": "head.", "resnet": "fc."}
TOL = dict(rtol=1e-5, atol=1e-5)
VERA_RANK = 32  # the default (256) makes ResNet's 3x3 kernels slow to adapt on a CPU


def config(method: str, **kwargs) -> PeftConfig:
    return PeftConfig(method=method, vera_rank=VERA_RANK, **kwargs)


@torch.no_grad()
def build(family: str, seed: int = 0) -> nn.Module:
    """A random-init model in eval mode whose norms are perturbed: timm zero-inits the last BatchNorm gamma
    of each ResNet block, which would hide everything an adapter does inside the block."""
    name, kwargs = MODELS[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    for m in model.modules():
        if isinstance(m, NORM_TYPES):
            for p in m.parameters(recurse=False):
                p.add_(0.2 * torch.randn_like(p))
    return model


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def randomize_trainables(model: nn.Module, std: float = 0.1) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn_like(p))


def reparam_layers(model: nn.Module) -> list[ReparamLayer]:
    return [m for m in model.modules() if isinstance(m, ReparamLayer)]


# --- VeRA / DoRA layers ---------------------------------------------------------

def make_layer(method: str, kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(base copy, adapted layer, input) for ``method`` on a Linear or a strided, padded 3x3 conv."""
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(16, 8), torch.randn(4, 16)
    else:
        base, x = nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)
    reference = copy.deepcopy(base)
    classes = {"vera": {"linear": VeRALinear, "conv": VeRAConv2d}, "dora": {"linear": DoRALinear, "conv": DoRAConv2d}}
    if method == "vera":
        vera_A, vera_B = shared_matrices(*base.weight.flatten(1).shape, rank=4, seed=0)
        layer = classes[method][kind].adapt(base, vera_A=vera_A, vera_B=vera_B)
    else:
        layer = classes[method][kind].adapt(base, rank=4, alpha=8.0)
    return reference, layer, x


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("method", ["vera", "dora"])
def test_layer_starts_as_base_merges_and_unmerges_exactly(method, kind):
    reference, layer, x = make_layer(method, kind)
    assert layer.weight is not None and not layer.folded
    torch.testing.assert_close(layer(x), reference(x), **TOL)

    randomize_trainables(layer, std=0.5)
    w0, y0 = layer.weight.detach().clone(), layer(x).detach()
    assert not torch.allclose(y0, reference(x), atol=1e-3)  # the adapter does something

    layer.fold()
    assert layer.folded
    torch.testing.assert_close(layer(x).detach(), y0, **TOL)
    merged = layer.weight.detach().clone()
    layer.fold()  # no-op
    assert torch.equal(layer.weight.detach(), merged)

    layer.unfold()
    assert not layer.folded
    torch.testing.assert_close(layer.weight.detach(), w0, **TOL)
    torch.testing.assert_close(layer(x).detach(), y0, **TOL)


def test_adapt_refuses_other_layer_types():
    with pytest.raises(TypeError, match="exactly Linear"):
        DoRALinear.adapt(nn.Conv2d(3, 3, 1), rank=2, alpha=2.0)


def test_dora_magnitude_and_direction():
    """m starts at the row norms of W; scaling m scales each output row, whatever B and A are."""
    _, layer, x = make_layer("dora", "linear")
    torch.testing.assert_close(layer.lora_magnitude.detach(), layer.weight.detach().norm(dim=1))
    randomize_trainables(layer, std=0.5)
    with torch.no_grad():
        w = layer.adapted_weight()
        torch.testing.assert_close(w.norm(dim=1), layer.lora_magnitude.abs(), **TOL)
        layer.lora_magnitude.mul_(2)
        torch.testing.assert_close(layer.adapted_weight(), 2 * w, **TOL)


def test_vera_delta_formula():
    _, layer, x = make_layer("vera", "linear")
    randomize_trainables(layer, std=0.5)
    d, b = layer.vera_d.detach(), layer.vera_b.detach()
    expected = torch.diag(b) @ layer.vera_B @ torch.diag(d) @ layer.vera_A
    torch.testing.assert_close(layer.delta_weight().detach(), expected, **TOL)
    assert torch.all(layer.vera_d.detach() != D_INIT)


# --- Whole models ---------------------------------------------------------------

@pytest.mark.parametrize("method, family", [("vera", "vit"), ("vera", "resnet"), ("dora", "vit"),
                                            ("dora", "resnet")])  # Linear and conv layers for each
def test_model_starts_as_base_and_merges_exactly(method, family):
    base = build(family)
    x = images()
    y_base = base(x).detach()
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_peft(base, config(f"{method}+norm+head"))
    assert reparam_layers(model)
    torch.testing.assert_close(model(x).detach(), y_base, **TOL)

    randomize_trainables(model)
    y = model(x).detach()
    assert not torch.allclose(y, y_base, atol=1e-3)
    plain = build(family, seed=1)
    plain.load_state_dict(merged_state_dict(model))  # strict: no adapter keys left
    torch.testing.assert_close(plain(x).detach(), y, **TOL)

    fold_adapters(model)
    assert all(layer.folded for layer in reparam_layers(model))
    torch.testing.assert_close(model(x).detach(), y, **TOL)
    unfold_adapters(model)
    for layer_name, layer in model.named_modules():
        if isinstance(layer, ReparamLayer):
            torch.testing.assert_close(layer.weight.detach(), weights[f"{layer_name}.weight"], **TOL)
    torch.testing.assert_close(model(x).detach(), y, **TOL)


def _is_norm_param(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    return isinstance(model.get_submodule(module_name), NORM_TYPES)


EXPECTED = {  # method -> which parameter names (besides nothing else) train
    "vera": lambda model, name, family: name.endswith((".vera_d", ".vera_b")),
    "dora": lambda model, name, family: name.endswith((".lora_A", ".lora_B", ".lora_magnitude")),
    "bitfit": lambda model, name, family: name.endswith(".bias"),
    "bitfit+head": lambda model, name, family: name.endswith(".bias") or name.startswith(HEADS[family]),
    "vera+norm+head": lambda model, name, family: (name.endswith((".vera_d", ".vera_b"))
                                                   or _is_norm_param(model, name) or name.startswith(HEADS[family])),
    "dora+head": lambda model, name, family: (name.endswith((".lora_A", ".lora_B", ".lora_magnitude"))
                                              or name.startswith(HEADS[family])),
}


@pytest.mark.parametrize("family, method", [("vit", method) for method in EXPECTED]
                         + [("resnet", method) for method in ("vera", "dora", "bitfit+head")])
def test_only_intended_parameters_train(family, method):
    model = apply_peft(build(family), config(method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if EXPECTED[method](model, n, family)}
    assert trainable and trainable == expected
    trained, total = count_parameters(model)
    assert trained == sum(p.numel() for n, p in model.named_parameters() if n in expected)

    randomize_trainables(model)  # VeRA's b and DoRA's B start at 0, which zeroes some gradients at init
    model.train()(images(4)).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in expected), name


def test_bitfit_trains_every_bias_including_norm_betas():
    model = apply_peft(build("vit"), PeftConfig(method="bitfit"))
    assert model.blocks[0].norm1.bias.requires_grad and model.blocks[0].attn.qkv.bias.requires_grad
    assert not model.blocks[0].norm1.weight.requires_grad and not model.blocks[0].attn.qkv.weight.requires_grad


def test_vera_matrices_shared_regenerated_from_seed_and_never_travel():
    model = apply_peft(build("vit", seed=0), PeftConfig(method="vera+head", vera_rank=16))
    fresh = apply_peft(build("vit", seed=1), PeftConfig(method="vera+head", vera_rank=16))
    other_seed = apply_peft(build("vit", seed=0), PeftConfig(method="vera+head", vera_rank=16, vera_seed=1))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, VeRALinear)}
    fresh_layers, other_layers = dict(fresh.named_modules()), dict(other_seed.named_modules())
    assert len(layers) == 8  # qkv, proj, fc1, fc2 in 2 blocks
    for name, layer in layers.items():
        assert torch.equal(layer.vera_A, fresh_layers[name].vera_A)
        assert torch.equal(layer.vera_B, fresh_layers[name].vera_B)
        assert not torch.equal(layer.vera_A, other_layers[name].vera_A)
    # one pair per shape: both blocks' qkv hold the same tensors; qkv (576 x 192) and fc1 (768 x 192) differ
    assert layers["blocks.0.attn.qkv"].vera_A is layers["blocks.1.attn.qkv"].vera_A
    assert layers["blocks.0.attn.qkv"].vera_A.shape == (16, 192)
    assert not torch.equal(layers["blocks.0.attn.qkv"].vera_B[:16], layers["blocks.0.mlp.fc1"].vera_B[:16])

    state = adapter_state(model)
    assert not any("vera_A" in k or "vera_B" in k for k in list(state) + list(model.state_dict()))
    assert {k for k in state if "vera" in k} == {f"{n}.vera_{v}" for n in layers for v in "db"}
    trainable, _ = count_parameters(model)
    head = 3 * 192 + 3
    assert trainable == sum(16 + layer.out_features for layer in layers.values()) + head
    assert sum(t.numel() * t.element_size() for t in state.values()) == 4 * trainable


@pytest.mark.parametrize("family, method", [("vit", "vera+norm+head"), ("vit", "dora+head"), ("vit", "bitfit+head"),
                                            ("resnet", "vera+norm+head")])  # with BatchNorm statistics
def test_adapter_state_round_trip(family, method):
    x = images()
    sender = apply_peft(build(family), config(method))
    randomize_trainables(sender)
    receiver = apply_peft(build(family), config(method))
    assert not torch.allclose(receiver(x), sender(x), atol=1e-3)
    load_adapter_state(receiver, adapter_state(sender))
    torch.testing.assert_close(receiver(x), sender(x), rtol=0, atol=0)


def test_config_validation_and_round_trip():
    for method in ("lora+dora", "vera+lora+head", "dora+vera"):
        with pytest.raises(ValueError, match="mutually exclusive"):
            PeftConfig(method=method)
    with pytest.raises(ValueError, match="DoRA supports neither"):
        PeftConfig(method="dora", lora_dropout=0.1)
    with pytest.raises(ValueError, match="vera_rank"):
        PeftConfig(method="vera", vera_rank=0)
    cfg = PeftConfig(method="vera+norm+head", vera_rank=32, vera_seed=7)
    assert PeftConfig.from_dict(cfg.to_dict()) == cfg


# --- GaLore ---------------------------------------------------------------------

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


def test_galore_param_groups_and_training():
    model = apply_peft(build("vit"), PeftConfig(method="full"))
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
