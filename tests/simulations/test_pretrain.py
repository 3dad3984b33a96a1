"""simulations/pretrain.py: a tiny pretraining writes a bf16 file and its card, the file loads through
``weights=`` into every model family with the classifier resized, an interrupted run resumes to the
same weights, and a target among the pretraining datasets is refused."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from fedmeld.simulations import pretrain
from fedmeld.task.config import RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.fractal import FractalImages
from fedmeld.task.model import create_backbone

FAMILIES = {  # family -> (model, model-args): small enough to pretrain a few steps on a CPU
    "resnet": ("resnet10t", ""),
    "convnext": ("convnext_atto", ""),
    "efficientnet": ("efficientnet_b0", ""),
    "vit": ("vit_tiny_patch16_224", "patch_size=8,depth=2"),
}
TINY = ["--source", "fractal", "--resolution", "32", "--categories", "4", "--batch-size", "8", "--images", "24",
        "--log-every", "1000"]


@pytest.mark.parametrize("family", FAMILIES)
def test_pretrained_file_loads_into_the_family_with_the_head_resized(family, tmp_path):
    model, model_args = FAMILIES[family]
    out = tmp_path / f"{model}.safetensors"
    assert pretrain.main(["--model", model, "--model-args", model_args, "--out", str(out), *TINY]) == 0
    card = json.loads(out.with_name(out.name + ".json").read_text())
    assert card["images_seen"] == 24 and card["steps"] == 3 and card["resolution"] == 32 and card["in_chans"] == 1
    assert card["command"].startswith(f"fedmeld pretrain --model {model}") and card["hardware"] and card["date"]
    assert not out.with_name(out.name + ".ckpt.pt").exists()
    stored = load_file(str(out))
    assert all(t.dtype == torch.bfloat16 for t in stored.values() if t.is_floating_point())

    cfg = RunConfig.from_mapping({"model": model, "model-args": model_args, "input-size": 32,
                                  "weights": str(tmp_path)})  # a directory: <dir>/<model>.safetensors
    loaded = create_backbone(cfg, task_info("breastmnist"))
    head = loaded.get_classifier()
    assert head.out_features == 2
    names = {id(p): n for n, p in loaded.named_parameters()}
    assert not any(names[id(p)] in stored for p in head.parameters())  # the classifier was left out
    first = loaded.pretrained_cfg["first_conv"] + ".weight"
    assert stored[first].shape[1] == 3 and loaded.get_parameter(first).shape[1] == 1
    body = [n for n in stored if n != first and stored[n].is_floating_point() and stored[n].ndim > 1]
    assert body and all(torch.equal(loaded.state_dict()[n].to(torch.bfloat16), stored[n]) for n in body)
    assert loaded(torch.zeros(2, 1, 32, 32)).shape == (2, 2)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    args = ["--model", "resnet10t", "--checkpoint-every", "1e-9", *TINY]
    straight = tmp_path / "straight.safetensors"
    assert pretrain.main([*args, "--out", str(straight)]) == 0

    resumed = tmp_path / "resumed.safetensors"
    real = FractalImages.batch

    def cut_at_step_2(self, step, size):
        if step == 2:
            raise KeyboardInterrupt
        return real(self, step, size)

    monkeypatch.setattr(FractalImages, "batch", cut_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main([*args, "--out", str(resumed)])
    assert resumed.with_name(resumed.name + ".ckpt.pt").is_file() and not resumed.exists()
    monkeypatch.setattr(FractalImages, "batch", real)
    assert pretrain.main([*args, "--out", str(resumed)]) == 0
    a, b = load_file(str(straight)), load_file(str(resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert pretrain.main([*args, "--out", str(resumed)]) == 0  # done: nothing to do
    assert pretrain.main([*args, "--seed", "1", "--out", str(resumed)]) == 2  # another run's file: refused


def test_medmnist_source_learns_other_datasets_and_refuses_the_target(tmp_path, medmnist_root, capsys):
    common = ["--model", "resnet10t", "--source", "medmnist", "--data-root", str(medmnist_root), "--resolution", "32",
              "--batch-size", "8", "--images", "16", "--log-every", "1000", "--out", str(tmp_path / "m.safetensors")]
    with pytest.raises(SystemExit):
        pretrain.main([*common, "--datasets", "retinamnist,breastmnist", "--target", "breastmnist"])
    assert "includes the target breastmnist" in capsys.readouterr().err
    assert pretrain.main([*common, "--datasets", "retinamnist"]) == 0
    card = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert card["classes"] == 5 and card["medmnist"]["datasets"] == ["retinamnist"]


def test_the_first_steps_warm_up_does_not_eat_a_seconds_budget(tmp_path, monkeypatch):
    """A first step slower than the whole budget (cuDNN autotuning on a busy host: 30 s of a 30 s
    stage on the H200) is timed apart, and the budget's seconds still train."""
    real = FractalImages.batch

    def slow_first_step(self, step, size):
        if step == 0:
            time.sleep(1.0)
        return real(self, step, size)

    monkeypatch.setattr(FractalImages, "batch", slow_first_step)
    out = tmp_path / "warm.safetensors"
    budget = ["--seconds", "0.5", "--source", "fractal", "--resolution", "32", "--categories", "4", "--batch-size",
              "8", "--log-every", "1000"]
    assert pretrain.main(["--model", "resnet10t", *budget, "--out", str(out)]) == 0
    card = json.loads(out.with_name(out.name + ".json").read_text())
    assert card["steps"] > 2  # before: the first step spent the budget, and the stage ended after it
    assert card["warmup_seconds"] >= 1.0 and 0.5 <= card["seconds"] < 1.0
