"""simulations.lte_compare: LTE learns from scratch on real MedMNIST; the comparison writes its files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmeld.simulations.lte_compare import JSON_KEYS, METHOD_KEYS, METHODS, compare, main



@pytest.fixture(scope="module")
def lte_run(tmp_path_factory, subsets_root) -> tuple[dict, Path]:
    """Central LTE from random init on the PneumoniaMNIST subset (3882 train images), 2 epochs."""
    out = tmp_path_factory.mktemp("lte_compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as lte_compare --small does: a shared 2-core CPU thrashes with more
    try:
        results = compare("small", out, ["lte"], {"data-root": str(subsets_root), "num-server-rounds": 2}, {})
    finally:
        torch.set_num_threads(threads)
    return results, out


def test_lte_from_scratch_beats_majority_and_its_first_eval(lte_run):
    results, _ = lte_run
    lte = results["methods"]["lte"]
    assert lte["overrides"]["pretrained"] is False and lte["overrides"]["peft"] == "lte"
    assert lte["overrides"]["lte-heads"] > 1
    majority, first, final = lte["majority_class_accuracy"], lte["initial_test_accuracy"], lte["final_test_accuracy"]
    assert majority == pytest.approx(390 / 624)
    # a margin, so a model stuck on the majority class (or at chance) fails
    assert final > majority + 0.05, lte["curve"]
    assert final > first + 0.05, lte["curve"]
    assert lte["final_test_auc"] > 0.75
    assert [c["round"] for c in lte["curve"]] == [0, 1, 2]
    seen = [c["samples_seen"] for c in lte["curve"]]
    assert seen[0] == 0 and seen[2] == 2 * seen[1] > 3000  # one pass over ~90% of 3882 per round
    assert results["lte_beats_majority_and_first_eval"] is True


def test_outputs_have_documented_keys(lte_run):
    results, out = lte_run
    assert sorted(p.name for p in out.iterdir()) == ["lte_compare.json", "lte_compare.md", "lte_compare.png"]
    data = json.loads((out / "lte_compare.json").read_text())
    assert set(JSON_KEYS) <= data.keys()
    assert set(METHOD_KEYS) <= data["methods"]["lte"].keys()
    assert data["hardware"] and data["date"]
    md = (out / "lte_compare.md").read_text()
    assert "| lte | lte | 1 |" in md and data["hardware"] in md
    assert (out / "lte_compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_all_four_methods_at_equal_samples_seen(medmnist_root, tmp_path, capsys):
    """The CLI end to end, every method, one tiny round on BreastMNIST (546 train images)."""
    assert main(["--small", "--out", str(tmp_path / "out"), "--data-root", str(medmnist_root),
                 "--set", "dataset=breastmnist", "--set", "num-server-rounds=1", "--threads", "1"]) == 0
    assert "[lte_compare] 4/4 fed-lte" in capsys.readouterr().out
    data = json.loads((tmp_path / "out" / "lte_compare.json").read_text())
    methods = data["methods"]
    assert list(methods) == list(METHODS)
    assert {m["overrides"]["num-clients"] for m in methods.values()} >= {1, 4}
    assert methods["fed-lte"]["overrides"]["partition"] == "dirichlet"
    seen = [m["samples_seen"] for m in methods.values()]
    assert max(seen) - min(seen) <= 16 and min(seen) > 400  # equal up to batches cut for the heads
    full = methods["full"]
    assert full["trainable_params"] > methods["lte"]["trainable_params"] > methods["lora"]["trainable_params"]
    assert methods["lte"]["bytes_per_client_round"] < full["bytes_per_client_round"]
    assert data["fed_lte_bytes_ratio_vs_full"] == pytest.approx(
        methods["fed-lte"]["bytes_per_client_round"] / full["bytes_per_client_round"])
    assert isinstance(data["lte_vs_full_gap_points"], float)
    md = (tmp_path / "out" / "lte_compare.md").read_text()
    assert all(f"| {m} |" in md for m in METHODS)


def test_method_defining_keys_cannot_be_overridden(tmp_path):
    from fedmeld.simulations.lte_compare import method_overrides

    o = method_overrides("small", "fed-lte", {"num-clients": 1, "peft": "full", "lr": 0.1}, {})
    assert (o["num-clients"], o["peft"], o["lr"], o["pretrained"]) == (4, "lte", 0.1, False)
    with pytest.raises(SystemExit):
        main(["--methods", "lte,bogus", "--out", str(tmp_path)])
