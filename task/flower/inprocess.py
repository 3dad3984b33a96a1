"""A Flower Grid that hands each message straight to the ClientApp in this process.

Flower's simulation runtime needs Ray, which cannot be installed everywhere (our GPU boxes have
no network and no Ray wheel that matches), and pays seconds per run for actors and process
start-up. This Grid runs the same ServerApp code and the same ClientApp handlers, one node after
another in one process, with one persistent ``Context`` per node (so ``context.state`` behaves as
on a SuperNode). A handler that raises becomes an error reply, as Flower makes it.
"""

from __future__ import annotations

import itertools
import traceback
from collections.abc import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from . import require_supported


def set_task_identity(run_id: int = 1) -> None:
    """Messages take their run and sender from the task identity a Flower runtime sets for the
    process; outside one (this Grid, tests that build Messages), stand in for it as the SuperLink."""
    require_supported("fedmeld.task.flower.inprocess")
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID


class InProcessGrid(Grid):
    """``num_nodes`` virtual SuperNodes with node configs ``partition-id=i num-partitions=N``."""

    def __init__(self, client_app: ClientApp, num_nodes: int) -> None:
        set_task_identity()
        self.client_app = client_app
        self.contexts = {
            1000 + i: Context(run_id=1, node_id=1000 + i, state=RecordDict(), run_config={},
                              node_config={"partition-id": i, "num-partitions": num_nodes})
            for i in range(num_nodes)
        }
        self.replies: dict[str, Message] = {}
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
        ids = []
        for message in messages:
            ids.append(str(next(self._ids)))
            self.replies[ids[-1]] = self._deliver(message)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in message_ids if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message: Message) -> Message:
        try:
            return self.client_app(message, self.contexts[message.metadata.dst_node_id])
        except Exception:  # noqa: BLE001 -- a failing client is a reply, not a crash of the federation
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, traceback.format_exc()), reply_to=message)
