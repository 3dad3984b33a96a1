"""simulations/deploy.py: the deployment recipe. A SuperLink and SuperNodes on localhost finish their
rounds, with TLS and SuperNode/SuperExec authentication (the default) or without (--insecure); the
secure SuperLink refuses nodes it should not admit; the drills: a SuperNode that dies mid-round
costs that round one client and trains in the next when restarted, a SuperLink restarted mid-round
loses nothing, a killed ServerApp resumes from its checkpoint with the uninterrupted run's numbers;
afterwards nothing is left running (the executor itself: tests/task/flower/test_executor.py; the
credentials: test_security.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from flwr.common.constant import ErrorCode
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from safetensors import safe_open

from fedmeld.server.checkpoint import Checkpoint
from fedmeld.simulations import deploy
from fedmeld.simulations.deploy import (
    JOINED,
    Deployment,
    NodeSecurity,
    _signal,
    connection_config,
    deployment_credentials,
    node_config,
    run_deployment,
    superlink_commands,
    supernode_commands,
)
from fedmeld.simulations.run import load_config, resume_config
from fedmeld.simulations.security import create_node_keys
from fedmeld.task.config import RunConfig

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
        "flower-superlink", "--insecure", "--database", str(tmp_path / "superlink.db"),
        "--disable-runtime-dependency-installation", "--port", "8000"]}  # insecure too: a restart keeps its state
    memory = superlink_commands(8000, tmp_path, credentials, secret, state="memory")
    assert "--database" not in memory["superlink"]  # Flower's default: its state in memory
    assert [a for a in link if a not in ("--database", str(tmp_path / "superlink.db"))] == memory["superlink"]
    assert tomllib.loads(connection_config(8000, credentials.ca))["superlink"] == {
        "default": "deploy", "deploy": {"address": "127.0.0.1:8000", "root-certificates": str(credentials.ca)}}
    assert tomllib.loads(connection_config(8000, None))["superlink"]["deploy"]["insecure"] is True


def test_a_deployment_home_generates_its_credentials_once(tmp_path):
    first = deployment_credentials(tmp_path, 2, None)
    assert first.node_keys == (tmp_path / "certs" / "supernode-0.key", tmp_path / "certs" / "supernode-1.key")
    assert stat.S_IMODE(first.node_keys[0].stat().st_mode) == 0o600
    key = first.node_keys[1].read_bytes()
    assert deployment_credentials(tmp_path, 2, None) == first and first.node_keys[1].read_bytes() == key


def test_deploy_resume_continues_a_run_with_its_own_config_and_one_supernode_per_client(tmp_path, monkeypatch,
                                                                                          capsys):
    """``fedmeld deploy --resume RUN_DIR`` takes the config from the run's checkpoint and starts as
    many SuperNodes as the run has clients; what would not fit is refused before anything starts."""
    run = tmp_path / "run"
    run.mkdir()
    config = RunConfig.from_mapping({"num-clients": 3, "num-server-rounds": 4, "lr": 0.05}).to_flower()
    Checkpoint(1, config, {}, {}, {"global": {"w": torch.ones(2)}, "protocol": {}, "selected": {}}).save(run)
    started = []
    monkeypatch.setattr(deploy, "run_deployment", lambda cfg, nodes, *args, **kwargs: started.append((cfg, nodes)))

    assert deploy.main(["--resume", str(run), "--insecure"]) == 0
    [(cfg, nodes)] = started
    assert (nodes, cfg.resume, cfg.lr, Path(cfg.out) / cfg.run_name) == (3, str(run), 0.05, run)
    refusals = {"--supernodes 2": "has num-clients=3, one SuperNode per client",
                "--config x.toml": "--resume takes the run's own config",
                "lr=0.1": "started with other values for lr"}
    for extra, message in refusals.items():
        with pytest.raises(SystemExit) as refused:
            deploy.main(["--resume", str(run), *extra.split()])
        assert refused.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        deploy.main(["--resume", str(tmp_path)])
    assert "is not a fedmeld run directory" in capsys.readouterr().err and len(started) == 1


def test_deploy_refuses_a_bad_poll_interval_before_anything_starts(tmp_path, monkeypatch, capsys):
    started = []
    monkeypatch.setattr(deploy, "run_deployment", lambda *args, **kwargs: started.append(args))
    monkeypatch.setenv("FEDMELD_POLL_SECONDS", "0")
    with pytest.raises(SystemExit) as refused:
        deploy.main(["--insecure", "--home", str(tmp_path / "home")])
    assert refused.value.code == 2 and "FEDMELD_POLL_SECONDS='0'" in capsys.readouterr().err
    assert not started and not (tmp_path / "home").exists()
    monkeypatch.setenv("FEDMELD_POLL_SECONDS", "0.5")
    assert deploy.main(["--insecure", "--home", str(tmp_path / "home")]) == 0 and len(started) == 1


def _overrides(medmnist_root: Path, tmp_path: Path, run_name: str, *overrides: str) -> list[str]:
    """A small job every deployment test runs: ResNet-10t, one local epoch in batches of 64, IID
    (every node has a validation split)."""
    return [f'data-root="{medmnist_root}"', f'out="{tmp_path / "runs"}"', f'run-name="{run_name}"',
            'model="resnet10t"', "num-clients=2", "min-clients=2", "num-server-rounds=2", "local-epochs=1",
            "batch-size=64", 'partition="iid"', *overrides]


def _config(medmnist_root: Path, tmp_path: Path, run_name: str, *overrides: str):
    return load_config(None, _overrides(medmnist_root, tmp_path, run_name, *overrides))


def _until_both_train(fed: Deployment, server_round: int) -> None:
    """Until both SuperNodes have received their train instruction of ``server_round``."""
    for i in range(2):
        fed.wait_for(f"supernode-{i}", rf"(?s)(Receiving: train message.*){{{server_round}}}", timeout=300)


def _checkpoint_round(run_dir: Path) -> int:
    with safe_open(str(run_dir / "checkpoint.safetensors"), "pt") as f:
        return int(f.metadata()["round"])


def _model_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl less what is measured (times, speeds, memory)."""
    measured = ("seconds", "img_per_s", "memory")
    return [{k: v for k, v in r.items() if not any(m in k for m in measured)} for r in _records(run_dir)]


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


def test_a_supernode_killed_mid_round_costs_that_round_one_client_and_takes_part_in_the_next(medmnist_root,
                                                                                               tmp_path):
    """Three SuperNodes; SuperNode 2 is killed (SIGKILL, with its executor) as round 2's training
    reaches it, and restarted at once with the same key. The SuperLink refuses it until it gives up
    the crashed session (two missed heartbeats: 16-20 s with fedmeld supernode's 10 s interval) and
    answers the ServerApp for it ("Node Unavailable"); round 2 then ends with the other two and
    records the dead node, and the restarted node trains in round 3. The other two executors are
    paused (SIGSTOP) from the kill until the node is back: they stand for hospitals whose training
    outlasts a restart, as in a federation whose rounds take minutes. Unpaused, the ServerApp
    starts round 3 as soon as the dead node expires, before the restarted node (a new process)
    is back: it would then join in round 4."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    cfg = _config(medmnist_root, tmp_path, "drill", "num-clients=3", "num-server-rounds=3", "round-timeout=120")
    with Deployment(home, 3, [], cfg.data_root, credentials=deployment_credentials(home, 3, None)) as fed:
        run_id = fed.submit(cfg)
        fed.wait_for("supernode-2", r"(?s)(Receiving: train message.*){2}", timeout=300)  # round 2's
        victim, others = fed.node_id(2), [fed.procs[f"executor-{i}"].pid for i in range(2)]
        fed.kill_supernode(2)
        _signal(others, signal.SIGSTOP)
        try:
            killed = time.monotonic()
            assert fed.restart_supernode(2, timeout=120) == victim  # the same identity: its registered key
            back_after = time.monotonic() - killed
        finally:
            _signal(others, signal.SIGCONT)
        run_dir = fed.follow(run_id, Path(cfg.out) / cfg.run_name, poll_seconds=1.0, timeout=300)
        log = (home / "supernode-2.log").read_text()
        restarted_executor = (home / "executor-2.log").read_text().split("fedmeld executor: running")[-1]

    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["partitions_ok"] for r in records] == [[0, 1, 2], [0, 1], [0, 1, 2]]  # back in round 3
    assert records[0]["failed_nodes"] == records[2]["failed_nodes"] == []
    # Flower answers for the dead node as the SuperLink (node id 1); the strategy files that answer
    # under the node its instruction went to, with Flower's reason
    assert records[1]["failed_nodes"] == [[victim, f"client error {ErrorCode.NODE_UNAVAILABLE}: "
                                                   f"{NODE_UNAVAILABLE_ERROR_REASON.strip().splitlines()[-1]}"]]
    assert records[1]["num_clients_failed"] == 1 and records[1]["applied"]  # the other two's update counts
    assert 15 < back_after < 60, back_after  # expired after two missed 10 s heartbeats, not Flower's 30 s ones
    assert "[code: 2004] Failed to activate SuperNode." in log  # refused while its old session lived
    assert "Receiving: train message" in log.split("SuperNode ID")[-1] and "train task completed" in restarted_executor
    assert _cmdlines(str(home)) == []


def test_the_superlink_restarts_under_a_running_federation_and_a_killed_serverapp_resumes(medmnist_root, tmp_path):
    """One secure deployment, two SuperNodes, four rounds, two crashes. While both nodes train in
    round 2, the SuperLink is killed (SIGKILL) and restarted on its port and database: the
    SuperNodes reconnect by themselves with their node ids and push their replies, and the same
    ServerApp (a process of the SuperExec, not of the SuperLink) usually carries the run on (if a
    call of its own fails while the SuperLink is down it ends, and the run is resumed instead). After round 2,
    as both nodes train in round 3, the ServerApp is killed; the run is stopped (``flwr stop``) and
    submitted again with resume=RUN_DIR, and continues from its round-2 checkpoint. metrics.jsonl
    ends with rounds 1-4 once each, equal to an uninterrupted run of the same seed (the in-process
    backend: a deployment computes the same numbers)."""
    home = tmp_path / "flwr-home"
    home.mkdir()
    cfg = _config(medmnist_root, tmp_path, "crashed", "num-server-rounds=4", "round-timeout=120")
    run_dir = Path(cfg.out) / cfg.run_name
    reference = _overrides(medmnist_root, tmp_path, "whole", "num-server-rounds=4", "round-timeout=120")
    with (tmp_path / "whole.log").open("w") as log:  # alongside the drill, which mostly waits
        whole = subprocess.Popen([sys.executable, "-m", "fedmeld.simulations.cli", "run", "--backend", "inprocess",
                                  *reference], stdout=log, stderr=subprocess.STDOUT)
    try:
        with Deployment(home, 2, [], cfg.data_root, credentials=deployment_credentials(home, 2, None)) as fed:
            survived = _crash_superlink_and_serverapp(fed, cfg, run_dir)
            print(f"the ServerApp {'lived through' if survived else 'ended with'} the SuperLink's restart")
            superlink_log = (home / "superlink.log").read_text()
        assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()
    finally:
        whole.kill()
    assert superlink_log.count("Starting Flower SuperLink") == 2
    records = _records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert all(r["partitions_ok"] == [0, 1] and r["applied"] for r in records)
    assert json.dumps(_model_rows(run_dir)) == json.dumps(_model_rows(tmp_path / "runs" / "whole"))  # NaN too
    assert _cmdlines(str(home)) == []


def _crash_superlink_and_serverapp(fed: Deployment, cfg: RunConfig, run_dir: Path) -> bool:
    """The two crashes of the drill above, each checked as it happens; True if the ServerApp lived
    through the SuperLink's restart (it usually does; a Runtime API call that fails while the
    SuperLink is down ends it, and the run is then resumed from its checkpoint like a killed one)."""
    first = fed.submit(cfg)
    _until_both_train(fed, 2)  # round 2's instructions are stored and delivered
    [serverapp], nodes = fed.serverapps(), [fed.node_id(i) for i in range(2)]
    logs = {name: (fed.home / f"{name}.log").stat().st_size for name in ("superlink", "supernode-0", "supernode-1")}
    fed.kill_superlink()
    fed.restart_superlink()
    survived = _both_train_or_serverapp_ends(fed, 3)
    since = {name: (fed.home / f"{name}.log").read_bytes()[size:].decode() for name, size in logs.items()}
    assert not any(JOINED.search(since[f"supernode-{i}"]) for i in range(2))  # no new activation: same sessions
    if survived:  # round 2 ended through the new SuperLink; round 3 is under way
        assert all(f"Push replies from node_id={node}" in since["superlink"] for node in nodes)  # to the new one
        assert fed.kill_serverapp() == [serverapp]  # the one that started the run, alive until now
        fed.stop_run(first)
        assert _checkpoint_round(run_dir) == 2
    else:
        assert _checkpoint_round(run_dir) >= 1
    fed.follow(fed.submit(resume_config(run_dir, [])), run_dir, poll_seconds=1.0, timeout=600)
    return survived


def _both_train_or_serverapp_ends(fed: Deployment, server_round: int, timeout: float = 300) -> bool:
    """True once both SuperNodes have received their train instruction of ``server_round``; False
    if the run's ServerApp is gone first."""
    deadline, pattern = time.monotonic() + timeout, re.compile(rf"(?s)(Receiving: train message.*){{{server_round}}}")
    while time.monotonic() < deadline:
        if all(pattern.search((fed.home / f"supernode-{i}.log").read_text(errors="replace")) for i in range(2)):
            return True
        if not fed.serverapps():
            return False
        time.sleep(0.2)
    raise TimeoutError(f"neither round {server_round}'s instructions nor the ServerApp's end within {timeout:.0f} s")


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
