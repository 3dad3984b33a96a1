"""A long-lived ClientApp executor for one SuperNode started with ``--isolation process``.

Why: under Flower 1.41's default ``--isolation subprocess`` the SuperNode's SuperExec starts a fresh
``flwr-clientapp`` process for every message, and that process installs the FAB, imports
torch/timm, builds the model, loads the data shard, handles ONE message and exits: two such starts
per node and round, about 93 s per round with 8 SuperNodes (ViT-S) on a 16-core H100 host. With
``--isolation process`` the SuperNode starts nothing; it queues a task per message until an outside
executor claims it through the SuperNode's Runtime API. This module is that executor: it claims each
ClientApp task (``AcquireTask``) and runs it in its own process, doing what
``flwr.supernode.runtime.run_clientapp`` does (pull message, context, run and FAB, call the
ClientApp, push the reply and the context, report the status) minus the process start, the FAB
install and ``flwr_exit``. The ClientApp module is imported once, so the model and the data shard
that ``fedmeld.client.app`` caches per process serve every round.

Written against flwr 1.41/1.42 (``SUPPORTED`` in this package; it reuses Flower's Runtime API client and the ``pull_task_input``,
``push_message`` and ``push_task_output`` of ``run_clientapp``). Where it differs, and why:

* the FAB is installed (into ``$FLWR_HOME/apps``, as Flower does) and its ClientApp imported once
  per FAB, not per message; a run with another FAB imports that one afresh;
* it claims a task as soon as the SuperNode queues it, so it waits for the task's input in short
  steps (Flower backs off 1 s, 2 s, 4 s ...), see ``TaskClient``;
* a failing task never ends the process: an exception in the app (or in loading it) becomes an
  error reply as in Flower (code 2, or 1 for a load error), and the executor waits for the next
  task. If the executor dies, the SuperNode answers for it (code 8) once the task's heartbeat stops;
* no runtime dependency installation: the app runs in the executor's own environment.

SuperExec authentication (Flower's experimental ``--superexec-auth-secret-file``, as for
``flower-superexec``): with a secret, the SuperNode answers ``AcquireTask`` only to a caller that signs
it with an HMAC of that secret, so another process on the host cannot claim the node's tasks (and with
them the instructions and the global model). Give the SuperNode (``--isolation process``) and this
executor the same file. The task's own calls are then authorised by the token ``AcquireTask`` returned.

A hospital runs its SuperNode with ``--isolation process`` (``fedmeld supernode`` is
``flower-supernode`` with shorter waits) and this executor next to it, on the SuperNode's Runtime
API (loopback, plain HTTP, by default)::

    fedmeld supernode --superlink SUPERLINK:PORT --root-certificates ca.pem --auth-supernode-private-key node.key \\
        --isolation process --port 9094 --superexec-auth-secret-file superexec.secret \\
        --node-config 'partition-id=0 num-partitions=8 data-root="/data"'
    fedmeld executor --runtime-api-address 127.0.0.1:9094 --insecure --superexec-auth-secret-file superexec.secret

``fedmeld deploy`` does the same on localhost (``--isolation process``, its default).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import TypeVar

import httpx
from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.message_pb2 import PullObjectRequest, PullObjectResponse  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullAppMessagesResponse,
    SendTaskHeartbeatRequest,
)
from flwr.supercore import log
from flwr.supercore.auth import add_superexec_auth_secret_args, load_superexec_auth_secret
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.run import Run
from flwr.supercore.superexec.run_superexec import _SUPEREXEC_AUTH_METHODS  # what flower-superexec signs
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

from fedmeld.task import trace

from . import require_supported
from .waits import poll_seconds_or_exit

INPUT_WAIT_SECONDS = 30.0  # then Flower's own retries (or its error) take over
R, S = TypeVar("R"), TypeVar("S")


class FabClientApps:
    """The ClientApp of the submitted FAB, installed and imported once per FAB (``run_clientapp``
    does both for every message), so what the app caches per process serves every round."""

    def __init__(self) -> None:
        self._load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
        self._imported: str | None = None  # hash of the FAB whose modules are imported

    def __call__(self, run: Run, fab: Fab) -> ClientApp:
        if fab.hash_str != self._imported:
            forget_modules(install_from_fab(fab.content, skip_prompt=True))  # a no-op when installed
            self._imported = fab.hash_str
        return self._load(run.fab_id, run.fab_version, fab.hash_str)  # imports from the FAB's directory once


def forget_modules(app_dir: Path) -> None:
    """Drop the imported modules of the packages that ``app_dir`` ships, so that they import from
    there: those of a previous FAB. (fedmeld's own FAB runs the installed ``fedmeld`` package, whose
    modules stay imported.)"""
    shipped = {p.stem for p in app_dir.iterdir() if (p / "__init__.py").is_file() or p.suffix == ".py"}
    for name in [name for name in sys.modules if name.partition(".")[0] in shipped]:
        del sys.modules[name]


class TaskClient(RuntimeHttpClient):
    """The Runtime API client of one task, waiting (briefly, in short steps) for the task's input.

    The SuperNode queues the task before it has stored the message and pulled the message's
    objects from the SuperLink. A process that takes seconds to start never notices; a claim within
    a fraction of a second does: ``pull_task_input`` would find no message (and fail the task) or
    back off 1 s, 2 s, 4 s ... on each object still in transit."""

    def PullMessages(self, request: PullAppMessagesRequest) -> PullAppMessagesResponse:  # noqa: N802 (Flower's name)
        return _until(super().PullMessages, request, lambda res: bool(res.messages_list))

    def PullObject(self, request: PullObjectRequest) -> PullObjectResponse:  # noqa: N802 (Flower's name)
        return _until(super().PullObject, request, lambda res: res.object_available or not res.object_found)


def _until(call: Callable[[R], S], request: R, ready: Callable[[S], bool]) -> S:
    deadline = time.monotonic() + INPUT_WAIT_SECONDS
    while not ready(response := call(request)) and time.monotonic() < deadline:
        time.sleep(0.02)
    return response


def task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat, except that a task the SuperNode no longer knows is only logged:
    Flower's version raises SIGINT then, which would end this process, not just the task."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            if not client.SendTaskHeartbeat(request).success:
                log(WARNING, "The SuperNode dropped the current task (heartbeat refused); its reply will be lost.")
        except httpx.TransportError:
            return False  # HeartbeatSender retries with backoff
        except httpx.HTTPStatusError as err:
            if err.response.status_code not in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                raise
            return False
        return True

    return beat


def run_task(address: str, certificates: bytes | None, insecure: bool, token: str, app: FabClientApps) -> None:
    """One claimed ClientApp task, from pulling its input to reporting its status; an exception in
    the app becomes an error reply, as in Flower."""
    client = TaskClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates,
        interceptors=[RuntimeTracingInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                      RuntimeTokenHttpInterceptor(token)])  # no retry invoker: Flower's SIGINTs on a stale token
    heartbeat = HeartbeatSender(task_heartbeat(client))
    heartbeat.start()
    started = time.monotonic()
    message: Message | None = None
    context: Context | None = None
    reply: Message | None = None
    got_input = app_done = 0.0  # wall-clock, for the trace
    try:
        message, context, run, fab = pull_task_input(client)
        got_input = time.time()
        reply = app(run, fab)(message=message, context=context)
        app_done = time.time()
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # pylint: disable=broad-exception-caught
        code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
        sub_status, details = SubStatus.FAILED, f"{type(ex)}:<'{ex}'>"  # Flower's format
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        if heartbeat.is_running:  # not if its thread died of an unexpected Runtime API error
            heartbeat.stop()
    try:
        if reply is not None and context is not None:
            push_message(client, reply, context)
    except Exception as ex:  # pylint: disable=broad-exception-caught
        log(ERROR, "Failed to push the reply message", exc_info=ex)
        sub_status, details = SubStatus.FAILED, f"pushing the reply failed: {ex}"
    if message is not None and app_done:
        trace.record("client", type=message.metadata.message_type, node=message.metadata.dst_node_id,
                     created=message.metadata.created_at, input=got_input, app_done=app_done)
    push_task_output(client=client, context=context, sub_status=sub_status, details=details)  # logs its errors
    client.close()
    log(INFO, "%s task %s in %.1f s", message.metadata.message_type if message else "unknown", sub_status,
        time.monotonic() - started)


def serve(address: str, certificates: bytes | None, insecure: bool, app: FabClientApps,
          poll_interval: float, auth_secret: bytes | None = None) -> None:
    """Claim and run ClientApp tasks one at a time, forever (a SuperNode hands out one message at a time);
    with ``auth_secret``, each claim is signed as ``flower-superexec`` signs it."""
    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret,
                                                         protected_methods=_SUPEREXEC_AUTH_METHODS))
    client = RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=certificates, interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker())  # waits for a SuperNode that is not up yet
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
    log(INFO, "fedmeld executor: running ClientApp tasks of the SuperNode at %s in this process", address)
    while True:
        claimed = client.AcquireTask(request)
        if claimed.HasField("task") and claimed.token:
            try:
                run_task(address, certificates, insecure, claimed.token, app)
            except Exception as ex:  # pylint: disable=broad-exception-caught
                # outside the app (the Runtime API failed): the SuperNode answers for the lost task
                # once its heartbeat stops; this process stays for the next one
                log(ERROR, "Task failed outside the ClientApp", exc_info=ex)
        else:
            time.sleep(poll_interval)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedmeld executor", description=__doc__.split("\n\n")[0],
                                     epilog="Start the SuperNode with --isolation process and its Runtime API "
                                            "--port; see the module docstring.")
    parser.add_argument("--runtime-api-address", required=True, metavar="HOST:PORT",
                        help="the SuperNode's Runtime API (its --host/--port, default 127.0.0.1:9094)")
    parser.add_argument("--insecure", action="store_true", help="plain HTTP to the Runtime API (a SuperNode "
                                                                "started without --ssl-certfile)")
    parser.add_argument("--root-certificates", metavar="CA.pem", help="CA that signed the Runtime API's certificate")
    poll = poll_seconds_or_exit(parser)
    parser.add_argument("--poll-interval", type=float, default=poll, metavar="SECONDS",
                        help=f"wait between asks for a pending task when there was none; default {poll} "
                             "($FEDMELD_POLL_SECONDS, else 0.2)")
    add_superexec_auth_secret_args(parser)  # the same file as the SuperNode's --superexec-auth-secret-file
    args = parser.parse_args(argv)
    require_supported("fedmeld executor")
    certificates = validate_and_resolve_root_certificates(args.root_certificates, args.insecure)
    try:
        secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
    except ValueError as err:
        parser.error(f"{err}; pass the file the SuperNode's --superexec-auth-secret-file names")
    try:
        serve(args.runtime_api_address, certificates, args.insecure, FabClientApps(), args.poll_interval, secret)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
