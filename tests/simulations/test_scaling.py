"""fedmeld scaling: the deployment recipe per GPU count, measured from the rounds' own records,
for every protocol (here: exact aggregation, which merges into the backbone, on the CPU)."""

from __future__ import annotations

import json

from fedmeld.simulations import scaling


def test_scaling_without_gpus_runs_exact_aggregation(medmnist_root, tmp_path):
    output = tmp_path / "scaling.json"
    code = scaling.main(["--gpu-counts", "0", "--supernodes", "2", "--output", str(output), "--home",
                         str(tmp_path / "homes"), "dataset=breastmnist", "input-size=0", 'model="resnet10t"',
                         'peft="lora+norm"', 'aggregation="exact"', "num-server-rounds=2", "batch-size=32",
                         'partition="iid"', f'data-root="{medmnist_root}"', f'out="{tmp_path / "runs"}"'])
    assert code == 0
    report = json.loads(output.read_text())
    [result] = report["results"]
    assert result["gpus"] == 0 and report["config"]["aggregation"] == "exact"
    assert 0 < result["slowest_client_train_seconds"] < result["round_seconds"]
    assert result["client_img_per_s"] > 0 and result["client_peak_memory_mb"] > 0
    assert report["hardware"] and report["date"]


def test_compute_bound_preset_in_process_on_two_cpu_workers(medmnist_root, tmp_path):
    """The compute-bound preset (ViT-B/16, 224 px, LoRA, 3 local epochs, CUDA graphs) is a valid job; here
    with a CPU-sized model and no graphs, on the in-process backend's two workers on the CPU."""
    from fedmeld.simulations.run import load_config

    preset = load_config(None, [*scaling.DEFAULTS, *scaling.PRESETS["compute-bound"]])
    assert (preset.model, preset.local_epochs, preset.compile) == ("vit_base_patch16_224", 3, "cudagraphs")
    output = tmp_path / "scaling.json"
    code = scaling.main(["--backend", "inprocess", "--gpu-counts", "0", "--cpu-workers", "2", "--supernodes", "2",
                         "--preset", "compute-bound", "--output", str(output), "dataset=breastmnist", "input-size=0",
                         'model="vit_pico_patch4_28"', 'compile="off"', "num-server-rounds=2",
                         f'data-root="{medmnist_root}"', f'out="{tmp_path / "runs"}"'])
    assert code == 0
    report = json.loads(output.read_text())
    [result] = report["results"]
    assert report["backend"] == "inprocess" and report["preset"] == "compute-bound"
    assert report["config"]["local-epochs"] == 3 and result["gpus"] == 0
    assert 0 < result["slowest_client_train_seconds"] < result["round_seconds"]
