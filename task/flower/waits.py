"""Flower's hard-coded waits, capped.

Why: Flower's SuperNode loop (``flwr/supernode/start_client_internal.py``) sleeps 3 s whenever
the SuperLink has no message for it, polls for the ClientApp's reply every 0.5 s, and backs off
1 s, 2 s, 4 s ... while a message's objects are still on their way. The ServerApp's deployment
Grid (``flwr/superlink/grid/http_grid.py``) sleeps 3 s between reply polls with the same backoff.
No flag or environment variable sets these (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` only paces the
SuperExec). A round sends every node two messages and each pays these waits.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import partial
from types import ModuleType
from typing import Any

from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import pull_objects

from . import require_supported

PULL_BACKOFF = {"initial_backoff": 0.05, "backoff_cap": 1.0}  # Flower's: 1 s doubling up to 10 s
POLL_ENV = "FEDMELD_POLL_SECONDS"


class PollError(ValueError):
    """``FEDMELD_POLL_SECONDS`` is not a number of seconds in (0, 60]."""


def poll_seconds() -> float:
    """Seconds between polls wherever a hop polls: the SuperNode for messages and for its ClientApp's
    reply (`fedmeld supernode --sleep-cap`), the executor for tasks (`fedmeld executor --poll-interval`)
    and the ServerApp's Grid for replies; 0.2 unless ``FEDMELD_POLL_SECONDS`` says otherwise (every
    process of ``fedmeld deploy`` inherits it). A message waits on average half of it at each hop, and
    every poll is a request the SuperLink serves: shorter polls cost it CPU. On one H100 host, 8 SuperNodes,
    0.1 / 0.2 / 0.5 s gave steady rounds of 2.34 / 2.39 / 2.68 s (simulations/results/rounds_h100_2026-12-06/);
    on the H200 0.05 s doubled the round (bench_h200_2026-12-01_federation.json)."""
    raw = os.environ.get(POLL_ENV) or "0.2"  # unset or empty: the default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 60:
        raise PollError(f"{POLL_ENV}={raw!r}: give the seconds between polls, a number in (0, 60], e.g. 0.2")
    return value


def poll_seconds_or_exit(parser: argparse.ArgumentParser) -> float:
    """``poll_seconds()`` for a command line: a bad value is the parser's usage error, naming it."""
    try:
        return poll_seconds()
    except PollError as err:
        parser.error(str(err))


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
    50 ms: the SuperNode loop, or the ServerApp's deployment Grid (both use these two names)."""
    require_supported("fedmeld.task.flower.waits")
    if getattr(module, "time", None) is not time or getattr(module, "pull_objects", None) is not pull_objects:
        raise RuntimeError(f"{module.__name__} no longer uses `time` and `pull_objects` as fedmeld.task.flower.waits "
                           f"expects; see tests/task/test_flower.py")
    module.time = CappedSleep(cap)
    module.pull_objects = partial(pull_objects, **PULL_BACKOFF)


def shorten_grid_waits(grid: Grid) -> None:
    """In deployment (this process is Flower's flwr-serverapp, started for this one run), cap the
    waits of its Grid; other Grids (simulation, in-process) do not poll."""
    from flwr.superlink.grid import HttpGrid, http_grid

    if isinstance(grid, HttpGrid):
        shorten_waits(http_grid, poll_seconds())  # the Grid itself sleeps 3 s between polls for replies
