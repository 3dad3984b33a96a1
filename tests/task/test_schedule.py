"""task/schedule.py: the learning rate each round and local epoch trains with."""

from __future__ import annotations

import math

import pytest

from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.schedule import lr_at


def _cfg(**overrides) -> RunConfig:
    return RunConfig.from_mapping({"lr": 0.001, "num-server-rounds": 100, "local-epochs": 1, **overrides})


def test_multistep_is_medmnist_v2s_schedule():
    """lr x 0.1 at epochs 50 and 75 of 100 (0-based epochs, as torch's MultiStepLR steps per epoch)."""
    cfg = _cfg(**{"lr-schedule": "multistep", "lr-milestones": "50,75"})
    rates = [lr_at(cfg, r) for r in range(1, 101)]
    assert rates[:50] == [0.001] * 50
    assert rates[50:75] == pytest.approx([1e-4] * 25) and rates[75:] == pytest.approx([1e-5] * 25)


def test_constant_cosine_and_warmup():
    assert {lr_at(_cfg(), r) for r in (1, 50, 100)} == {0.001}
    cosine = _cfg(**{"lr-schedule": "cosine", "num-server-rounds": 10})
    assert lr_at(cosine, 1) == 0.001 and lr_at(cosine, 6) == pytest.approx(0.0005)
    assert lr_at(cosine, 10) == pytest.approx(0.001 * 0.5 * (1 + math.cos(math.pi * 0.9)))
    warm = _cfg(**{"lr-schedule": "cosine", "num-server-rounds": 12, "lr-warmup": 2})
    assert [lr_at(warm, r) for r in (1, 2, 3)] == pytest.approx([0.0005, 0.001, 0.001])


def test_local_epochs_are_fractions_of_a_round():
    """With 2 local epochs the second epoch of round 50 is t = 49.5: still before milestone 50."""
    cfg = _cfg(**{"lr-schedule": "multistep", "lr-milestones": "50", "local-epochs": 2})
    assert [lr_at(cfg, 50, e) for e in (0, 1)] == [0.001, 0.001] and lr_at(cfg, 51, 0) == pytest.approx(1e-4)
    cosine = _cfg(**{"lr-schedule": "cosine", "local-epochs": 2, "num-server-rounds": 2})
    assert lr_at(cosine, 1, 1) == pytest.approx(0.001 * 0.5 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("overrides, says", [
    ({"lr-schedule": "multistep"}, "needs lr-milestones"),
    ({"lr-milestones": "50,x"}, "comma-separated integers"),
    ({"lr-warmup": 100}, "fewer than num-server-rounds"),
])
def test_bad_schedules_are_refused(overrides, says):
    with pytest.raises(ConfigError, match=says):
        _cfg(**overrides)
