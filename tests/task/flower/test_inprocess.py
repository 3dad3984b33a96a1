"""task/flower/inprocess.py: the in-process backend with one worker thread per device gives the run
one thread gives, and its hop trace (fedmeld.task.trace) says where a round's time went."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedmeld.simulations.run import load_config, simulate
from fedmeld.task import trace

MEASURED = ("seconds", "img_per_s", "memory")  # wall time and memory: what two identical runs may differ in


def test_two_workers_give_the_one_worker_run_and_a_hop_trace(medmnist_root, tmp_path, monkeypatch):
    runs = {}
    for name, devices in (("one", []), ("two", ["cpu:0", "cpu:1"])):
        trace_file = tmp_path / f"{name}.jsonl"
        monkeypatch.setenv(trace.TRACE_ENV, str(trace_file))
        cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', f'run-name="{name}"',
                                 'model="vit_pico_patch4_28"', 'peft="lora"', "num-clients=4", "min-clients=4",
                                 "num-server-rounds=3", "local-epochs=1", "lora-dropout=0.1", 'device="cpu"'])
        run = simulate(cfg, "inprocess", verbose=False, devices=devices)
        rounds = [{k: v for k, v in json.loads(line).items() if not any(m in k for m in MEASURED)}
                  for line in (run / "metrics.jsonl").read_text().splitlines()]
        runs[name] = (rounds, load_file(run / "adapter.safetensors"), trace.read(trace_file))
    (rounds_1, state_1, _), (rounds_2, state_2, events) = runs["one"], runs["two"]
    assert json.dumps(rounds_1) == json.dumps(rounds_2)
    assert all(torch.equal(state_1[k], state_2[k]) for k in state_1)
    clients = [e for e in events if e["event"] == "client" and e["type"] == "train"]
    assert {e["device"] for e in clients} == {"cpu:0", "cpu:1"} and len(clients) == 4 * 3
    assert {e["node"] % 2 for e in clients if e["device"] == "cpu:1"} == {1}  # node i on worker i mod 2
    hops = trace.hops(events)
    assert hops["rounds"] == [2]  # round 1 pays start-up; the last round's evaluate phase has no gap after it
    train, evaluate = hops["train"], hops["evaluate"]
    assert 0 < train["engine_s"]["max"] <= train["client_app_s"]["max"] <= train["phase_s"]
    assert evaluate["central_evaluation_s"] > 0 and evaluate["gap_after_s"] >= evaluate["central_evaluation_s"]


def test_a_device_listed_twice_is_refused_before_anything_starts(tmp_path, capsys):
    """Two workers on one device would train on one cached model at once: refused, naming the device,
    by the CLI (exit 2, no run directory) and by the Grid itself."""
    from fedmeld.simulations.run import main
    from fedmeld.task.flower.inprocess import InProcessGrid

    with pytest.raises(SystemExit) as exited:
        main(["--backend", "inprocess", "--devices", "cuda:0,cuda", f'out="{tmp_path}"'])
    assert exited.value.code == 2
    assert "'cuda' is listed twice" in capsys.readouterr().err and not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="'cpu:1' is listed twice"):
        InProcessGrid(None, 2, ["cpu:0", "cpu:1", "cpu:1"])
