"""peft/hf.py: our LoRA/DoRA in Hugging Face peft's format and back.

The round trips run against HF peft itself in one subprocess whose cwd is a temp dir, so that
``import peft`` is Hugging Face's and not this checkout's folder. They compare outputs, not only
loading: HF peft loads a file with wrongly prefixed keys with just a warning and no effect (the
control case ``trap`` shows that the comparison catches that)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmeld.peft import adapter_state
from fedmeld.peft.hf import (CONFIG_FILE, PREFIX, WEIGHTS_FILE, AdapterMismatch, NotRepresentable, load_hf_peft,
                             read_hf_peft, save_hf_peft, to_hf_peft)
from fedmeld.task.config import RunConfig
from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import Inputs, train
from fedmeld.task.model import build_model, create_backbone, timm_model

VIT = ("vit_tiny_patch16_224", "patch_size=4,depth=2")  # timm's own ViT, shrunk: plain timm builds it
EXPORTS = {"resnet-lora": ("resnet10t", "", "lora+norm"), "resnet-dora": ("resnet10t", "", "dora+norm"),
           "vit-lora": (*VIT, "lora+norm"), "vit-dora": (*VIT, "dora+norm")}

WORKER = r"""
import json, sys
import peft, timm, torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

spec = json.load(open(sys.argv[1]))
x, out = load_file(spec["inputs"])["x"], {}
for job in spec["jobs"]:
    model = timm.create_model(job["model"], pretrained=False, **job["args"])
    model.load_state_dict(load_file(job["base"]))
    if "adapter" in job:
        model = PeftModel.from_pretrained(model, job["adapter"])
    else:  # an adapter trained elsewhere: HF peft's own, every trainable tensor random
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(**job["lora"]))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(job["save"])
    with torch.no_grad():
        out[job["case"]] = model.eval()(x)
save_file(out, spec["outputs"])
print(json.dumps({"peft": peft.__file__}))
"""


def _config(root, model: str, args: str, peft: str, **extra) -> RunConfig:
    return RunConfig.from_mapping({"data-root": str(root), "model": model, "model-args": args, "peft": peft,
                                   "lora-rank": 4, "lora-alpha": 8.0, "device": "cpu", **extra})


@pytest.fixture(scope="module")
def with_hf_peft(medmnist_root, tmp_path_factory):
    """fedmeld's exports of LoRA and DoRA models after real training steps, an adapter HF peft saved
    itself, and the trap, all through one HF peft subprocess: (our outputs, HF's outputs, work dir)."""
    work = tmp_path_factory.mktemp("hf")
    info = task_info("breastmnist")
    x = Inputs()(load_split("breastmnist", "test", data_root=str(medmnist_root)).images[:16], torch.device("cpu"))
    train_split = load_split("breastmnist", "train", data_root=str(medmnist_root)).subset(range(64))
    save_file({"x": x}, str(work / "x.safetensors"))
    ours, jobs = {}, []

    def job(case: str, cfg: RunConfig, **what) -> dict:
        save_file({k: v.contiguous() for k, v in create_backbone(cfg, info).state_dict().items()},
                  str(work / f"{case}.base.safetensors"))
        return {"case": case, "model": cfg.model, "args": timm_model(cfg, info)[1],
                "base": str(work / f"{case}.base.safetensors"), **what}

    for case, (model_name, args, peft) in EXPORTS.items():
        cfg = _config(medmnist_root, model_name, args, peft)
        model = build_model(cfg, info)
        train(model, train_split, info, epochs=1, batch_size=32, lr=0.01, weight_decay=0.0,
              device=torch.device("cpu"), seed=0)
        assert all(t.abs().max() > 0 for k, t in adapter_state(model).items() if k.endswith("lora_B"))
        save_hf_peft(model.eval(), work / case, base_model=cfg.model)
        with torch.no_grad():
            ours[case] = model(x)
        jobs.append(job(case, cfg, adapter=str(work / case)))
    config, tensors = read_hf_peft(work / "resnet-lora")  # its LoRA factors alone, keys without the prefix
    (work / "trap").mkdir()
    (work / "trap" / CONFIG_FILE).write_text(json.dumps({**config, "modules_to_save": None}))
    save_file({k.removeprefix(PREFIX): v for k, v in tensors.items() if ".lora_" in k}, str(work / "trap" / WEIGHTS_FILE))
    jobs.append({**jobs[0], "case": "trap", "adapter": str(work / "trap")})
    lora = {"r": 4, "lora_alpha": 16, "target_modules": r"layer\d\.\d\.conv\d", "modules_to_save": ["fc", "bn1"]}
    jobs.append(job("hf-saved", _config(medmnist_root, "resnet10t", "", "lora+norm"), lora=lora,
                    save=str(work / "hf-saved")))

    spec = {"inputs": str(work / "x.safetensors"), "outputs": str(work / "out.safetensors"), "jobs": jobs}
    (work / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([sys.executable, "-c", WORKER, str(work / "spec.json")], cwd=work, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "site-packages" in json.loads(done.stdout.splitlines()[-1])["peft"]  # Hugging Face's peft, not ours
    return ours, load_file(str(work / "out.safetensors")), work


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_hf_peft_loads_our_export_and_computes_what_we_compute(case, with_hf_peft):
    ours, theirs, _ = with_hf_peft
    assert (theirs[case] - ours[case]).abs().max() <= 1e-5


def test_outputs_catch_hf_peft_ignoring_unprefixed_keys(medmnist_root, with_hf_peft):
    """HF peft loads the trap (LoRA factors whose keys lack base_model.model.) with only a warning; the
    outputs show it (with modules_to_save keys it would raise a KeyError instead)."""
    ours, theirs, work = with_hf_peft
    assert (theirs["trap"] - ours["resnet-lora"]).abs().max() > 1e-3
    with pytest.raises(AdapterMismatch, match="prefix"):
        load_hf_peft(build_model(_config(medmnist_root, "resnet10t", "", "lora+norm"), task_info("breastmnist")),
                     *read_hf_peft(work / "trap"))


def test_adapter_saved_by_hf_peft_starts_a_run_through_init_adapter(medmnist_root, with_hf_peft):
    """HF's lora_alpha 16 at r=4 against the run's 8: B is rescaled, exactly; BatchNorms the adapter
    does not hold (HF kept only the bn1s) keep the backbone's values."""
    _, theirs, work = with_hf_peft
    cfg = _config(medmnist_root, "resnet10t", "", "lora+norm", **{"init-adapter": str(work / "hf-saved")})
    model = build_model(cfg, task_info(cfg.dataset)).eval()
    x = load_file(str(work / "x.safetensors"))["x"]
    with torch.no_grad():
        assert (model(x) - theirs["hf-saved"]).abs().max() <= 1e-5


# --- in-process: the format's contract and its refusals -------------------------------------------

@pytest.fixture
def exported(adapted, randomize_trainables, tmp_path):
    """``exported(family, method, **cfg)``: an adapted tiny model with random adapters, saved in HF's format."""
    def make(family: str = "resnet", method: str = "lora+norm+head", **cfg):
        model = adapted(family, method, lora_rank=4, lora_alpha=8.0, **cfg).eval()
        randomize_trainables(model)
        return model, save_hf_peft(model, tmp_path / f"{family}-{method}", base_model="resnet10t")

    return make


@pytest.mark.parametrize("family, method", [("resnet", "lora+norm+head"), ("vit", "dora+norm+head")])
def test_export_then_import_restores_the_adapter_exactly(family, method, exported, adapted, images):
    model, directory = exported(family, method)
    fresh = adapted(family, method, lora_rank=4, lora_alpha=8.0).eval()
    assert load_hf_peft(fresh, *read_hf_peft(directory)) == []
    for name, tensor in adapter_state(model).items():
        assert torch.equal(adapter_state(fresh)[name], tensor), name
    with torch.no_grad():
        assert torch.equal(fresh(images()), model(images()))


def test_a_different_alpha_is_rescaled_into_b(exported, adapted, images):
    model, directory = exported("vit", "lora+norm+head")
    other = adapted("vit", "lora+norm+head", lora_rank=4, lora_alpha=2.0).eval()
    load_hf_peft(other, *read_hf_peft(directory))
    with torch.no_grad():
        torch.testing.assert_close(other(images()), model(images()), rtol=1e-5, atol=1e-5)


def _edit_config(directory, **changes) -> tuple[dict, dict]:
    config, tensors = read_hf_peft(directory)
    return {**config, **changes}, tensors


@pytest.mark.parametrize("change, match", [
    (dict(r=8), "rank r=8, this run lora-rank=4"),
    (dict(use_dora=True), "the adapter is DoRA, this run trains LoRA"),
    (dict(base_model_name_or_path="timm/convnext_atto.d2_in1k"), "set model=convnext_atto"),
    (dict(peft_type="VERA"), "only LoRA"),
    (dict(bias="all"), "bias='all' is not supported"),
])
def test_import_refuses_a_config_the_run_cannot_compute(change, match, exported, adapted):
    _, directory = exported()
    with pytest.raises(AdapterMismatch, match=match):
        load_hf_peft(adapted("resnet", lora_rank=4, lora_alpha=8.0), *_edit_config(directory, **change),
                     model_name="resnet10t")


def test_import_refuses_other_targets_and_tensors_the_run_does_not_train(exported, adapted):
    _, directory = exported()
    with pytest.raises(AdapterMismatch, match="target modules differ.*only in the adapter.*layer1.0.conv2"):
        load_hf_peft(adapted("resnet", lora_rank=4, target_modules=["layer*.conv1"]), *read_hf_peft(directory))
    with pytest.raises(AdapterMismatch, match="does not train.*bn1"):
        load_hf_peft(adapted("resnet", "lora+head", lora_rank=4, bn_stats="frozen"), *read_hf_peft(directory))
    with pytest.raises(AdapterMismatch, match="adapter_config.json, adapter_model.safetensors missing"):
        read_hf_peft(directory.parent / "nothing")


@pytest.mark.parametrize("family, method, match", [
    ("resnet", "vera+head", "VeRA"),
    ("vit", "lte", "MultiLoRA"),
    ("vit", "lora+bitfit+head", "bitfit"),  # qkv's bias would train inside a LoRA layer
    ("resnet", "norm+head", "no LoRA/DoRA layer"),
])
def test_adapters_hf_lora_cannot_hold_are_refused(family, method, match, adapted):
    with pytest.raises(NotRepresentable, match=match):
        to_hf_peft(adapted(family, method))


def test_config_names_every_wrapped_layer_and_trained_module(adapted):
    model = adapted("resnet", "lora+norm+head", lora_rank=4, lora_alpha=8.0)
    config, tensors = to_hf_peft(model, base_model="resnet10t")
    wrapped = sorted(n for n, m in model.named_modules() if hasattr(m, "lora_B"))
    assert config["target_modules"] == wrapped and {"fc", "bn1", "layer1.0.bn1"} <= set(config["modules_to_save"])
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_dora"]) == ("LORA", 4, 8.0, False)
    assert tensors[f"{PREFIX}layer1.0.conv1.lora_B.weight"].shape[2:] == (1, 1)  # conv B as HF's 1x1 conv
    assert f"{PREFIX}layer1.0.bn1.num_batches_tracked" in tensors and f"{PREFIX}fc.weight" in tensors
