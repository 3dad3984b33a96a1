"""CPU smoke test of simulations.bench: JSON structure and recomputable ratios, never timings."""

from __future__ import annotations

import json
from pathlib import Path

from fedmeld.simulations import bench


def test_bench_smoke(tmp_path: Path, medmnist_root: Path, capsys):
    out = tmp_path / "bench.json"
    result = bench.main(["--device", "cpu", "--models", "resnet10t", "--batch", "4", "--img", "32",
                         "--warmup", "1", "--steps", "1", "--repeats", "1", "--modes", "full", "lora-frozen-a",
                         "norm", "norm-floor", "head", "--data-root", str(medmnist_root), "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"hardware", "versions", "date", "rows", "data_path", "federation"} <= result.keys()
    rows = {r["mode"]: r for r in result["rows"]}
    assert list(rows) == ["full", "lora-frozen-a", "norm", "norm-floor", "head"]
    for r in rows.values():
        assert r.keys() >= {"model", "mode", "compile", "img_per_s", "peak_gib", "trainable"} and r["img_per_s"] > 0
    assert rows["norm"]["trainable"] == rows["norm-floor"]["trainable"] < rows["full"]["trainable"]
    assert rows["head"]["trainable"] < rows["lora-frozen-a"]["trainable"]
    assert rows["norm"]["img_per_s"] / rows["full"]["img_per_s"] > 0  # ratios computable from the rows
    data = result["data_path"]
    assert data["ratio"] > 0 and data["medmnist_img_per_s"] > 0 and data["synthetic_img_per_s"] > 0
    assert "x full" in capsys.readouterr().out


def test_hf_peft_row_never_sees_our_package():
    """Without HF peft (or with our package installed editable) the row is a note, never ours measured."""
    args = bench.parse_args(["--device", "cpu", "--models", "resnet10t", "--batch", "2", "--img", "32",
                             "--warmup", "0", "--steps", "1", "--repeats", "1"])
    row = bench.hf_peft_row("resnet10t", args)
    assert "img_per_s" in row or "not importable" in row["error"] or "not Hugging Face peft" in row["error"]
