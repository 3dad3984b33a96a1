"""Flower's ``flower-supernode``, with its hard-coded waits shortened.

Why: Flower 1.41's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps 3 s whenever
the SuperLink has no message for it, polls for the ClientApp's reply every 0.5 s, and backs off
1 s, 2 s, 4 s ... while a message's objects are still on their way to the SuperLink. No flag or
environment variable sets these (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` only paces the SuperExec,
which ``--isolation process`` does not start). A round sends every node two messages (train,
evaluate) and each pays these waits: about 3 s per round on a 2-core CPU with two nodes. This
entry point caps them inside that one module and then runs Flower's own ``flower-supernode``
unchanged, with the same arguments::

    python -m client.supernode [--sleep-cap SECONDS] <flower-supernode arguments>

Written against flwr 1.41.0; it refuses to start if the names it replaces are not Flower's.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from types import ModuleType
from typing import Any

from flwr.supercore.inflatable.inflatable_utils import pull_objects
from flwr.supernode import start_client_internal as supernode_loop
from flwr.supernode.cli import flower_supernode

PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 1.0}  # Flower's: 1 s doubling up to 10 s


class CappedSleep:
    """Stands in for the ``time`` module inside one Flower module: ``sleep`` waits at most ``cap``."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.cap))


def shorten_waits(module: ModuleType, cap: float) -> None:
    """Cap the sleeps of one Flower module at ``cap`` seconds and start its object-pull backoff at
    50 ms. Here: the SuperNode loop; server/app.py does the same to the ServerApp's deployment grid
    (``flwr.superlink.grid.http_grid``, which polls for replies every 3 s and has the same two names)."""
    if getattr(module, "time", None) is not time or getattr(module, "pull_objects", None) is not pull_objects:
        raise RuntimeError(f"{module.__name__} is not the module client.supernode was written for (flwr 1.41)")
    module.time = CappedSleep(cap)
    module.pull_objects = partial(pull_objects, **PULL_BACKOFF)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m client.supernode", add_help=False, allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sleep-cap", type=float, default=0.2, metavar="SECONDS",
                        help="longest sleep of the SuperNode loop (Flower: 3 s idle, 0.5 s reply polls); default 0.2")
    ours, flower_args = parser.parse_known_args()
    if {"-h", "--help"} & set(flower_args):
        parser.print_help()
        print("\nEverything else goes to flower-supernode:\n")
    shorten_waits(supernode_loop, ours.sleep_cap)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
