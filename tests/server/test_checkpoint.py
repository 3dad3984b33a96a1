"""server/checkpoint.py: a run killed mid-way resumes after its last completed round and ends as
the uninterrupted run ends; a corrupt checkpoint is refused and changes nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

MEASURED = ("seconds", "img_per_s", "memory")
CASES = {  # adam: the server optimizer's moments must come back too
    "fedavg-adam": ['peft="lora+norm"', 'server-optimizer="adam"', "server-lr=0.1", "fraction-train=0.5",
                    "min-clients=1", "lora-dropout=0.1"],  # sampling: one client of two each round
    "exact": ['peft="lora+norm"', 'aggregation="exact"'],
}


def _cli(args: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedmeld.simulations.cli", "run", "--backend", "inprocess", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _rows(run: Path, model_only: bool = False) -> list[dict]:
    keep = ("round", "val_", "test_", "train_loss", "lr", "num_clients_ok", "samples_seen")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not any(m in k for m in MEASURED)
             and (not model_only or k.startswith(keep))} for r in rows]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_killed_run_resumes_and_ends_as_the_uninterrupted_run(case, medmnist_root, tmp_path):
    common = [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', 'model="resnet10t"', "num-clients=2",
              "num-server-rounds=4", "local-epochs=1", 'device="cpu"', *CASES[case]]
    whole = _cli([*common, 'run-name="whole"'])
    assert whole.wait(timeout=600) == 0, whole.stdout.read()

    killed = _cli([*common, 'run-name="killed"'], start_new_session=True)
    checkpoint, deadline = tmp_path / "killed" / "checkpoint.safetensors", time.monotonic() + 600
    while not (checkpoint.exists() and len(_rows(tmp_path / "killed")) >= 2) and time.monotonic() < deadline:
        assert killed.poll() is None, killed.stdout.read()
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # kill -9, mid-round 3 (or later)
    killed.wait()
    assert not (tmp_path / "killed" / "summary.json").exists()

    resumed = _cli(["--resume", str(tmp_path / "killed")])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    rows = _rows(tmp_path / "killed", model_only=case == "exact")
    assert [r["round"] for r in rows] == [1, 2, 3, 4]  # each round exactly once
    assert all(r["applied"] for r in _rows(tmp_path / "whole"))  # every round changed the model
    # exact: a resumed server keeps no update history, so its clients catch up with the whole backbone
    # once (more bytes down in that round); the model's numbers are the same
    assert json.dumps(rows) == json.dumps(_rows(tmp_path / "whole", model_only=case == "exact"))
    summaries = [json.loads((tmp_path / n / "summary.json").read_text()) for n in ("whole", "killed")]
    assert summaries[0]["selected_test_auc"] == summaries[1]["selected_test_auc"]


def test_a_corrupt_or_missing_checkpoint_is_refused_and_nothing_changes(medmnist_root, tmp_path):
    run = tmp_path / "r"
    done = _cli([f'data-root="{medmnist_root}"', f'out="{tmp_path}"', 'run-name="r"', 'model="resnet10t"',
                 "num-clients=2", "num-server-rounds=1", "local-epochs=1", 'device="cpu"'])
    assert done.wait(timeout=600) == 0
    refused = _cli(["--resume", str(run)])
    assert refused.wait(timeout=120) == 2 and "already completed all 1 rounds" in refused.stdout.read()
    checkpoint = run / "checkpoint.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    refused = _cli(["--resume", str(run)])
    assert refused.wait(timeout=120) == 2 and "is corrupt or partial" in refused.stdout.read()
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before
    missing = _cli(["--resume", str(tmp_path)])
    assert missing.wait(timeout=120) == 2 and "is not a fedmeld run directory" in missing.stdout.read()


def test_the_checkpoint_keeps_the_privacy_ledger(tmp_path):
    """The DP ledger travels in the checkpoint's metadata, so a resumed run keeps the epsilon it spent;
    a checkpoint written before DP existed reads back with an empty ledger."""
    import torch
    from safetensors.torch import save_file

    from fedmeld.server.checkpoint import Checkpoint
    from fedmeld.task.privacy import CLIENTS, DPPlan, Ledger

    ledger = Ledger()
    for _ in range(3):
        ledger.charge("0", DPPlan(0.25, 8, 1.1))
    ledger.charge(CLIENTS, DPPlan(1.0, 1, 2.0))
    parts = {"global": {"w": torch.ones(2)}, "protocol": {}, "selected": {}}
    Checkpoint(2, {"seed": 0}, {}, {}, parts, ledger.to_json()).save(tmp_path)
    back = Ledger(Checkpoint.load(tmp_path).privacy)
    assert back.to_json() == {"0": [[1.1, 0.25, 24]], CLIENTS: [[2.0, 1.0, 1]]}
    assert back.epsilon("0", 1e-5) == ledger.epsilon("0", 1e-5) > 0

    meta = {"round": "1", "config": "{}", "initial": "{}", "protocol": "{}"}  # no "privacy": an older checkpoint
    save_file({"global/w": torch.ones(2)}, str(tmp_path / "checkpoint.safetensors"), metadata=meta)
    assert Checkpoint.load(tmp_path).privacy == {}


def test_a_checkpoint_from_before_a_key_existed_resumes_with_its_default(tmp_path):
    """Keys added since a checkpoint was written ran as their defaults then; a changed value is still refused."""
    import torch

    from fedmeld.server.checkpoint import Checkpoint
    from fedmeld.task.config import ConfigError, RunConfig, defaults

    older = {k: v for k, v in defaults().items() if k not in ("init", "compile", "dp-clip")}
    Checkpoint(2, older, {}, {}, {"global": {"w": torch.ones(2)}, "protocol": {}, "selected": {}}).save(tmp_path)
    checkpoint = Checkpoint.load(tmp_path)
    checkpoint.check(RunConfig.from_mapping(older))
    with pytest.raises(ConfigError, match=r"other values for init \(init='timm'\)"):
        checkpoint.check(RunConfig.from_mapping({**older, "init": "torch"}))
