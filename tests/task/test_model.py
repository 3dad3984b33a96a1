"""task/model.py: building the backbone (random init, a local weights file the test writes itself,
offline errors), the adapters and the optimizer the run config names."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.model import WeightsError, build_model, create_backbone, weights_file


def test_random_init_is_identical_on_every_node():
    cfg = RunConfig.from_mapping({"model": "resnet10t"})
    a, b = create_backbone(cfg, task_info("breastmnist")), create_backbone(cfg, task_info("breastmnist"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    other = create_backbone(RunConfig.from_mapping({"model": "resnet10t", "seed": 1}), task_info("breastmnist"))
    assert not torch.equal(a.layer1[0].conv1.weight, other.layer1[0].conv1.weight)


def test_local_weights_file_loads_with_resized_head_and_adapted_input(tmp_path):
    """An ImageNet-shaped checkpoint (3 channels, 1000 classes) into a 1-channel, 2-class model."""
    torch.manual_seed(123)
    source = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "resnet10t.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))

    cfg = RunConfig.from_mapping({"model": "resnet10t", "weights": str(path)})
    model = create_backbone(cfg, task_info("breastmnist"))
    assert torch.equal(model.layer3[0].conv2.weight, source.layer3[0].conv2.weight)
    assert model.fc.out_features == 2 and model.conv1[0].in_channels == 1
    # timm adapts RGB filters to grayscale by summing over the input channels
    torch.testing.assert_close(model.conv1[0].weight, source.conv1[0].weight.sum(1, keepdim=True))
    random = create_backbone(RunConfig.from_mapping({"model": "resnet10t"}), task_info("breastmnist"))
    assert not torch.equal(random.layer3[0].conv2.weight, source.layer3[0].conv2.weight)


def test_missing_weights_file_is_named(tmp_path):
    cfg = RunConfig.from_mapping({"model": "resnet10t", "weights": str(tmp_path / "nope.safetensors")})
    with pytest.raises(WeightsError, match=r"nope\.safetensors does not exist"):
        create_backbone(cfg, task_info("breastmnist"))


def test_weights_directory_picks_the_model_file(tmp_path, monkeypatch):
    """weights=DIR (through $VAR) is DIR/<model>.safetensors; a directory without it names what it holds."""
    (tmp_path / "convnext_atto.safetensors").write_bytes(b"")
    monkeypatch.setenv("PRETRAINED", str(tmp_path))
    cfg = RunConfig.from_mapping({"model": "resnet10t", "weights": "$PRETRAINED"})
    assert weights_file(RunConfig.from_mapping({"model": "convnext_atto", "weights": "$PRETRAINED"})) == \
        tmp_path / "convnext_atto.safetensors"
    with pytest.raises(WeightsError, match=r"holds no resnet10t\.safetensors.*holds convnext_atto\.safetensors"
                                           r".*fedmeld pretrain --model resnet10t"):
        weights_file(cfg)
    monkeypatch.delenv("PRETRAINED")
    with pytest.raises(WeightsError, match=r"environment variable in it is not set"):
        weights_file(cfg)


def test_hub_weights_offline_say_how_to_go_on(tmp_path, repo):
    # huggingface_hub reads HF_HUB_OFFLINE at import, so ask as a user would: from a fresh process
    code = ("from fedmeld.task.config import RunConfig; from fedmeld.task.data import task_info; "
            "from fedmeld.task.model import create_backbone; "
            "create_backbone(RunConfig.from_mapping({'model': 'resnet10t', 'pretrained': True}), "
            "task_info('breastmnist'))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert re.search(r"WeightsError: could not fetch pretrained weights for resnet10t.*weights=/path/to/file"
                     r".*HF_HUB_OFFLINE=1.*pretrained=false", proc.stderr)


def test_vit_gets_the_data_image_size():
    cfg = RunConfig.from_mapping({"model": "vit_tiny_patch16_224", "image-size": 64, "peft": "lora"})
    model = build_model(cfg, task_info("retinamnist"))
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize("peft", ["vera+norm", "dora", "bitfit+norm"])
def test_adapters_are_selectable_from_the_run_config(peft):
    cfg = RunConfig.from_mapping({"model": "vit_tiny_patch16_224", "peft": peft})
    model = build_model(cfg, task_info("breastmnist"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"head.weight", "head.bias"} <= trainable and len(trainable) > 2


def test_galore_optimizer_from_the_run_config():
    from fedmeld.task.model import make_optimizer
    from fedmeld.peft import GaLoreAdamW

    cfg = RunConfig.from_mapping({"model": "resnet10t", "peft": "full", "optimizer": "galore-adamw", "galore-rank": 4})
    opt = make_optimizer(build_model(cfg, task_info("breastmnist")), cfg)
    assert isinstance(opt, GaLoreAdamW) and opt.param_groups[0]["rank"] == 4


def test_small_stem_keeps_a_28px_resnet18_at_4x4():
    """MedMNIST v2's "(28)" ResNet: 3x3 stride-1 stem, no max-pool; timm's stem would leave 1x1."""
    info = task_info("breastmnist")
    x = torch.zeros(2, 1, 28, 28)
    for stem, side in (("default", 1), ("small", 4)):
        model = create_backbone(RunConfig.from_mapping({"model": "resnet18", "stem": stem}), info)
        assert model.forward_features(x).shape[-2:] == (side, side), stem
    small = create_backbone(RunConfig.from_mapping({"model": "resnet18", "stem": "small"}), info)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, torch.nn.Identity)


@pytest.mark.parametrize("model, side", [("resnet10t", 4), ("convnext_atto", 1), ("efficientnet_b0", 2)])
def test_small_stem_on_other_families_adapts_and_trains(model, side):
    """Deep stems, ConvNeXt's patchify and EfficientNet's stem: larger late feature maps, LoRA still
    finds its targets and the head trains."""
    cfg = RunConfig.from_mapping({"model": model, "stem": "small", "peft": "lora"})
    built = build_model(cfg, task_info("breastmnist"))
    assert built.forward_features(torch.zeros(2, 1, 28, 28)).shape[-1] == side
    assert any("lora_B" in n for n, p in built.named_parameters() if p.requires_grad)


def test_small_stem_keeps_pretrained_weights_centre_cropped(tmp_path):
    info = task_info("breastmnist")
    source = timm.create_model("resnet18", num_classes=2, in_chans=1)
    save_file(source.state_dict(), str(tmp_path / "w.safetensors"))
    cfg = RunConfig.from_mapping({"model": "resnet18", "stem": "small", "weights": str(tmp_path / "w.safetensors")})
    model = create_backbone(cfg, info)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight[:, :, 2:5, 2:5])
    torch.testing.assert_close(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_small_stem_is_refused_where_it_is_not_defined():
    with pytest.raises(ConfigError, match="stem=small is defined for timm's ResNet"):
        create_backbone(RunConfig.from_mapping({"model": "vit_pico_patch4_28", "stem": "small"}), task_info("breastmnist"))


def test_model_args_reach_timm_and_bad_ones_are_refused():
    """model-args=zero_init_last=false: torchvision's ResNet init (timm zeroes each block's last BN γ)."""
    info = task_info("breastmnist")
    timm_init = create_backbone(RunConfig.from_mapping({"model": "resnet18"}), info)
    tv_init = create_backbone(RunConfig.from_mapping({"model": "resnet18", "model-args": "zero_init_last=false"}), info)
    assert not timm_init.layer1[0].bn2.weight.any() and tv_init.layer1[0].bn2.weight.eq(1).all()
    with pytest.raises(ConfigError, match="'model-args': must be comma-separated key=value"):
        RunConfig.from_mapping({"model-args": "zero_init_last"})


def test_torch_init_draws_every_layer_as_pytorch_constructs_it():
    """init=torch: the CIFAR-style ResNets of MedMNIST v2's (28) rows keep PyTorch's defaults; timm
    zero-initialises each block's last BatchNorm and draws convs Kaiming-normal (fan-out)."""
    info = task_info("breastmnist")
    timm_init = create_backbone(RunConfig.from_mapping({"model": "resnet18", "stem": "small"}), info)
    torch_init = create_backbone(RunConfig.from_mapping({"model": "resnet18", "stem": "small", "init": "torch"}), info)
    again = create_backbone(RunConfig.from_mapping({"model": "resnet18", "stem": "small", "init": "torch"}), info)
    assert torch.equal(torch_init.layer2[0].conv1.weight, again.layer2[0].conv1.weight)  # seeded
    assert (timm_init.layer1[0].bn2.weight == 0).all() and (torch_init.layer1[0].bn2.weight == 1).all()
    conv = torch_init.layer2[0].conv1.weight  # PyTorch: uniform within 1/sqrt(fan_in)
    bound = conv[0].numel() ** -0.5
    assert conv.abs().max() <= bound and conv.abs().max() > 0.95 * bound
    assert timm_init.layer2[0].conv1.weight.abs().max() > bound  # timm's Kaiming-normal reaches past it
    with pytest.raises(ConfigError, match="init=torch re-initialises the backbone"):
        RunConfig.from_mapping({"init": "torch", "pretrained": True})
