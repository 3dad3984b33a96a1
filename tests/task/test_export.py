"""task/export.py: a run's outputs opened without fedmeld (timm's config.json beside the merged models,
Hugging Face peft adapter directories), and init-adapter starting a run from such an adapter."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from fedmeld.peft import merged_state_dict
from fedmeld.server.delta import DeltaProtocol
from fedmeld.simulations.run import load_config, simulate
from fedmeld.task.config import ConfigError, RunConfig
from fedmeld.task.data import task_info
from fedmeld.task.engine import medmnist_acc, medmnist_auc
from fedmeld.task.export import MERGED, STEM_ARG, TIMM_CONFIG, load_exported, write_hf_peft, write_timm_config
from fedmeld.task.model import build_model

# The README's snippet, in a process that imports torch, timm, safetensors (through timm), numpy and PIL only.
PLAIN_TIMM = r"""
import json, sys
import numpy as np, timm, torch
from PIL import Image

run, npz, out = sys.argv[1:4]
cfg = json.load(open(f"{run}/config.json"))
for weights in ("model_merged", "model_selected"):
    model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=f"{run}/{weights}.safetensors"))
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
    x = torch.stack([transform(Image.fromarray(image)) for image in np.load(npz)["test_images"]])
    with torch.no_grad():
        np.save(f"{out}/{weights}.npy", model.eval()(x).softmax(-1).numpy())
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("fedmeld", "peft", "medmnist", "flwr"))))
"""


@pytest.fixture(scope="module")
def tiny_run(medmnist_root, tmp_path_factory):
    """One round of a real two-client federation (model-args recorded in config.json)."""
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{out}"', 'run-name="export"', 'model="resnet10t"',
                             'model-args="zero_init_last=false"', "num-clients=2", "num-server-rounds=1",
                             "local-epochs=1", "batch-size=64", 'device="cpu"'])
    run = simulate(cfg, backend="inprocess")
    return cfg, run, json.loads((run / "summary.json").read_text())


def test_plain_timm_rebuilds_the_exports_and_scores_the_runs_test_metrics(tiny_run, medmnist_root, tmp_path):
    """The README's snippet, in a fresh process with plain timm and timm's own preprocessing from
    config.json: the last and the selected round's models score what summary.json reports."""
    cfg, run, summary = tiny_run
    npz = medmnist_root / f"{cfg.dataset}.npz"
    done = subprocess.run([sys.executable, "-c", PLAIN_TIMM, str(run), str(npz), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []  # neither fedmeld nor Hugging Face peft was imported
    info, y_true = task_info(cfg.dataset), np.load(npz)["test_labels"]
    for weights, prefix in (("model_merged", "final"), ("model_selected", "selected")):
        y_score = np.load(tmp_path / f"{weights}.npy")
        assert medmnist_acc(y_true, y_score, info) == summary[f"{prefix}_test_accuracy"]
        assert medmnist_auc(y_true, y_score, info) == pytest.approx(summary[f"{prefix}_test_auc"], abs=1e-12)
    config = json.loads((run / TIMM_CONFIG).read_text())
    assert config["model_args"] == {"num_classes": 2, "in_chans": 1, "zero_init_last": False}
    assert {k: config["pretrained_cfg"][k] for k in ("input_size", "mean", "std", "interpolation")} == {
        "input_size": [1, 28, 28], "mean": [0.5], "std": [0.5], "interpolation": "bilinear"}


def test_the_runs_hf_peft_adapter_starts_the_next_federation_where_this_one_ended(tiny_run):
    """hf_peft/ holds the last round's global adapter: a run with init-adapter pointing at it starts
    (round 0's global state, what the server broadcasts) exactly at this run's adapter.safetensors."""
    cfg, run, summary = tiny_run
    assert summary["exports"] == {"timm_config": "config.json", "hf_peft": ["hf_peft", "hf_peft_selected"]}
    assert json.loads((run / "hf_peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == "resnet10t"
    follow = dataclasses.replace(cfg, init_adapter=str(run / "hf_peft"), run_name="follow")
    start = DeltaProtocol.for_run(follow, DeltaProtocol.build_model(follow, task_info(cfg.dataset))).global_state()
    last = load_file(str(run / "adapter.safetensors"))
    assert start.keys() == last.keys() and all(torch.equal(start[k], last[k]) for k in last)


@pytest.mark.parametrize("model, overrides", [("resnet10t", {"stem": "small"}),
                                              ("vit_pico_patch4_28", {"peft": "dora+norm"})],
                         ids=["small-stem", "fedmeld-vit"])
def test_load_exported_rebuilds_what_plain_timm_cannot(model, overrides, medmnist_root, tmp_path, randomize_trainables):
    """stem=small and fedmeld's registered models: load_exported rebuilds them; with stem=small, plain
    timm refuses the config instead of building timm's stem under weights that fit it."""
    cfg = RunConfig.from_mapping({"data-root": str(medmnist_root), "model": model, "device": "cpu", **overrides})
    info = task_info(cfg.dataset)
    adapted = build_model(cfg, info).eval()
    randomize_trainables(adapted)
    save_file({k: v.contiguous() for k, v in merged_state_dict(adapted).items()}, str(tmp_path / MERGED))
    write_timm_config(tmp_path, cfg, info, merged_state_dict(adapted))
    rebuilt = load_exported(tmp_path)
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), adapted(x), rtol=1e-5, atol=1e-5)
    assert timm.data.resolve_data_config(model=rebuilt)["input_size"] == [1, 28, 28]
    config = json.loads((tmp_path / TIMM_CONFIG).read_text())
    if cfg.stem == "small":
        with pytest.raises(TypeError, match=STEM_ARG):
            timm.create_model(config["architecture"], **config["model_args"])


@pytest.mark.parametrize("overrides, reason", [({"peft": "vera+norm"}, "VeRA"),
                                               ({"peft": "lora+norm", "aggregation": "exact"}, "backbone")])
def test_hf_export_is_skipped_with_the_reason(overrides, reason, tmp_path):
    cfg = RunConfig.from_mapping({"model": "vit_pico_patch4_28", "device": "cpu", **overrides})
    assert reason in write_hf_peft(build_model(cfg, task_info(cfg.dataset)), cfg, tmp_path / "hf_peft", 1)
    assert not (tmp_path / "hf_peft").exists()


@pytest.mark.parametrize("overrides, match", [
    ({"peft": "norm"}, "needs peft with lora or dora"),
    ({"aggregation": "exact"}, "not exact"),
    ({"aggregation": "fedavg", "client-ranks": "2,4"}, "no client-ranks"),
])
def test_init_adapter_refuses_runs_it_cannot_start(overrides, match, tmp_path):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({"init-adapter": str(tmp_path), **overrides})


def test_init_adapter_that_does_not_fit_is_one_config_error(tmp_path):
    cfg = RunConfig.from_mapping({"model": "vit_pico_patch4_28", "lora-rank": 4, "device": "cpu"})
    info = task_info(cfg.dataset)
    with pytest.raises(ConfigError, match="init-adapter=.*not an HF peft adapter directory"):
        build_model(dataclasses.replace(cfg, init_adapter=str(tmp_path / "missing")), info)
    assert write_hf_peft(build_model(cfg, info), cfg, tmp_path / "r4", 1) is None
    with pytest.raises(ConfigError, match="rank r=4, this run lora-rank=8; set lora-rank=4"):
        build_model(dataclasses.replace(cfg, lora_rank=8, init_adapter=str(tmp_path / "r4")), info)
