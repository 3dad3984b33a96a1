"""The ServerApp's side of the hop trace (``fedmeld.task.trace``) in deployment: when each phase's
messages leave (for the SuperLink, Ray's nodes or the in-process Grid) and when each reply arrives,
for every runtime (``server.app.federate`` wraps its Grid); the executor and the in-process Grid
record the clients' side."""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedmeld.task import trace


def trace_grid(grid: Grid) -> None:
    """With ``FEDMELD_TRACE`` set, record ``push`` and ``reply`` events around ``grid``'s own
    push and pull (``send_and_receive`` calls both); otherwise leave it alone."""
    if not trace.enabled() or getattr(grid, "traced", False):
        return
    push, pull = grid.push_messages, grid.pull_messages

    def push_messages(messages: Iterable[Message]) -> Iterable[str]:
        messages, began = list(messages), time.time()
        ids = push(messages)
        for kind in {m.metadata.message_type for m in messages}:
            trace.record("push", type=kind, t0=began, messages=len(messages))
        return ids

    def pull_messages(message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(pull(message_ids))
        for reply in replies:
            trace.record("reply", type=reply.metadata.message_type, node=reply.metadata.src_node_id,
                         created=reply.metadata.created_at)
        return replies

    grid.push_messages, grid.pull_messages, grid.traced = push_messages, pull_messages, True
