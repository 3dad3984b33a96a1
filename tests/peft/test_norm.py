"""peft/norm.py: the norm component and the BatchNorm running-statistics policy (bn_stats)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fedmeld.peft import adapter_state


def test_norm_mode_equals_hand_written_floor(tiny_timm, adapted):
    """``norm`` trains exactly the norm affine params: nothing beyond the hand-written floor."""
    model = adapted("convnext", "norm")
    floor = tiny_timm("convnext").requires_grad_(False)
    for m in floor.modules():
        if isinstance(m, (nn.LayerNorm, nn.GroupNorm, _BatchNorm)):
            m.requires_grad_(True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
           {n for n, p in floor.named_parameters() if p.requires_grad}
    assert dict(model.named_modules()).keys() == dict(floor.named_modules()).keys()  # no wrappers either


def test_bn_stats_aggregate(adapted, images):
    model = adapted("resnet", "lora")
    state = adapter_state(model)
    assert "bn1.running_mean" in state and "layer1.0.bn2.running_var" in state
    assert not any("num_batches_tracked" in k for k in state)
    model.train()(images(4))
    assert not torch.equal(model.bn1.running_mean, state["bn1.running_mean"])


def test_bn_stats_frozen(adapted, images):
    model = adapted("resnet", "lora+norm", bn_stats="frozen")
    assert not any("running_" in k for k in adapter_state(model))
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    model.train()
    y_train = model(images(4))
    y_train.sum().backward()
    model(images(4))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in stats.items())
    assert model.bn1.weight.grad is not None  # affine params still train
    with torch.no_grad():
        torch.testing.assert_close(y_train.detach(), model.eval()(images(4)))  # BN ran in eval mode
