"""peft/reparam.py: the shared machinery of VeRA and DoRA (their fold contract: tests/peft/test_fold.py)."""

from __future__ import annotations

import pytest
from torch import nn

from fedmeld.peft import DoRALinear


def test_adapt_refuses_other_layer_types():
    with pytest.raises(TypeError, match="exactly Linear"):
        DoRALinear.adapt(nn.Conv2d(3, 3, 1), rank=2, alpha=2.0)
