"""Every place fedmeld reaches into Flower's internals, in one package, behind one version check.

Flower's public API (``flwr.app``, ``flwr.clientapp``, ``flwr.serverapp``, strategies) is used
everywhere; what is *not* public lives only here, written against the Flower versions in
``SUPPORTED`` (their internals we touch are identical):

- ``waits``: caps the hard-coded sleeps of the SuperNode loop (``flwr.supernode.start_client_internal``)
  and of the ServerApp's deployment Grid (``flwr.superlink.grid.http_grid``); ``supernode`` is
  ``flower-supernode`` with those caps.
- ``executor``: a long-lived ClientApp executor on a SuperNode's Runtime API (``--isolation process``),
  built from ``flwr.supernode.runtime.run_clientapp``'s steps.
- ``inprocess``: a Grid that hands messages to the ClientApp in this process (in one thread, or one
  worker thread per device), and the ``TaskIdentity`` a runtime would set.
- ``tracing``: the ServerApp's push and reply events of the hop trace (``fedmeld.task.trace``).

``tests/task/test_flower.py`` has a test per internal name used here; after a Flower upgrade, run
it first. Each entry point calls ``require_supported`` before touching an internal.
"""

from __future__ import annotations

from importlib.metadata import version

SUPPORTED = ("1.41", "1.42")  # Flower minor versions whose internals this package was read against


class UnsupportedFlower(RuntimeError):
    """The installed Flower is not one whose internals fedmeld was written against."""


def flower_version() -> str:
    return version("flwr")


def require_supported(what: str) -> None:
    """Refuse to patch or reuse Flower internals on a Flower version they were not read from."""
    installed = flower_version()
    if ".".join(installed.split(".")[:2]) not in SUPPORTED:
        raise UnsupportedFlower(f"{what} reuses internals of Flower {' / '.join(SUPPORTED)}, but flwr {installed} is "
                                f"installed: install flwr>={SUPPORTED[0]},<{_next(SUPPORTED[-1])} (pyproject.toml's "
                                f"pin), or check fedmeld.task.flower against the new version (tests/task/test_flower.py)")


def _next(minor: str) -> str:
    major, low = minor.split(".")
    return f"{major}.{int(low) + 1}"


from .tracing import trace_grid  # noqa: E402
from .waits import shorten_grid_waits, shorten_waits  # noqa: E402  (needs require_supported)

__all__ = ["SUPPORTED", "UnsupportedFlower", "flower_version", "require_supported", "shorten_grid_waits",
           "shorten_waits", "trace_grid"]
