"""peft/dora.py: DoRA's magnitude and direction (its fold contract: tests/peft/test_fold.py)."""

from __future__ import annotations

import torch

from fedmeld.peft import DoRALinear

TOL = dict(rtol=1e-5, atol=1e-5)


def test_dora_magnitude_and_direction(adapted_layer, randomize_trainables):
    """m starts at the row norms of W; scaling m scales each output row, whatever B and A are."""
    _, _, layer, x = adapted_layer(DoRALinear)
    torch.testing.assert_close(layer.lora_magnitude.detach(), layer.weight.detach().norm(dim=1))
    randomize_trainables(layer, std=0.5)
    with torch.no_grad():
        w = layer.adapted_weight()
        torch.testing.assert_close(w.norm(dim=1), layer.lora_magnitude.abs(), **TOL)
        layer.lora_magnitude.mul_(2)
        torch.testing.assert_close(layer.adapted_weight(), 2 * w, **TOL)
