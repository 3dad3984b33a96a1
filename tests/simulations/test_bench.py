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
    for r in result["rows"]:
        assert r.keys() >= {"model", "mode", "loop", "compile", "img_per_s", "peak_gib", "trainable"}, r
        assert r["img_per_s"] > 0 and r["compile"] == "off"  # the CPU measures no cudagraphs rows
    assert [(r["loop"], r["mode"]) for r in result["rows"]] == [
        (loop, mode) for loop in ("harness", "product") for mode in ("full", "lora-frozen-a", "norm", "norm-floor", "head")]
    harness = {r["mode"]: r for r in result["rows"] if r["loop"] == "harness"}
    product = {r["mode"]: r for r in result["rows"] if r["loop"] == "product"}
    assert harness["norm"]["trainable"] == harness["norm-floor"]["trainable"] < harness["full"]["trainable"]
    assert harness["head"]["trainable"] < harness["lora-frozen-a"]["trainable"]
    # the product loop trains task/engine.py's models on BreastMNIST's one channel and two classes
    assert product["lora-frozen-a"]["trainable"] == harness["lora-frozen-a"]["trainable"]
    assert product["full"]["trainable"] < harness["full"]["trainable"]  # the stem sees 1 channel, not 3
    assert all(r["compile_s"] == 0.0 for r in product.values())
    data = result["data_path"]
    assert data["ratio"] > 0 and data["medmnist_img_per_s"] > 0 and data["synthetic_img_per_s"] > 0
    assert "x full" in capsys.readouterr().out


def test_hf_peft_row_is_hugging_face_peft_on_our_lora_layers():
    """HF peft (a test dependency) is imported in-process beside fedmeld.peft and measured on the
    layers our LoRA adapts, at the same rank: the same number of trainable parameters."""
    from fedmeld.peft.lora import LoRALayer

    args = bench.parse_args(["--device", "cpu", "--models", "resnet10t", "--batch", "2", "--img", "32",
                             "--warmup", "0", "--steps", "1", "--repeats", "1"])
    row = bench.hf_peft_row("resnet10t", args)
    assert row.get("img_per_s", 0) > 0 and row["hf_peft_version"], row
    ours = bench.prepare(bench.build_model("resnet10t", args.num_classes, args.img), "lora", args.rank)
    assert any(isinstance(m, LoRALayer) for m in ours.modules())
    assert row["trainable"] == sum(p.numel() for p in ours.parameters() if p.requires_grad)


def test_federation_measures_the_runtimes_asked_for_into_the_runs_folder_asked_for(tmp_path: Path,
                                                                                    medmnist_root: Path):
    """--federation on the CPU, one runtime: the bare clients' times, the traced in-process run with its
    round ÷ slowest client, the JSON written, and the runs where the job's out= says (not next to --out)."""
    out, runs = tmp_path / "json" / "bench.json", tmp_path / "elsewhere"
    job = ['dataset="breastmnist"', f'data-root="{medmnist_root}"', 'model="resnet10t"', "input-size=28",
           "device=cpu", "num-clients=2", "min-clients=2", "num-server-rounds=2", "batch-size=32", f'out="{runs}"']
    result = bench.main(["--device", "cpu", "--models", "--federation", *job, "--federation-runtimes", "simulation",
                         "--out", str(out)])
    fed = json.loads(out.read_text())["federation"]
    assert fed == result["federation"] and set(fed) == {"job", "poll_seconds", "bare_clients", "simulation"}
    assert len(fed["bare_clients"]["train_s"]) == 2 and fed["bare_clients"]["slowest_s"] > 0
    sim = fed["simulation"]
    assert len(sim["round_seconds"]) == 2, sim
    assert sim["round_over_slowest"] == round(sim["steady_round_s"] / fed["bare_clients"]["slowest_s"], 2)
    assert sim["round_over_sum"] == round(sim["steady_round_s"] / fed["bare_clients"]["sum_s"], 2)
    assert sim["hops"]["train"]["phase_s"] > 0
    assert [p.name for p in runs.glob("simulation-*.trace.jsonl")] and not (out.parent / "fed-runs").exists()
