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
