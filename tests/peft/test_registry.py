"""peft/registry.py: a new adapter is one registered function."""

from __future__ import annotations

import pytest

from fedmeld.peft import ADAPTERS, register_adapter


def test_register_custom_adapter(adapted):
    @register_adapter("bias", help="every bias")
    def apply_bias(model, cfg):
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.requires_grad_(True)

    try:
        model = adapted("vit", "bias")
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.endswith(".bias") for n in trainable)
        with pytest.raises(ValueError, match="already registered"):
            register_adapter("bias", help="again")(apply_bias)
    finally:
        del ADAPTERS["bias"]
