"""The fold contract of every foldable layer type (LoRA, DoRA, VeRA; Linear and Conv2d), one test for all:
the layer starts as the base layer; ``fold`` writes ``weight + delta_weight()`` into ``weight`` and changes
no output; folding twice is a no-op; folded, the adapter's tensors get no gradient; ``unfold`` restores
the weight; ``merged_state_dict`` gives the folded weight without touching the layer and loads into the
plain base layer."""

from __future__ import annotations

import copy

import pytest
import torch

from fedmeld.peft import (DoRAConv2d, DoRALinear, LoRAConv2d, LoRALinear, VeRAConv2d, VeRALinear,
                          merged_state_dict)

TOL = dict(rtol=1e-5, atol=1e-5)
EXACT = dict(rtol=0, atol=0)

# layer type -> (its adapter parameters with their shapes on adapted_layer's Linear(16, 8) / Conv2d(6, 10, 3x3)
# at rank 4, how close to the base layer it starts)
CASES = {
    LoRALinear: ({"lora_A": (4, 16), "lora_B": (8, 4)}, EXACT),  # B = 0 at init
    LoRAConv2d: ({"lora_A": (4, 6, 3, 3), "lora_B": (10, 4)}, EXACT),
    DoRALinear: ({"lora_A": (4, 16), "lora_B": (8, 4), "lora_magnitude": (8,)}, TOL),
    DoRAConv2d: ({"lora_A": (4, 6, 3, 3), "lora_B": (10, 4), "lora_magnitude": (10,)}, TOL),
    VeRALinear: ({"vera_d": (4,), "vera_b": (8,)}, TOL),  # vera_A/vera_B: shared buffers, not parameters
    VeRAConv2d: ({"vera_d": (4,), "vera_b": (10,)}, TOL),
}


@pytest.mark.parametrize("cls", list(CASES), ids=lambda cls: cls.__name__)
def test_layer_starts_as_base_folds_and_unfolds_exactly(cls, adapted_layer):
    own, start_tol = CASES[cls]
    base, reference, layer, x = adapted_layer(cls)
    assert isinstance(layer, cls) and not layer.folded
    assert layer.weight is base.weight and layer.bias is base.bias  # the base's own Parameters
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == {
        "weight": tuple(reference.weight.shape), "bias": tuple(reference.bias.shape), **own}
    torch.testing.assert_close(layer(x), reference(x), **start_tol)

    with torch.no_grad():  # only the adapter's own tensors move: the base weight stays the reference's
        for name in own:
            getattr(layer, name).add_(0.5 * torch.randn_like(getattr(layer, name)))
    w0, y0, delta = layer.weight.detach().clone(), layer(x).detach(), layer.delta_weight().detach()
    assert delta.shape == w0.shape
    assert not torch.allclose(y0, reference(x), atol=1e-3)  # the adapter does something
    merged = merged_state_dict(layer)
    assert torch.equal(layer.weight, w0) and not layer.folded  # merged_state_dict leaves the layer alone

    layer.fold()
    assert layer.folded
    torch.testing.assert_close(layer.weight.detach(), w0 + delta)
    torch.testing.assert_close(merged["weight"], layer.weight.detach())
    torch.testing.assert_close(layer(x).detach(), y0, **TOL)
    folded = layer.weight.detach().clone()
    layer.fold()  # no-op
    assert torch.equal(layer.weight.detach(), folded)
    assert torch.equal(merged_state_dict(layer)["weight"], folded)  # folded: the weight as it is
    layer(x).square().sum().backward()
    assert all(getattr(layer, name).grad is None for name in own)  # folded: no adapter gradients

    layer.unfold()
    assert not layer.folded
    torch.testing.assert_close(layer.weight.detach(), w0, **TOL)
    torch.testing.assert_close(layer(x).detach(), y0, **TOL)

    plain = copy.deepcopy(reference)
    plain.load_state_dict(merged)  # strict: no adapter keys left
    torch.testing.assert_close(plain(x).detach(), y0, **TOL)
