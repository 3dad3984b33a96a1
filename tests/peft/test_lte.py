"""peft/lte.py: LTE's batched LoRA heads and their exact merges (the federation around them:
tests/task/test_backbone_merge.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fedmeld.peft.lora import LoRAConv2d, LoRALinear
from fedmeld.peft.lte import inject_lte


def _perturb(layer, seed: int) -> None:
    """Random A and B, as after some training (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)


def _layers(heads: int, rank: int = 3) -> list[tuple[nn.Sequential, torch.Tensor, nn.Module]]:
    """A wrapped Linear and Conv2d, an input for each, and a plain copy of each base layer."""
    torch.manual_seed(0)
    cases = [(nn.Linear(12, 7), torch.randn(heads * 2, 4, 12)),
             (nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(heads * 2, 3, 9, 9))]
    out = []
    for layer, x in cases:
        plain = copy.deepcopy(layer)
        seq = nn.Sequential(layer)
        inject_lte(seq, heads, rank, 6.0)
        out.append((seq, x, plain))
    return out


@pytest.mark.parametrize("heads", [1, 4])
def test_batched_heads_equal_separate_lora_forwards(heads):
    for seq, x, plain in _layers(heads):
        layer = seq[0]
        _perturb(layer, 1)
        y = seq.train()(x)
        for h, xh in enumerate(x.chunk(heads)):
            lora_cls = LoRALinear if isinstance(plain, nn.Linear) else LoRAConv2d
            single = lora_cls.from_module(copy.deepcopy(plain), layer.rank, layer.lora_alpha)
            with torch.no_grad():
                single.lora_A.copy_(layer.lora_A[h])
                single.lora_B.copy_(layer.lora_B[h])
            torch.testing.assert_close(y[h * len(xh):(h + 1) * len(xh)], single(xh), rtol=1e-5, atol=1e-5)


def test_batch_not_divisible_by_heads_is_refused():
    seq, x, _ = _layers(4)[0]
    with pytest.raises(ValueError, match="divisible by lte-heads"):
        seq.train()(x[:5])


def test_resetless_merge_is_exact_and_telescopes():
    for seq, x, _ in _layers(3):
        layer = seq[0]
        w0 = layer.weight.detach().clone()
        _perturb(layer, 2)
        expected = w0 + layer.scaling * torch.einsum("hor,hri->oi", layer.lora_B, layer.lora_A.flatten(2)).view_as(w0) / 3
        before = seq.eval()(x)
        layer.merge_step()
        torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(seq(x), before, rtol=1e-5, atol=1e-5)  # eval sees the merged model either way
        # right after a merge every head computes the merged weight: heads are in sync
        torch.testing.assert_close(seq.train()(x), seq.eval()(x), rtol=1e-5, atol=1e-5)
        a_before = layer.lora_A.detach().clone()
        _perturb(layer, 3)  # more training, a second merge
        layer.merge_step()
        assert not torch.equal(layer.lora_A, a_before)  # nothing re-initialised: A is what training left
        b, a = layer.factors_since_reset()
        assert b.shape[1] == 3 * layer.rank  # rank H·r however many merges
        torch.testing.assert_close(layer.weight - w0, (b @ a.flatten(1)).view_as(w0), rtol=0, atol=1e-5)


def test_reinit_merge_is_exact_and_keeps_a_ledger():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(12, 7))
    inject_lte(seq, 2, 3, 6.0, mode="reinit")
    layer = seq[0]
    w0 = layer.weight.detach().clone()
    _perturb(layer, 4)
    expected = w0 + layer.scaling * (layer.lora_B[0] @ layer.lora_A[0] + layer.lora_B[1] @ layer.lora_A[1]) / 2
    old_a = layer.lora_A.detach().clone()
    layer.merge_step()
    torch.testing.assert_close(layer.weight, expected, rtol=0, atol=1e-6)
    assert torch.count_nonzero(layer.lora_B) == 0 and not torch.equal(layer.lora_A, old_a)
    _perturb(layer, 5)
    layer.merge_step()
    b, a = layer.factors_since_reset()
    assert b.shape[1] == 3 * 2 * 3  # two merged ledger entries + the (zero) live heads
    torch.testing.assert_close(layer.weight - w0, b @ a, rtol=0, atol=1e-5)
