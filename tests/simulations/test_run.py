"""simulations/run.py: the command line, and simulate() end to end on real MedMNIST: the default
federation under Flower's simulation runtime, LTE, and aggregation=exact with mixed ranks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fedmeld.peft import load_adapter_state
from fedmeld.server.report import ROUND_KEYS
from fedmeld.simulations.run import load_config, simulate
from fedmeld.task.config import parse_pairs
from fedmeld.task.backbone_merge import base_state, build_merge_model, dense_state
from fedmeld.task.data import load_split, task_info
from fedmeld.task.engine import Inputs
from fedmeld.task.model import build_model
from fedmeld.task.wire import nbytes


def test_cli_overrides_parse_as_toml(tmp_path):
    assert parse_pairs(["lr=0.01", "pretrained=true", "dataset=retinamnist", 'model="vit_tiny_patch16_224"']) == {
        "lr": 0.01, "pretrained": True, "dataset": "retinamnist", "model": "vit_tiny_patch16_224"}
    (tmp_path / "c.toml").write_text('num-clients = 3\npeft = "norm"\n')
    cfg = load_config(str(tmp_path / "c.toml"), ["peft=head"])
    assert (cfg.num_clients, cfg.peft) == (3, "head")  # command line beats file
    assert cfg.run_name and cfg.out.startswith("/")


def test_cli_refuses_bad_key_before_running(capsys):
    from fedmeld.simulations.run import main

    assert main(["lora-rnak=4"]) == 2
    assert "unknown run-config key 'lora-rnak'" in capsys.readouterr().err


def _corrupt_root(tmp_path, medmnist_root):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "breastmnist.npz").write_bytes((medmnist_root / "breastmnist.npz").read_bytes()[:5000])
    return tmp_path / "corrupt"


@pytest.mark.parametrize("bad, named", [
    ("data-root", "not found and could not be downloaded"),
    ("corrupt", "is unreadable"),
    ("model", "is not a timm model"),
    ("used", "already holds files"),
    ("weights", "does not exist"),
])
def test_bad_inputs_fail_before_anything_starts(bad, named, medmnist_root, tmp_path, capsys, monkeypatch):
    """Each is one line on stderr naming the input and the fix, exit 2, and no run directory."""
    from fedmeld.simulations.run import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    used = out / "taken"
    used.mkdir(parents=True)
    (used / "summary.json").write_text("{}")
    override = {"data-root": f'data-root="{tmp_path / "nowhere"}"',
                "corrupt": f'data-root="{_corrupt_root(tmp_path, medmnist_root)}"',
                "model": 'model="resnet_typo"', "used": 'run-name="taken"',
                "weights": f'weights="{tmp_path / "missing.safetensors"}"'}[bad]
    args = [f'data-root="{medmnist_root}"', f'out="{out}"', 'run-name="fresh"', override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and err[0].startswith("fedmeld run: error:")
    assert sorted(p.name for p in out.iterdir()) == ["taken"] and (used / "summary.json").read_text() == "{}"


SUMMARY_KEYS = ("final_test_accuracy", "final_test_auc", "majority_class_accuracy", "num_rounds", "trainable_params",
                "total_params", "bytes_up_total", "bytes_down_total", "wall_seconds", "versions", "config")


@pytest.fixture(scope="module")
def default_run(medmnist_root, tmp_path_factory):
    """What `make run` runs (the pyproject defaults, through the fedmeld command), with the data root
    and output made explicit; returns its config, run directory and console output."""
    out = tmp_path_factory.mktemp("runs")
    args = [f'data-root="{medmnist_root}"', f'out="{out}"', 'run-name="default"']
    done = subprocess.run([str(Path(sys.executable).with_name("fedmeld")), "run", *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return load_config(None, args), out / "default", (done.stdout + done.stderr).splitlines()


def test_console_fits_one_screen(default_run):
    """One line per round and a short summary; Flower's and Ray's lines in flower.log; the last
    line is the run directory."""
    cfg, run_dir, console = default_run
    assert len(console) <= 40 and console[-1] == str(run_dir)
    assert sum(line.startswith("[fedmeld] round ") for line in console) == cfg.num_server_rounds
    assert not [line for line in console if not line.startswith("[fedmeld]") and line != str(run_dir)]
    log = (run_dir / "flower.log").read_text()
    assert "[ROUND 1/" in log and "Aggregated MetricRecord" in log  # what used to flood the console


def test_default_federation_learns(default_run):
    cfg, run_dir, _ = default_run
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [r["round"] for r in rounds] == list(range(1, cfg.num_server_rounds + 1)) and cfg.num_server_rounds >= 3
    for record in rounds:
        assert set(ROUND_KEYS) <= record.keys()
        assert record["num_clients_ok"] == cfg.num_clients and record["num_clients_failed"] == 0
        assert record["bytes_up"] > 0 and record["bytes_down"] > record["bytes_up"]
        assert 0 < record["slowest_client_train_seconds"] < record["round_seconds"] and record["client_img_per_s"] > 0
    assert set(SUMMARY_KEYS) <= summary.keys()
    assert summary["majority_class_accuracy"] == pytest.approx(114 / 156)
    assert summary["final_test_accuracy"] > rounds[0]["test_accuracy"]
    assert summary["final_test_accuracy"] > summary["majority_class_accuracy"] + 0.02
    assert summary["final_test_auc"] > 0.7
    assert 0 < summary["trainable_params"] < summary["total_params"] / 5  # adapters, not the backbone
    assert {"torch", "timm", "flwr"} <= summary["versions"].keys() and summary["config"]["peft"] == "lora+norm"
    # each client uploads exactly its adapter delta: no backbone on the wire
    assert rounds[-1]["bytes_up"] / cfg.num_clients == pytest.approx(summary["global_state_bytes"], rel=0.05)
    assert (run_dir / "curves.png").stat().st_size > 10_000


def test_exported_model_loads_into_plain_timm(default_run, medmnist_root):
    cfg, run_dir, _ = default_run
    info = task_info(cfg.dataset)
    path = run_dir / "model_merged.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    plain = timm.create_model(meta["timm_model"], pretrained=False, num_classes=int(meta["num_classes"]),
                              in_chans=int(meta["in_chans"]))
    plain.load_state_dict(load_file(str(path)), strict=True)

    federated = build_model(cfg, info)
    load_adapter_state(federated, load_file(str(run_dir / "adapter.safetensors")))
    x = Inputs()(load_split(cfg.dataset, "test", data_root=str(medmnist_root)).images[:64], torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), federated.eval()(x), rtol=1e-4, atol=1e-5)


def test_existing_run_directory_is_never_overwritten(default_run):
    cfg, run_dir, _ = default_run
    before = (run_dir / "summary.json").read_bytes()
    with pytest.raises(FileExistsError, match="already holds files"):
        simulate(cfg)
    assert (run_dir / "summary.json").read_bytes() == before


def test_federated_lte_under_flower(medmnist_root, tmp_path):
    """peft=lte through the simulation runtime: replicas match the server's at every evaluation,
    uploads are exactly the factors plus replicas, nobody needed a full backbone."""
    import json

    from fedmeld.simulations.run import load_config, simulate

    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', 'run-name="lte"', 'peft="lte"',
                             'model="vit_pico_patch4_28"', "num-clients=2", "num-server-rounds=2", "local-epochs=1",
                             "batch-size=32", "lte-heads=2", "lora-rank=2", "lr=0.003", 'device="cpu"'])
    run = simulate(cfg)
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    model = build_merge_model(cfg, task_info(cfg.dataset))
    base, replicas = base_state(model), dense_state(model)
    upload = 4 * 2 * 2 * sum(w.shape[0] + w[0].numel() for w in base.values()) + nbytes(replicas)
    headers = 200 * (2 * len(base) + len(replicas))  # an .npy header per array
    for record in rounds:
        assert record["num_clients_ok"] == 2 and record["backbone_checksum_rel_diff"] < 1e-9
        assert record["catchup_bytes"] == 0
        assert 2 * upload < record["bytes_up"] < 2 * (upload + headers)
    assert summary["bytes_per_client_round"] < summary["full_model_bytes"]  # full FedAvg: 2x this
    assert summary["final_test_accuracy"] != summary["initial_test_accuracy"]  # the global model moved


@pytest.mark.usefixtures("task_identity")  # conftest.py: messages need a task identity
def test_exact_federation_with_mixed_ranks(medmnist_root, tmp_path):
    """aggregation=exact with client-ranks through Flower (in-process Grid): every client's replica
    equals the server's backbone after every round, uploads are each client's own factors plus its
    norm and head deltas, and the backbone moves."""
    import json

    from fedmeld.simulations.run import load_config, simulate

    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', 'run-name="exact"',
                             'model="resnet10t"', 'peft="lora+norm"', 'aggregation="exact"', 'client-ranks="2,4"',
                             "num-clients=2", "num-server-rounds=2", "local-epochs=1", 'device="cpu"'])
    run = simulate(cfg, backend="inprocess")
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    from fedmeld.task.backbone_merge import base_state, build_merge_model, dense_state
    from fedmeld.task.wire import nbytes

    info = task_info(cfg.dataset)
    shapes = {k: (v.shape[0], v[0].numel()) for k, v in base_state(build_merge_model(cfg, info)).items()}
    dense = nbytes(dense_state(build_merge_model(cfg, info)))
    upload = sum(4 * r * (o + i) for r in (2, 4) for o, i in shapes.values()) + 2 * dense
    for record in rounds:
        assert record["num_clients_ok"] == 2 and record["backbone_checksum_rel_diff"] < 1e-9
        assert upload < record["bytes_up"] < upload * 1.05
    assert summary["final_test_auc"] != summary["initial_test_auc"]


MEASURED = ("seconds", "img_per_s", "memory")  # wall time and memory: the only keys two identical runs may differ in


@pytest.mark.parametrize("backend", ["inprocess", "ray"])
def test_the_same_seed_gives_the_same_run(backend, medmnist_root, tmp_path):
    """Two runs of one config: identical metrics.jsonl (bar timings) and bit-identical adapters, with
    client sampling seeded and replies aggregated in partition order (CPU; dropout on, so the
    clients' RNG streams are exercised)."""
    runs = []
    for name in ("a", "b"):
        cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path}"', f'run-name="{name}"',
                                 'model="resnet10t"', "num-clients=3", "fraction-train=0.67", "num-server-rounds=3",
                                 "local-epochs=1", "lora-dropout=0.1", 'augment="flip"', 'device="cpu"'])
        run = simulate(cfg, backend=backend)
        runs.append(([{k: v for k, v in json.loads(line).items() if not any(m in k for m in MEASURED)}
                      for line in (run / "metrics.jsonl").read_text().splitlines()],
                     load_file(run / "adapter.safetensors")))
    (rounds_a, state_a), (rounds_b, state_b) = runs
    assert json.dumps(rounds_a) == json.dumps(rounds_b)  # NaN-safe, exact
    assert all(r["num_sampled"] == 2 for r in rounds_a)  # sampling happened, the same way twice
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
