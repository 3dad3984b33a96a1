"""``flower-supernode`` with its hard-coded waits capped (``waits.py`` says which and why)::

    fedmeld supernode [--sleep-cap SECONDS] [--heartbeat-interval SECONDS] <flower-supernode arguments>

It caps the waits inside Flower's SuperNode loop, sets its heartbeat interval, and then runs
Flower's own ``flower-supernode`` unchanged, with the same arguments.

A task leak, closed: when a run stops while the SuperNode is pulling one of its messages, Flower
1.42 logs "Run ID ... is not in `RUNNING` status. Ignoring message" but leaves the ClientApp task it
had created for that message pending. An executor (``fedmeld executor``, which runs one task at a
time) then claims a task whose input never comes and waits on it for good, so the node serves no
later run: seen after ``flwr stop`` of a run whose ServerApp had died, when the resumed run was
submitted. ``finish_ignored_tasks`` marks such a task failed, which also revokes its token.

The heartbeat: Flower's SuperNode tells the SuperLink every 30 s (hard-coded) that it is alive, and
the SuperLink gives a silent node up after two intervals. Until then a crashed node's replies are
awaited and its restart is refused ("Failed to activate SuperNode"): up to 60 s. At 10 s, the least
the SuperLink accepts, that is 20 s, for one small request every 4 s. The node sends the interval
with each heartbeat, so the SuperLink needs no change.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType
from typing import Any

from flwr.common.constant import HEARTBEAT_MAX_INTERVAL, HEARTBEAT_MIN_INTERVAL, SubStatus
from flwr.supercore import heartbeat
from flwr.supernode import fleet_http_connection
from flwr.supernode import start_client_internal as supernode_loop
from flwr.supernode.cli import flower_supernode

from . import require_supported
from .waits import poll_seconds_or_exit, shorten_waits

HEARTBEAT_SECONDS = float(HEARTBEAT_MIN_INTERVAL)  # Flower's: 30 s


def set_heartbeat(seconds: float) -> None:
    """The SuperNode's heartbeat interval, in the two Flower modules that read it: the one that
    announces it to the SuperLink and the sender thread that paces the beats."""
    require_supported("fedmeld supernode --heartbeat-interval")
    if not HEARTBEAT_MIN_INTERVAL <= seconds <= HEARTBEAT_MAX_INTERVAL:
        raise ValueError(f"heartbeat interval {seconds} s: the SuperLink accepts {HEARTBEAT_MIN_INTERVAL} to "
                         f"{HEARTBEAT_MAX_INTERVAL} s")
    for module in (fleet_http_connection, heartbeat):
        if not hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"):
            raise RuntimeError(f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL as fedmeld supernode "
                               f"expects; see tests/task/test_flower.py")
        module.HEARTBEAT_DEFAULT_INTERVAL = seconds


def finish_ignored_tasks(loop: ModuleType) -> None:
    """Wrap the SuperNode loop's ``_pull_and_store_message`` so that a task it created for a message
    it then ignored (its run stopped meanwhile: it returns None) is finished as failed, not left
    pending for an executor to claim."""
    require_supported("fedmeld supernode")
    pull_and_store = getattr(loop, "_pull_and_store_message", None)
    if pull_and_store is None:
        raise RuntimeError(f"{loop.__name__} no longer has _pull_and_store_message as fedmeld supernode expects; "
                           f"see tests/task/test_flower.py")

    def pull_and_store_finishing_ignored(*args: Any, state: Any, **kwargs: Any) -> int | None:
        created: list[int | None] = []
        create_task = state.create_task

        def remember(*a: Any, **k: Any) -> int | None:
            created.append(create_task(*a, **k))
            return created[-1]

        state.create_task = remember  # this call's tasks, seen through an instance attribute
        try:
            run_id = pull_and_store(*args, state=state, **kwargs)
        finally:
            del state.create_task
        if run_id is None and created and created[-1] is not None:  # already finished if its pull failed
            state.finish_task(created[-1], SubStatus.FAILED, "the run stopped before its message arrived")
        return run_id

    loop._pull_and_store_message = pull_and_store_finishing_ignored


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedmeld supernode", add_help=False, allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    poll = poll_seconds_or_exit(parser)
    parser.add_argument("--sleep-cap", type=float, default=poll, metavar="SECONDS",
                        help="longest sleep of the SuperNode loop (Flower: 3 s idle, 0.5 s reply polls); "
                             f"default {poll} ($FEDMELD_POLL_SECONDS, else 0.2)")
    parser.add_argument("--heartbeat-interval", type=float, default=HEARTBEAT_SECONDS, metavar="SECONDS",
                        help="between the node's heartbeats; the SuperLink gives a silent node up after two "
                             f"(Flower: 30 s); {HEARTBEAT_MIN_INTERVAL} to {HEARTBEAT_MAX_INTERVAL}, "
                             f"default {HEARTBEAT_SECONDS:g}")
    ours, flower_args = parser.parse_known_args(argv)
    if {"-h", "--help"} & set(flower_args):
        parser.print_help()
        print("\nEverything else goes to flower-supernode:\n")
    try:
        set_heartbeat(ours.heartbeat_interval)
    except ValueError as err:
        parser.error(f"--heartbeat-interval: {err}")
    shorten_waits(supernode_loop, ours.sleep_cap)
    finish_ignored_tasks(supernode_loop)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
