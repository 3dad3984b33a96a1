"""The deployment recipe: a SuperLink and SuperNodes on localhost finish their rounds, then nothing is
left; the executor that runs a node's ClientApp answers a failing task with an error reply and lives on."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.clientapp.client_app import LoadClientAppError
from flwr.common.constant import ErrorCode, SubStatus
from flwr.supercore.fab import Fab
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmeld.task.flower import executor
from fedmeld.simulations.deploy import free_port, node_config, run_deployment, supernode_commands
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


def _raises(error: Exception):
    def load(run: Run, fab: Fab):
        def app(message: Message, context: Context) -> Message:
            raise error
        return app

    def load_fails(run: Run, fab: Fab):
        raise error

    return load_fails if isinstance(error, LoadClientAppError) else load


@pytest.mark.parametrize(("app", "code", "says"), [
    (_raises(ZeroDivisionError("boom")), ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"),
    (_raises(LoadClientAppError("no app here")), ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "no app here"),
], ids=["app-raises", "app-does-not-load"])
def test_executor_answers_a_failed_task_with_an_error_reply(monkeypatch, app, code, says):
    """As Flower's flwr-clientapp does, but the executor returns to wait for the next task."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 7)  # what pull_task_input sets from the SuperNode
    monkeypatch.setattr(TaskIdentity, "_node_id", 3)
    monkeypatch.setattr(TaskIdentity, "_task_id", 5)
    instruction = Message(RecordDict(), dst_node_id=3, message_type="train")
    context = Context(run_id=7, node_id=3, node_config={}, state=RecordDict(), run_config={})
    fab = Fab(hash_str="0" * 64, content=b"", verifications={})
    pushed: dict = {}
    monkeypatch.setattr(executor, "pull_task_input", lambda client: (instruction, context, Run.create_empty(7), fab))
    monkeypatch.setattr(executor, "push_message", lambda client, reply, ctx: pushed.update(reply=reply))
    monkeypatch.setattr(executor, "push_task_output",
                        lambda client, context, sub_status, details: pushed.update(status=sub_status))

    executor.run_task(f"127.0.0.1:{free_port()}", None, True, "token", app)  # returns: no exception

    assert pushed["reply"].has_error() and pushed["reply"].error.code == code
    assert says in pushed["reply"].error.reason and pushed["status"] == SubStatus.FAILED


@pytest.fixture
def own_client_package_restored(monkeypatch, tmp_path):
    """A FLWR_HOME in tmp_path; afterwards this checkout's ``client`` package is imported again."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    ours = {name: module for name, module in sys.modules.items() if name.partition(".")[0] == "client"}
    yield
    for name in [name for name in sys.modules if name.partition(".")[0] == "client"]:
        del sys.modules[name]
    sys.modules.update(ours)


def test_executor_runs_the_submitted_fabs_clientapp_imported_once(tmp_path, own_client_package_restored):
    """The FAB's own ``client`` package, not this checkout's (which the executor runs from), imported
    once per FAB; another FAB brings its own code."""
    apps = executor.FabClientApps()
    loaded = []
    for version in ("one", "two"):
        project = tmp_path / version
        (project / "client").mkdir(parents=True)
        (project / "client" / "__init__.py").write_text("")
        (project / "client" / "app.py").write_text(f"from flwr.clientapp import ClientApp\napp = ClientApp()\n"
                                                   f"VERSION = {version!r}\n")
        (project / "pyproject.toml").write_text(
            '[project]\nname = "fedmeld"\nversion = "0.1.0"\n\n[tool.flwr.app]\npublisher = "fedmeld"\n\n'
            '[tool.flwr.app.components]\nserverapp = "client.app:app"\nclientapp = "client.app:app"\n')
        content = build_fab_from_disk(project)
        fab = Fab(hash_str=hashlib.sha256(content).hexdigest(), content=content, verifications={})
        run = Run.create_empty(7)
        run.fab_id, run.fab_version = "fedmeld/fedmeld", "0.1.0"
        app = apps(run, fab)
        assert apps(run, fab) is app  # the second message of the same run: nothing imported again
        module = sys.modules["client.app"]
        assert module.app is app and module.VERSION == version
        assert Path(module.__file__).is_relative_to(tmp_path / "flwr-home" / "apps")
        loaded.append(app)
    assert loaded[0] is not loaded[1]


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
