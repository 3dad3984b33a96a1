"""task/flower/executor.py: the executor that runs a node's ClientApp answers a failing task with an
error reply and lives on, and runs the submitted FAB's own ClientApp."""

from __future__ import annotations

import hashlib
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

from fedmeld.simulations.deploy import free_port
from fedmeld.task.flower import executor


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
