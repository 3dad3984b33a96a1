"""peft/api.py: apply_peft and what trains, adapter_state in and out, count_parameters, and
fold_adapters/unfold_adapters/merged_state_dict on whole models (LoRA, VeRA, DoRA, BitFit, norm, head,
full). Tiny random-init timm models, CPU, no downloads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmeld.peft import (PeftConfig, adapter_state, apply_peft, count_parameters, fold_adapters, load_adapter_state,
                          merged_state_dict, unfold_adapters)
from fedmeld.peft.norm import NORM_TYPES
from fedmeld.peft.reparam import ReparamLayer

HEADS = {"vit": "head", "resnet": "fc", "convnext": "head.fc", "effnet": "classifier"}
TOL = dict(rtol=1e-5, atol=1e-5)
VERA_RANK = 32  # the default (256) makes ResNet's 3x3 kernels slow to adapt on a CPU


# --- apply_peft: what trains ------------------------------------------------------

def test_apply_twice_refused(adapted):
    model = adapted("vit", "lora")
    with pytest.raises(ValueError, match="already"):
        apply_peft(model, PeftConfig(method="lora"))


def expected_trainable(model: nn.Module, family: str, components: tuple[str, ...]) -> set[str]:
    norm_params = {f"{mn}.{pn}" for mn, m in model.named_modules() if isinstance(m, NORM_TYPES)
                   for pn, _ in m.named_parameters(recurse=False)}
    names = set()
    for name, _ in model.named_parameters():
        if ("full" in components
                or ("lora" in components and "lora_" in name)
                or ("norm" in components and name in norm_params)
                or ("head" in components and name.startswith(HEADS[family] + "."))):
            names.add(name)
    return names


@pytest.mark.parametrize("family", ["vit", "resnet"])
@pytest.mark.parametrize("method", ["lora", "norm", "head", "full", "lora+norm", "lora+norm+head"])
def test_trainable_parameters_and_grads(family, method, adapted, images):
    model = adapted(family, method)
    expected = expected_trainable(model, family, model.peft_config.components)
    assert expected
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    model(images()).square().sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == expected


def config(method: str, **kwargs) -> PeftConfig:
    return PeftConfig(method=method, vera_rank=VERA_RANK, **kwargs)


def _is_norm_param(model: nn.Module, name: str) -> bool:
    module_name = name.rpartition(".")[0]
    return isinstance(model.get_submodule(module_name), NORM_TYPES)


EXPECTED = {  # method -> which parameter names (besides nothing else) train
    "vera": lambda model, name, family: name.endswith((".vera_d", ".vera_b")),
    "dora": lambda model, name, family: name.endswith((".lora_A", ".lora_B", ".lora_magnitude")),
    "bitfit": lambda model, name, family: name.endswith(".bias"),
    "bitfit+head": lambda model, name, family: name.endswith(".bias") or name.startswith(HEADS[family] + "."),
    "vera+norm+head": lambda model, name, family: (name.endswith((".vera_d", ".vera_b")) or _is_norm_param(model, name)
                                                   or name.startswith(HEADS[family] + ".")),
    "dora+head": lambda model, name, family: (name.endswith((".lora_A", ".lora_B", ".lora_magnitude"))
                                              or name.startswith(HEADS[family] + ".")),
}


@pytest.mark.parametrize("family, method", [("vit", method) for method in EXPECTED]
                         + [("resnet", method) for method in ("vera", "dora", "bitfit+head")])
def test_only_intended_parameters_train(family, method, tiny_timm_eval, images, randomize_trainables):
    model = apply_peft(tiny_timm_eval(family), config(method))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if EXPECTED[method](model, n, family)}
    assert trainable and trainable == expected
    trained, total = count_parameters(model)
    assert trained == sum(p.numel() for n, p in model.named_parameters() if n in expected)

    randomize_trainables(model)  # VeRA's b and DoRA's B start at 0, which zeroes some gradients at init
    model.train()(images(4)).square().mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in expected), name


# --- counting and adapter state ----------------------------------------------------

def test_count_parameters_linear_lora(tiny_timm, adapted):
    rank, dim, depth = 4, 192, 2
    base_total = sum(p.numel() for p in tiny_timm("vit").parameters())
    model = adapted("vit", "lora", lora_rank=rank)
    per_block = sum(rank * (i + o) for i, o in [(dim, 3 * dim), (dim, dim), (dim, 4 * dim), (4 * dim, dim)])
    assert count_parameters(model) == (depth * per_block, base_total + depth * per_block)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_adapter_state_round_trip(family, adapted, images, perturb_adapters):
    a = adapted(family, seed=0)
    perturb_adapters(a)
    a.train()(images(4))  # moves BN running stats
    state = adapter_state(a)
    assert list(state) == sorted(state)
    assert not any("num_batches_tracked" in k for k in state)

    b = adapted(family, seed=0)
    assert not all(torch.equal(v, state[k]) for k, v in adapter_state(b).items())
    load_adapter_state(b, state)
    state_b = adapter_state(b)
    assert state_b.keys() == state.keys() and all(torch.equal(state_b[k], state[k]) for k in state)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(images()), b.eval()(images()), rtol=0, atol=0)

    key = next(iter(state))
    state[key].add_(1)  # a clone: the model is untouched
    assert not torch.equal(adapter_state(a)[key], state[key])


@pytest.mark.parametrize("family, method", [("vit", "vera+norm+head"), ("vit", "dora+head"), ("vit", "bitfit+head"),
                                            ("resnet", "vera+norm+head")])  # with BatchNorm statistics
def test_adapter_state_round_trip_vera_dora_bitfit(family, method, tiny_timm_eval, images, randomize_trainables):
    x = images()
    sender = apply_peft(tiny_timm_eval(family), config(method))
    randomize_trainables(sender)
    receiver = apply_peft(tiny_timm_eval(family), config(method))
    assert not torch.allclose(receiver(x), sender(x), atol=1e-3)
    load_adapter_state(receiver, adapter_state(sender))
    torch.testing.assert_close(receiver(x), sender(x), rtol=0, atol=0)


def test_load_adapter_state_strict_errors(adapted):
    model = adapted("vit")
    state = adapter_state(model)
    key = next(k for k in state if "lora_A" in k)

    with pytest.raises(KeyError, match=key):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(KeyError, match="extra.weight"):
        load_adapter_state(model, {**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=key):
        load_adapter_state(model, {**state, key: torch.zeros(1, 2)})

    partial = {key: torch.ones_like(state[key]), "extra.weight": torch.zeros(1)}
    load_adapter_state(model, partial, strict=False)
    assert torch.equal(adapter_state(model)[key], partial[key])


def test_full_adapter_state_is_state_dict(adapted):
    model = adapted("resnet", "full")
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    assert set(adapter_state(model)) == expected


# --- whole models: fold_adapters, unfold_adapters, merged_state_dict -----------------

@pytest.mark.parametrize("family", ["vit", "resnet", "convnext"])
def test_model_merge_unmerge(family, adapted, images, perturb_adapters):
    model = adapted(family).eval()
    perturb_adapters(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        y0 = model(images())
        fold_adapters(model)
        torch.testing.assert_close(model(images()), y0, **TOL)
        unfold_adapters(model)
        torch.testing.assert_close(model(images()), y0, **TOL)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), weights[n], **TOL)


@pytest.mark.parametrize("family", ["vit", "resnet", "convnext"])
def test_merged_state_dict_loads_into_plain_model(family, tiny_timm, adapted, images, lora_names, perturb_adapters):
    model = adapted(family).eval()
    perturb_adapters(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = merged_state_dict(model)
    assert not any("lora_" in k for k in merged)

    plain = tiny_timm(family, seed=123).eval()
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(images()), model(images()), **TOL)
    assert not any(m.folded for n, m in model.named_modules() if n in lora_names(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def reparam_layers(model: nn.Module) -> list[ReparamLayer]:
    return [m for m in model.modules() if isinstance(m, ReparamLayer)]


@pytest.mark.parametrize("method, family", [("vera", "vit"), ("vera", "resnet"), ("dora", "vit"),
                                            ("dora", "resnet")])  # Linear and conv layers for each
def test_model_starts_as_base_and_merges_exactly(method, family, tiny_timm_eval, images, randomize_trainables):
    base = tiny_timm_eval(family)
    x = images()
    y_base = base(x).detach()
    weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = apply_peft(base, config(f"{method}+norm+head"))
    assert reparam_layers(model)
    torch.testing.assert_close(model(x).detach(), y_base, **TOL)

    randomize_trainables(model)
    y = model(x).detach()
    assert not torch.allclose(y, y_base, atol=1e-3)
    plain = tiny_timm_eval(family, seed=1)
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
