"""The deployment recipe: a SuperLink and SuperNodes on localhost finish a round, then nothing is left."""

from __future__ import annotations

import json
import os

from simulations.deploy import node_config, run_deployment
from simulations.run import load_config


def test_supernodes_spread_round_robin_over_gpus():
    assert node_config(0, 3, [], "") == "partition-id=0 num-partitions=3"
    placed = [node_config(i, 5, ["0", "1"], "/data") for i in range(5)]
    assert [p.split('device="')[1].split('"')[0] for p in placed] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert all('data-root="/data"' in p for p in placed)


def test_localhost_deployment_finishes_a_round(medmnist_root, tmp_path):
    """Three SuperNodes share this machine's one device (the CPU here)."""
    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path / "runs"}"', 'run-name="deploy"',
                             'model="resnet10t"', "num-clients=3", "min-clients=3", "num-server-rounds=1",
                             "local-epochs=1"])
    home = tmp_path / "flwr-home"
    home.mkdir()
    run_dir = run_deployment(cfg, num_supernodes=3, gpus=[], home=home, poll_seconds=1.0)

    [record] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert record["round"] == 1 and record["num_clients_ok"] == 3 and record["num_clients_failed"] == 0
    assert json.loads((run_dir / "summary.json").read_text())["num_rounds"] == 1
    # every process the recipe started is gone: none of them runs with our FLWR_HOME any more
    assert _cmdlines(str(home)) == []


def _cmdlines(env_marker: str) -> list[str]:
    """Command lines of live processes whose environment mentions env_marker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as f:
                if env_marker.encode() not in f.read():
                    continue
            if cmd:
                found.append(cmd)
        except OSError:
            continue
    return found
