"""fedmeld.task.flower: one test per Flower internal fedmeld patches or reuses, so that a Flower
upgrade that moves or changes one fails here, by name, before any deployment test runs."""

from __future__ import annotations

import importlib
import inspect
import time
import types

import pytest

from fedmeld.task import flower
from fedmeld.task.flower import waits


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_installed_flower_is_a_supported_one():
    assert ".".join(flower.flower_version().split(".")[:2]) in flower.SUPPORTED
    flower.require_supported("this test")


def test_an_unsupported_flower_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(flower, "flower_version", lambda: "1.43.0")
    with pytest.raises(flower.UnsupportedFlower, match=r"flwr 1\.43\.0 is installed: install flwr>=1\.41,<1\.43"):
        flower.require_supported("the executor")


def test_object_pulls_take_the_backoff_keywords_we_pass():
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    assert set(waits.PULL_BACKOFF) <= set(_params(pull_objects))


@pytest.mark.parametrize("module_name", ["flwr.supernode.start_client_internal", "flwr.superlink.grid.http_grid"])
def test_the_modules_whose_waits_we_cap_sleep_through_time_and_pull_objects(module_name):
    """shorten_waits swaps these two module globals; Flower must still look them up there."""
    import importlib

    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    module = importlib.import_module(module_name)
    assert module.time is time and module.pull_objects is pull_objects
    source = inspect.getsource(module)
    assert "time.sleep(" in source and "pull_objects(" in source


def test_shorten_waits_caps_a_module_and_refuses_a_changed_one(monkeypatch):
    from flwr.supercore.inflatable.inflatable_utils import pull_objects

    module = types.ModuleType("fake_flower_module")
    module.time, module.pull_objects = time, pull_objects
    waits.shorten_waits(module, 0.01)
    started = time.monotonic()
    module.time.sleep(5)
    assert time.monotonic() - started < 1 and module.pull_objects.keywords == waits.PULL_BACKOFF
    changed = types.ModuleType("changed")
    changed.time = time  # no pull_objects: Flower's module no longer matches what we patch
    with pytest.raises(RuntimeError, match="no longer uses"):
        waits.shorten_waits(changed, 0.01)


@pytest.mark.parametrize("raw", ["abc", "0", "-1", "61", "nan"])
def test_a_bad_poll_interval_is_refused_naming_the_variable(monkeypatch, raw):
    monkeypatch.setenv(waits.POLL_ENV, raw)
    with pytest.raises(ValueError, match=f"{waits.POLL_ENV}=.*seconds between polls"):
        waits.poll_seconds()


@pytest.mark.parametrize("command", ["supernode", "executor"])
def test_fedmeld_supernode_and_executor_refuse_a_bad_poll_interval(monkeypatch, capsys, command):
    main = importlib.import_module(f"fedmeld.task.flower.{command}").main
    monkeypatch.setenv(waits.POLL_ENV, "2s")
    with pytest.raises(SystemExit) as refused:
        main(["--help"])
    assert refused.value.code == 2 and f"fedmeld {command}: error: {waits.POLL_ENV}='2s'" in capsys.readouterr().err


def test_the_poll_interval_is_read_from_the_environment(monkeypatch):
    monkeypatch.delenv(waits.POLL_ENV, raising=False)
    assert waits.poll_seconds() == 0.2
    monkeypatch.setenv(waits.POLL_ENV, "0.5")
    assert waits.poll_seconds() == 0.5


def test_the_deployment_grid_is_the_class_we_check_for():
    from flwr.superlink.grid import HttpGrid, http_grid

    assert http_grid.HttpGrid is HttpGrid
    waits.shorten_grid_waits(object())  # any other Grid: nothing to patch, no error


def test_flower_supernode_entry_point_exists():
    from flwr.supernode.cli import flower_supernode

    assert callable(flower_supernode)


def test_the_supernode_heartbeat_interval_is_read_where_fedmeld_supernode_sets_it(monkeypatch):
    """``fedmeld supernode --heartbeat-interval`` rebinds HEARTBEAT_DEFAULT_INTERVAL in the module that
    announces it to the SuperLink and in the one that paces the beats; both must read it at call time."""
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    from fedmeld.task.flower.supernode import set_heartbeat

    for module in (fleet_http_connection, heartbeat):
        monkeypatch.setattr(module, "HEARTBEAT_DEFAULT_INTERVAL", module.HEARTBEAT_DEFAULT_INTERVAL)  # undone after
    set_heartbeat(12)
    assert fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == 12
    assert inspect.getsource(fleet_http_connection).count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") == 2
    assert "HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT" in inspect.getsource(heartbeat.HeartbeatSender._run)
    with pytest.raises(ValueError, match="accepts 10 to 1800 s"):
        set_heartbeat(5)


def test_a_task_the_supernode_created_for_a_message_it_then_ignored_is_finished():
    """``finish_ignored_tasks`` wraps the loop's ``_pull_and_store_message`` (called with state=...):
    a task created in a call that returns None (the run stopped) is failed; others are left alone."""
    from flwr.supernode import start_client_internal

    from fedmeld.task.flower.supernode import finish_ignored_tasks

    assert "_pull_and_store_message(\n                state=state," in inspect.getsource(start_client_internal)
    assert "Ignoring message" in inspect.getsource(start_client_internal._pull_and_store_message)

    class State:
        def __init__(self) -> None:
            self.tasks, self.finished = 0, []

        def create_task(self, **_: object) -> int:
            self.tasks += 1
            return self.tasks

        def finish_task(self, task_id: int, sub_status: str, details: str) -> bool:
            self.finished.append((task_id, sub_status))
            return True

    outcomes = iter([None, 7, None])  # ignored (run stopped), handled, no message at all

    def pull_and_store(state: State) -> int | None:
        run_id = next(outcomes)
        if run_id is not None or state.tasks == 0:  # the third call pulls nothing and creates no task
            state.create_task(run_id=run_id)
        return run_id

    loop = types.ModuleType("loop")
    loop._pull_and_store_message = pull_and_store
    finish_ignored_tasks(loop)
    state = State()
    assert [loop._pull_and_store_message(state=state) for _ in range(3)] == [None, 7, None]
    assert state.finished == [(1, "failed")] and "create_task" not in vars(state)  # the spy is gone
    with pytest.raises(RuntimeError, match="no longer has _pull_and_store_message"):
        finish_ignored_tasks(types.ModuleType("changed"))


def test_the_clientapp_steps_the_executor_reuses():
    from flwr.supernode.runtime import run_clientapp

    assert _params(run_clientapp.pull_task_input) == ["client"]
    assert _params(run_clientapp.push_message)[:3] == ["client", "message", "context"]
    assert {"client", "context", "sub_status", "details"} <= set(_params(run_clientapp.push_task_output))


def test_the_runtime_api_client_has_the_calls_the_executor_makes():
    from flwr.supercore.runtime import RuntimeHttpClient

    for name in ("AcquireTask", "PullMessages", "PullObject", "SendTaskHeartbeat", "close"):
        assert callable(getattr(RuntimeHttpClient, name)), name
    assert {"server_address", "insecure", "root_certificates", "interceptors"} <= set(
        _params(RuntimeHttpClient.from_server_address))


def test_the_fab_install_and_app_loading_the_executor_calls():
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn

    assert {"fab_file", "skip_prompt"} <= set(_params(install_from_fab))
    assert {"default_app_ref", "app_path", "multi_app"} <= set(_params(get_load_client_app_fn))


def test_the_constants_and_helpers_the_executor_names():
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest  # noqa: F401
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor  # noqa: F401
    from flwr.supercore.retry import make_simple_http_retry_invoker  # noqa: F401
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor  # noqa: F401
    from flwr.supercore.tls import validate_and_resolve_root_certificates  # noqa: F401

    assert (ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.LOAD_CLIENT_APP_EXCEPTION) == (2, 1)
    assert SubStatus.COMPLETED and SubStatus.FAILED and TaskType.CLIENT_APP
    assert {"start", "stop", "is_running"} <= {n for n in dir(HeartbeatSender)}
    assert "supported_task_types" in AcquireTaskRequest.DESCRIPTOR.fields_by_name


def test_the_task_identity_the_inprocess_grid_sets():
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    from fedmeld.task.flower.inprocess import set_task_identity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    try:
        set_task_identity(run_id=5)
        assert (TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id) == (1, 5, SUPERLINK_NODE_ID)
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def test_the_inprocess_grid_implements_every_abstract_grid_method():
    from flwr.serverapp import Grid

    from fedmeld.task.flower.inprocess import InProcessGrid

    assert not getattr(InProcessGrid, "__abstractmethods__", set())
    assert Grid.__abstractmethods__ <= {n for n in vars(InProcessGrid)}
