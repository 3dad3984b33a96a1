"""peft/config.py: PeftConfig round trips and refuses bad values with what is valid."""

from __future__ import annotations

import json

import pytest

from fedmeld.peft import PeftConfig


def test_config_round_trip_and_validation():
    cfg = PeftConfig(method="norm+lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
                     target_modules=["qkv"], bn_stats="frozen")
    assert PeftConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.components == PeftConfig(method="lora+norm").components == ("lora", "norm")

    with pytest.raises(ValueError, match=r"valid components.*'full'.*'head'.*'lora'.*'norm'"):
        PeftConfig(method="lora+bogus")
    with pytest.raises(ValueError, match="full"):
        PeftConfig(method="full+lora")
    with pytest.raises(ValueError, match="bn_stats.*aggregate"):
        PeftConfig(bn_stats="local")
    with pytest.raises(ValueError, match="lora_rank"):
        PeftConfig(lora_rank=0)
    with pytest.raises(ValueError, match="target_modules"):
        PeftConfig(target_modules="qkv")
    with pytest.raises(ValueError, match="unknown fields"):
        PeftConfig.from_dict({"rank": 4})


def test_frozen_a_config_validation():
    assert PeftConfig.from_dict(PeftConfig(lora_freeze_a=True, lora_seed=3).to_dict()).lora_freeze_a
    with pytest.raises(ValueError, match="lora_freeze_a"):
        PeftConfig(lora_freeze_a=1)
    with pytest.raises(ValueError, match="lora_seed"):
        PeftConfig(lora_seed=-1)


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
