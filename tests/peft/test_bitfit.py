"""peft/bitfit.py: BitFit trains every bias."""

from __future__ import annotations

from fedmeld.peft import PeftConfig, apply_peft


def test_bitfit_trains_every_bias_including_norm_betas(tiny_timm_eval):
    model = apply_peft(tiny_timm_eval("vit"), PeftConfig(method="bitfit"))
    assert model.blocks[0].norm1.bias.requires_grad and model.blocks[0].attn.qkv.bias.requires_grad
    assert not model.blocks[0].norm1.weight.requires_grad and not model.blocks[0].attn.qkv.weight.requires_grad
