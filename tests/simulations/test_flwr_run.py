"""``flwr run .``, the ecosystem's own entry point: the federation it simulates is the one the run
config names, or the run is refused; the summary counts the clients that actually took part."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedmeld.client.app import app as client_app
from fedmeld.server.app import federate
from fedmeld.simulations.run import load_config
from fedmeld.task.config import ConfigError
from fedmeld.task.flower.inprocess import InProcessGrid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_federation_of_another_size_is_refused(tiny_config):
    """num-clients=3 but two SuperNodes each holding a half: refused with the fix, before round 1."""
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**tiny_config, "num-clients": 3}.items()])
    with pytest.raises(ConfigError, match=r"num-clients is 3 but SuperNode \d+ holds partition 0 of 2: .*"
                                          r"num-supernodes=3"):
        federate(InProcessGrid(client_app, 2), cfg)
    assert not (Path(cfg.out) / cfg.run_name / "metrics.jsonl").exists()


def test_flwr_run_simulates_num_clients_supernodes(repo, medmnist_root, tmp_path):
    """The README's ``flwr run . --stream`` with three SuperNodes: three distinct partitions took
    part in the round, as summary.json records. Temporary FLWR_HOME and ports; the local SuperLink
    that ``flwr run`` leaves running is stopped afterwards."""
    venv_bin = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}", "FLWR_HOME": str(tmp_path / "home"),
           "MEDMNIST_ROOT": str(medmnist_root), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port())}
    run_config = (f'num-clients=3 num-server-rounds=1 local-epochs=1 model="resnet10t" out="{tmp_path / "runs"}" '
                  f'run-name="three"')
    try:
        done = subprocess.run([str(venv_bin / "flwr"), "run", ".", "--stream", "--run-config", run_config,
                               "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    finally:  # flwr run leaves its local SuperLink (and its SuperExec) running: stop them
        superlink = subprocess.run(["pgrep", "-f", f"flower-superlink.*{env['FLWR_HOME']}"], capture_output=True,
                                   text=True).stdout.split()
        for pid in superlink:
            os.kill(int(pid), signal.SIGTERM)
    summary_file = tmp_path / "runs" / "three" / "summary.json"
    assert summary_file.is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(summary_file.read_text())
    assert summary["config"]["num-clients"] == 3
    assert summary["partitions_took_part"] == [0, 1, 2] and summary["num_clients_took_part"] == 3
    rounds = [json.loads(line) for line in (tmp_path / "runs" / "three" / "metrics.jsonl").read_text().splitlines()]
    assert rounds[0]["partitions_ok"] == [0, 1, 2]
