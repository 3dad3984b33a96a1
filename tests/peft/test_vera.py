"""peft/vera.py: VeRA's delta and its shared, seeded random matrices (its fold contract:
tests/peft/test_fold.py)."""

from __future__ import annotations

import torch

from fedmeld.peft import PeftConfig, VeRALinear, adapter_state, apply_peft, count_parameters
from fedmeld.peft.vera import D_INIT

TOL = dict(rtol=1e-5, atol=1e-5)


def test_vera_delta_formula(adapted_layer, randomize_trainables):
    _, _, layer, x = adapted_layer(VeRALinear)
    randomize_trainables(layer, std=0.5)
    d, b = layer.vera_d.detach(), layer.vera_b.detach()
    expected = torch.diag(b) @ layer.vera_B @ torch.diag(d) @ layer.vera_A
    torch.testing.assert_close(layer.delta_weight().detach(), expected, **TOL)
    assert torch.all(layer.vera_d.detach() != D_INIT)


def test_vera_matrices_shared_regenerated_from_seed_and_never_travel(tiny_timm_eval):
    model = apply_peft(tiny_timm_eval("vit", seed=0), PeftConfig(method="vera+head", vera_rank=16))
    fresh = apply_peft(tiny_timm_eval("vit", seed=1), PeftConfig(method="vera+head", vera_rank=16))
    other_seed = apply_peft(tiny_timm_eval("vit", seed=0), PeftConfig(method="vera+head", vera_rank=16, vera_seed=1))
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
