"""simulations/deploy.py: the deployment recipe. A SuperLink and SuperNodes on localhost finish their
rounds, with TLS and SuperNode/SuperExec authentication (the default) or without (--insecure); the
secure SuperLink refuses nodes it should not admit; a SuperNode that dies mid-round costs that round
one client and rejoins when restarted; afterwards nothing is left running (the executor itself:
tests/task/flower/test_executor.py; the credentials: test_security.py)."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path

import pytest

from fedmeld.simulations.deploy import (
    JOINED,
    Deployment,
    NodeSecurity,
    connection_config,
    deployment_credentials,
    node_config,
    run_deployment,
    superlink_commands,
    supernode_commands,
)
from fedmeld.simulations.run import load_config
from fedmeld.simulations.security import create_node_keys

SECURE = NodeSecurity(Path("/c/ca.pem"), Path("/c/supernode-1.key"), Path("/h/superexec.secret"))


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


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
    assert node[1:3] == ["-m", "fedmeld.task.flower.supernode"] and _flag(node, "--isolation") == "process"
    assert runner[1:3] == ["-m", "fedmeld.task.flower.executor"]
    assert _flag(runner, "--runtime-api-address") == f"127.0.0.1:{_flag(node, '--port')}"
    [(name, stock)] = supernode_commands(8000, 1, "partition-id=1 num-partitions=2", "subprocess").items()
    assert name == "supernode-1" and stock[0] == "flower-supernode"
    assert _flag(stock, "--isolation") == "subprocess"


def test_secure_supernode_verifies_the_superlink_signs_with_its_key_and_shares_the_secret_with_its_executor():
    ours = supernode_commands(8000, 1, "partition-id=1 num-partitions=2", "process", SECURE)
    node, runner = ours["supernode-1"], ours["executor-1"]
    assert "--insecure" not in node
    assert _flag(node, "--root-certificates") == "/c/ca.pem"
    assert _flag(node, "--auth-supernode-private-key") == "/c/supernode-1.key"
    assert _flag(node, "--superexec-auth-secret-file") == _flag(runner, "--superexec-auth-secret-file") == \
        "/h/superexec.secret"
    assert "--insecure" in runner and _flag(runner, "--runtime-api-address").startswith("127.0.0.1:")  # loopback HTTP
    [stock] = supernode_commands(8000, 1, "", "subprocess", SECURE).values()
    assert "--superexec-auth-secret-file" not in stock  # Flower ignores it there: its own SuperExec signs nothing
    insecure = supernode_commands(8000, 1, "", "process")
    assert "--insecure" in insecure["supernode-1"] and "--auth-supernode-private-key" not in insecure["supernode-1"]
    assert "--superexec-auth-secret-file" not in insecure["executor-1"]


def test_secure_superlink_admits_registered_nodes_only_and_runs_its_serverapps_through_a_signed_superexec(tmp_path):
    credentials = deployment_credentials(tmp_path, 2, None)
    secret = tmp_path / "superexec.secret"
    commands = superlink_commands(8000, tmp_path, credentials, secret)
    link, superexec = commands["superlink"], commands["superexec"]
    assert (_flag(link, "--ssl-ca-certfile"), _flag(link, "--ssl-certfile"), _flag(link, "--ssl-keyfile")) == (
        str(credentials.ca), str(credentials.server_cert), str(credentials.server_key))
    assert "--enable-supernode-auth" in link and _flag(link, "--database") == str(tmp_path / "superlink.db")
    assert _flag(link, "--isolation") == "process" and _flag(link, "--superexec-auth-secret-file") == str(secret)
    assert _flag(superexec, "--root-certificates") == str(credentials.ca)
    assert _flag(superexec, "--superexec-auth-secret-file") == str(secret)
    assert superlink_commands(8000, tmp_path, None, None) == {"superlink": [
        "flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--port", "8000"]}
    assert tomllib.loads(connection_config(8000, credentials.ca))["superlink"] == {
        "default": "deploy", "deploy": {"address": "127.0.0.1:8000", "root-certificates": str(credentials.ca)}}
    assert tomllib.loads(connection_config(8000, None))["superlink"]["deploy"]["insecure"] is True


def test_a_deployment_home_generates_its_credentials_once(tmp_path):
    first = deployment_credentials(tmp_path, 2, None)
    assert first.node_keys == (tmp_path / "certs" / "supernode-0.key", tmp_path / "certs" / "supernode-1.key")
    assert stat.S_IMODE(first.node_keys[0].stat().st_mode) == 0o600
    key = first.node_keys[1].read_bytes()
    assert deployment_credentials(tmp_path, 2, None) == first and first.node_keys[1].read_bytes() == key


def _config(medmnist_root: Path, tmp_path: Path, run_name: str, *overrides: str):
    """A small job every deployment test runs: ResNet-10t, one local epoch, IID (every node has a
    validation split)."""
    return load_config(None, [f'data-root="{medmnist_root}"', f'out="{tmp_path / "runs"}"', f'run-name="{run_name}"',
                              'model="resnet10t"', "num-clients=2", "min-clients=2", "num-server-rounds=2",
                              "local-epochs=1", 'partition="iid"', *overrides])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("insecure", [False, True], ids=["tls-node-auth", "insecure"])
def test_localhost_deployment_with_executors_finishes_its_rounds(medmnist_root, tmp_path, insecure):
    """Two SuperNodes share this machine's one device (the CPU here); one long-lived executor each
    runs all of its node's messages. Secure (the default): over TLS, each node admitted by its
    registered key, every task claim signed; --insecure: none of it."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    run_dir = run_deployment(_config(medmnist_root, tmp_path, "deploy"), num_supernodes=2, gpus=[], home=home,
                             poll_seconds=1.0, isolation="process", insecure=insecure)

    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert all(r["num_clients_ok"] == 2 and r["num_clients_failed"] == 0 for r in records)
    assert all(0 < r["slowest_client_train_seconds"] < r["round_seconds"] for r in records)
    assert json.loads((run_dir / "summary.json").read_text())["num_rounds"] == 2
    for i in range(2):  # each node's train and evaluate messages, both rounds, went to its one executor
        log = (home / f"executor-{i}.log").read_text()
        assert log.count("train task completed") == 2 and log.count("evaluate task completed") == 2
    connection = tomllib.loads((home / "config.toml").read_text())["superlink"]["deploy"]
    superlink_log = (home / "superlink.log").read_text()
    if insecure:
        assert connection["insecure"] is True and "Uvicorn running on http://127.0.0.1" in superlink_log
        assert not (home / "certs").exists()
    else:
        assert connection["root-certificates"] == str(home / "certs" / "ca.pem") and "insecure" not in connection
        assert "Uvicorn running on https://127.0.0.1" in superlink_log
        for i in range(2):  # each node signed in with its own registered key
            assert JOINED.search((home / f"supernode-{i}.log").read_text())
        assert (home / "superexec.log").read_text().count("Starting Flower SuperExec") == 1  # ran the ServerApp
    # every process the recipe started is gone: none of them runs with our FLWR_HOME any more
    assert _cmdlines(str(home)) == []


def test_secure_superlink_refuses_what_it_should_not_admit(tmp_path):
    """Against a TLS SuperLink with SuperNode authentication: a SuperNode with an unregistered key is
    refused, one without the CA certificate refuses the SuperLink, one with --insecure cannot connect;
    an executor or SuperExec without the SuperExec secret cannot claim tasks. The registered SuperNode
    beside them joins, so each refusal is the security, not a broken setup."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    credentials = deployment_credentials(home, 2, None)
    intruder_key, _ = create_node_keys(home / "intruder", "intruder")
    with Deployment(home, 1, [], "", credentials=credentials) as fed:
        fed.register(credentials.node_keys[1].with_suffix(".pub"))  # registered, but started wrongly below
        attempts = {
            "unregistered": NodeSecurity(credentials.ca, intruder_key),
            "without-ca": NodeSecurity(None, credentials.node_keys[1]),  # trusts only the system's CAs
            "insecure": None,
        }
        procs = {}
        for name, security in attempts.items():  # process isolation: the SuperNode alone, no executor needed
            cmd = supernode_commands(fed.port, 1, "partition-id=1 num-partitions=2", "process", security)["supernode-1"]
            procs[name] = fed.start(name, [*cmd, "--max-retries", "2"])  # give up on a closed connection
        rogue_executor = list(fed.commands["executor-0"])  # the node's executor command, less the secret
        secret_at = rogue_executor.index("--superexec-auth-secret-file")
        del rogue_executor[secret_at:secret_at + 2]
        procs["rogue-executor"] = fed.start("rogue-executor", rogue_executor)
        procs["rogue-superexec"] = fed.start("rogue-superexec", ["flower-superexec", "--runtime-api-address",
                                                                 f"127.0.0.1:{fed.port}", "--root-certificates",
                                                                 str(credentials.ca)])
        fed.wait_for("supernode-0", JOINED, timeout=60)
        for proc in procs.values():
            proc.wait(timeout=60)  # every one of them gives up
        logs = {name: (home / f"{name}.log").read_text() for name in [*procs, "superlink", "supernode-0"]}
        assert fed.procs["executor-0"].poll() is None  # the executor with the secret still serves its node

    assert "[code: 2004] Failed to activate SuperNode." in logs["unregistered"]
    assert "No SuperNode found with the given public key" in logs["superlink"]
    assert "CERTIFICATE_VERIFY_FAILED" in logs["without-ca"]
    assert "Server disconnected without sending a response" in logs["insecure"]
    assert all(procs[name].returncode != 0 for name in attempts)
    assert not any(JOINED.search(logs[name]) for name in attempts)
    denied = "SuperExec authentication failed for /flwr.proto.Runtime/AcquireTask"
    assert denied in logs["supernode-0"] and denied in logs["superlink"]  # the rogue executor, the rogue SuperExec
    assert _cmdlines(str(home)) == []


def test_a_supernode_killed_mid_round_costs_that_round_one_client_and_rejoins_when_restarted(medmnist_root,
                                                                                              tmp_path):
    """Three SuperNodes; SuperNode 2 is killed (SIGKILL, with its executor) as round 2's training
    reaches it. Round 2 goes on with the other two after round-timeout and records the dead node.
    Restarted at once with the same key, the node is refused until the SuperLink gives up its crashed
    session (two missed heartbeats: 37-60 s after the kill), and joins the first round sampled after
    that. Which round that is, is a race: the ServerApp, waiting for the dead node's evaluation reply,
    notices the expiry within its 0.2 s poll and starts round 3 at once, while the restarted node
    retries every second or two (round 3 in some runs, round 4 or 5 in others). round-timeout 33 s:
    below the 37 s before a dead node can expire, so round 2's training ends by the timeout, and its
    evaluation (33 s more) outlasts the expiry."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    cfg = _config(medmnist_root, tmp_path, "drill", "num-clients=3", "num-server-rounds=5", "round-timeout=33")
    with Deployment(home, 3, [], cfg.data_root, credentials=deployment_credentials(home, 3, None)) as fed:
        run_id = fed.submit(cfg)
        fed.wait_for("supernode-2", r"(?s)(Receiving: train message.*){2}", timeout=300)  # round 2's
        victim = fed.node_id(2)
        fed.kill_supernode(2)
        assert fed.restart_supernode(2, timeout=180) == victim  # the same identity: its registered key
        run_dir = fed.follow(run_id, Path(cfg.out) / cfg.run_name, poll_seconds=1.0)
        log = (home / "supernode-2.log").read_text()
        restarted_executor = (home / "executor-2.log").read_text().split("fedmeld executor: running")[-1]

    records = _records(run_dir)
    clients = [r["num_clients_ok"] for r in records]
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert (clients[0], records[0]["failed_nodes"]) == (3, [])
    assert (clients[1], records[1]["num_clients_failed"]) == (2, 1)
    assert records[1]["failed_nodes"] == [[victim, "no reply within round-timeout"]]
    assert records[1]["applied"] and records[1]["round_seconds"] > 33  # the other two's update counts
    assert "[code: 2004] Failed to activate SuperNode." in log  # refused while its old session lived
    back = clients.index(3, 2)  # the first round after round 2 with all three: once back, it stays
    assert clients[2:] == [2] * (back - 2) + [3] * (5 - back) and all(r["failed_nodes"] == [] for r in records[2:])
    assert "Receiving: train message" in log.split("SuperNode ID")[-1] and "train task completed" in restarted_executor
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
