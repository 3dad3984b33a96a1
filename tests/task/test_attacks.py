"""task/attacks.py: each poisoned-client attack does what it says, on real shards and real adapter deltas."""

from __future__ import annotations

import pytest
import torch

from fedmeld.peft import adapter_state
from fedmeld.task.attacks import ATTACKS, parse_attackers
from fedmeld.task.config import ConfigError, RunConfig, parse_pairs
from fedmeld.task.data import Split, load_split, task_info
from fedmeld.task.model import build_model


@pytest.fixture(scope="module")
def real_delta() -> dict[str, torch.Tensor]:
    """A delta shaped like a real reply: ResNet-10t LoRA + norm + head (+ BatchNorm statistics and an
    integer tensor), each tensor moved by its own small random step."""
    model = build_model(RunConfig.from_mapping({"model": "resnet10t"}), task_info("breastmnist"))
    g = torch.Generator().manual_seed(0)
    delta = {k: 0.01 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model).items()}
    return {**delta, "step": torch.tensor(7)}


def test_the_registry_lists_the_drills():
    assert {n: a.kind for n, a in ATTACKS.items()} == {"sign-flip": "update", "scale": "update", "noise": "update",
                                                       "label-flip": "data"}
    cfg = RunConfig.from_mapping({"attack": "noise", "attackers": "3,0", "num-clients": 5})
    assert [cfg.attack_of(i) for i in range(5)] == [ATTACKS["noise"], None, None, ATTACKS["noise"], None]
    clean = RunConfig.from_mapping({"attackers": "3,0", "num-clients": 5})  # a drill's clean run: nobody attacks
    assert [clean.attack_of(i) for i in range(5)] == [None] * 5
    assert parse_attackers(" 3, 0,3 ") == (0, 3)
    from_command_line = parse_pairs(["attack=scale", "attackers=0"])  # TOML reads 0 as a number
    assert RunConfig.from_mapping(from_command_line).attackers == "0"
    with pytest.raises(ConfigError, match="'attackers'"):
        RunConfig.from_mapping({"attack": "scale", "attackers": "first"})


@pytest.mark.parametrize("name, factor", [("sign-flip", -5.0), ("scale", 5.0)])
def test_sign_flip_and_scale_send_k_times_the_honest_delta(name, factor, real_delta):
    """k·Δ on everything but the BatchNorm running variances, which go honest so that the server's
    validation (it rejects a reply that would make a variance negative) lets the reply through."""
    sent = ATTACKS[name].on_update(real_delta, 5.0, seed=0)
    assert sent.keys() == real_delta.keys() and torch.equal(sent["step"], real_delta["step"])  # integers untouched
    variances = [k for k in real_delta if k.endswith("running_var")]
    assert variances and any(k.endswith("running_mean") for k in real_delta)
    for k, v in real_delta.items():
        if v.is_floating_point():
            assert sent[k].dtype == v.dtype and torch.equal(sent[k], v if k in variances else factor * v), k


def test_noise_replaces_the_delta_by_noise_of_k_times_its_size(real_delta):
    sent = ATTACKS["noise"].on_update(real_delta, 3.0, seed=11)
    big = [k for k, v in real_delta.items() if v.is_floating_point() and v.numel() >= 1000]
    assert len(big) > 5
    for k in big:
        honest, noise = real_delta[k].double().flatten(), sent[k].double().flatten()
        assert noise.square().mean().sqrt() / honest.square().mean().sqrt() == pytest.approx(3.0, rel=0.1), k
        assert abs(torch.nn.functional.cosine_similarity(honest, noise, dim=0)) < 0.1, k  # unrelated to the update
    again, other = ATTACKS["noise"].on_update(real_delta, 3.0, seed=11), ATTACKS["noise"].on_update(real_delta, 3.0, 12)
    assert all(torch.equal(again[k], sent[k]) for k in sent) and not torch.equal(other[big[0]], sent[big[0]])
    assert ATTACKS["label-flip"].on_update(real_delta, 3.0, 0) is real_delta  # data attacks leave the update alone


@pytest.mark.parametrize("flag, mirror", [("breastmnist", lambda y: 1 - y), ("retinamnist", lambda y: 4 - y)])
def test_label_flip_mirrors_the_labels_of_a_real_shard(flag, mirror, medmnist_root):
    shard = load_split(flag, "train", 28, str(medmnist_root)).subset(torch.arange(200).numpy())
    flipped = ATTACKS["label-flip"].on_data(shard, task_info(flag))
    assert flipped.images is shard.images and torch.equal(flipped.labels, mirror(shard.labels))
    counts = torch.bincount(shard.labels.flatten(), minlength=task_info(flag).num_classes)
    assert torch.equal(torch.bincount(flipped.labels.flatten(), minlength=len(counts)), counts.flip(0))
    assert ATTACKS["sign-flip"].on_data(shard, task_info(flag)) is shard  # update attacks leave the data alone


def test_label_flip_flips_every_bit_of_a_multi_label_task():
    info = task_info("chestmnist")  # 14 binary labels per image
    labels = torch.randint(0, 2, (6, info.num_classes), generator=torch.Generator().manual_seed(0))
    flipped = ATTACKS["label-flip"].on_data(Split(torch.zeros(6, 1, 28, 28, dtype=torch.uint8), labels), info)
    assert torch.equal(flipped.labels, 1 - labels)


def test_attack_settings_that_cannot_run_are_refused():
    for bad, named in (({"attack": "sign-flip"}, "attack=sign-flip needs attackers"),
                       ({"attack": "scale", "attackers": "4"}, "below num-clients=4"),
                       ({"attack": "scale", "attackers": "0,1", "num-clients": 2}, "at least one honest"),
                       ({"attack": "noise", "attackers": "0", "peft": "lora", "aggregation": "exact"},
                        "use a data attack"),
                       ({"attack": "scale", "attackers": "0", "attack-scale": 0}, "'attack-scale'")):
        with pytest.raises(ConfigError, match=named):
            RunConfig.from_mapping(bad)
    RunConfig.from_mapping({"attack": "label-flip", "attackers": "0", "peft": "lora", "aggregation": "exact"})
