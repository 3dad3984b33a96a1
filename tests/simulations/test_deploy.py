"""simulations/deploy.py: the deployment recipe. A SuperLink and SuperNodes on localhost finish their
rounds, then nothing is left (the executor itself: tests/task/flower/test_executor.py)."""

from __future__ import annotations

import json
import os

from fedmeld.simulations.deploy import node_config, run_deployment, supernode_commands
from fedmeld.simulations.run import load_config


def test_supernodes_spread_round_robin_over_gpus():
    assert node_config(0, 3, [], "") == "partition-id=0 num-partitions=3"
    placed = [node_config(i, 5, ["0", "1"], "/data") for i in range(5)]
    assert [p.split('device="')[1].split('"')[0] for p in placed] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]
    assert all('data-root="/data"' in p for p in placed)


def test_isolation_picks_who_runs_the_clientapp():
    """Ours: our SuperNode entry point plus an executor on its Runtime API; stock: Flower's alone."""
    ours = supernode_commands(8000, 1, "partition-id=1 num-partitions=2", "process")
    assert list(ours) == ["supernode-1", "executor-1"]
    node, runner = ours["supernode-1"], ours["executor-1"]
    assert node[1:3] == ["-m", "fedmeld.task.flower.supernode"] and node[node.index("--isolation") + 1] == "process"
    assert runner[1:3] == ["-m", "fedmeld.task.flower.executor"]
    assert runner[runner.index("--runtime-api-address") + 1] == f"127.0.0.1:{node[node.index('--port') + 1]}"
    [(name, stock)] = supernode_commands(8000, 1, "partition-id=1 num-partitions=2", "subprocess").items()
    assert name == "supernode-1" and stock[0] == "flower-supernode"
    assert stock[stock.index("--isolation") + 1] == "subprocess"


def test_localhost_deployment_with_executors_finishes_its_rounds(medmnist_root, tmp_path):
    """Two SuperNodes share this machine's one device (the CPU here); one long-lived executor each
    runs all four of its node's messages."""
    cfg = load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path / "runs"}"', 'run-name="deploy"',
                             'model="resnet10t"', "num-clients=2", "min-clients=2", "num-server-rounds=2",
                             "local-epochs=1", 'partition="iid"'])  # iid: every node has a validation split
    home = tmp_path / "flwr-home"
    home.mkdir()
    run_dir = run_deployment(cfg, num_supernodes=2, gpus=[], home=home, poll_seconds=1.0, isolation="process")

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["num_clients_ok"] == 2 and r["num_clients_failed"] == 0 for r in records)
    assert all(0 < r["slowest_client_train_seconds"] < r["round_seconds"] for r in records)
    assert json.loads((run_dir / "summary.json").read_text())["num_rounds"] == 2
    for i in range(2):  # each node's train and evaluate messages, both rounds, went to its one executor
        assert (home / f"executor-{i}.log").read_text().count("task completed") == 4
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
