"""A Flower Grid that hands each message straight to the ClientApp in this process.

Flower's simulation runtime needs Ray, which cannot be installed everywhere (our GPU boxes have
no network and no Ray wheel that matches), and pays seconds per run for actors and process
start-up. This Grid runs the same ServerApp code and the same ClientApp handlers in one process,
with one persistent ``Context`` per node (so ``context.state`` behaves as on a SuperNode). A handler
that raises becomes an error reply, as Flower makes it.

Placement: without ``devices``, every node runs in the calling thread, one after another, on the
run config's device. With ``devices`` (e.g. ``cuda:0,cuda:1``), there is one worker thread per
device and node ``i`` lives on worker ``i mod len(devices)`` (its node config says ``device``, as a
SuperNode's ``--node-config`` would): the workers train their nodes concurrently, each worker's
nodes one after another. A client's results do not depend on which worker or in which order it
ran (``task/engine.py`` seeds every call; model init holds the CPU RNG), so one worker and several
give the same run. ``cpu:N`` names the CPU as worker N (tests: several workers without GPUs). A
device listed twice is refused: its workers would share the client's cached model (and, on a GPU,
its random generator), so their clients would overwrite each other's training.
"""

from __future__ import annotations

import itertools
import time
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmeld.task import trace

from . import require_supported


def set_task_identity(run_id: int = 1) -> None:
    """Messages take their run and sender from the task identity a Flower runtime sets for the
    process; outside one (this Grid, tests that build Messages), stand in for it as the SuperLink."""
    require_supported("fedmeld.task.flower.inprocess")
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID


def check_devices(devices: Sequence[str]) -> list[str]:
    """The worker devices, each at most once (``cuda`` counts as ``cuda:0``); else a ValueError
    that names the repeated one."""
    seen: dict[str, str] = {}
    for device in devices:
        key = "cuda:0" if device == "cuda" else device
        if key in seen:
            same = f" ({seen[key]!r} is the same device)" if seen[key] != device else ""
            raise ValueError(f"device {device!r} is listed twice{same}: one worker per device, since two workers "
                             "on one device would share its clients' model; list each GPU once (several workers "
                             "on the CPU: cpu:0,cpu:1)")
        seen[key] = device
    return list(devices)


class InProcessGrid(Grid):
    """``num_nodes`` virtual SuperNodes with node configs ``partition-id=i num-partitions=N`` (and
    ``device``, with ``devices``: one worker thread per device, see the module docstring)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, devices: Sequence[str] = ()) -> None:
        set_task_identity()
        self.client_app = client_app
        self.devices = check_devices(devices)
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config={},
                              node_config={"partition-id": i, "num-partitions": num_nodes,
                                           **({"device": self.devices[i % len(self.devices)]} if self.devices else {})})
            for i in range(num_nodes)
        }
        self.workers = [ThreadPoolExecutor(1, thread_name_prefix=f"fedmeld-worker-{d}") for d in self.devices]
        self.replies: dict[str, Message | Future[Message]] = {}
        self._ids = itertools.count()
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Hand every message to its node: at once in this thread, or queued on its node's worker."""
        ids = []
        for message in messages:
            ids.append(str(next(self._ids)))
            if self.workers:
                worker = self.workers[(message.metadata.dst_node_id - 1000) % len(self.workers)]
                self.replies[ids[-1]] = worker.submit(self._deliver, message)
            else:
                self.replies[ids[-1]] = self._deliver(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that are ready, each handed out once."""
        ready = [i for i in message_ids if i in self.replies and _done(self.replies[i])]
        return [_result(self.replies.pop(i)) for i in ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push, then wait up to ``timeout`` seconds for the replies; a node still working then has
        none this time (as a late SuperNode)."""
        ids = list(self.push_messages(messages))
        wait([r for i in ids if isinstance(r := self.replies.get(i), Future)], timeout=timeout)
        return self.pull_messages(ids)

    def close(self) -> None:
        """Stop the workers after the nodes they are running."""
        for worker in self.workers:
            worker.shutdown(wait=True)

    def _deliver(self, message: Message) -> Message:
        began, context = time.time(), self.contexts[message.metadata.dst_node_id]
        try:
            reply = self.client_app(message, context)
        except Exception:  # noqa: BLE001 -- a failing client is a reply, not a crash of the federation
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, traceback.format_exc()), reply_to=message)
        trace.record("client", type=message.metadata.message_type, node=message.metadata.dst_node_id,
                     device=context.node_config.get("device"), created=message.metadata.created_at, input=began,
                     app_done=time.time())
        return reply


def _done(reply: Message | Future[Message]) -> bool:
    return not isinstance(reply, Future) or reply.done()


def _result(reply: Message | Future[Message]) -> Message:
    return reply.result() if isinstance(reply, Future) else reply
