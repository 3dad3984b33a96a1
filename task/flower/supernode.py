"""``flower-supernode`` with its hard-coded waits capped (``waits.py`` says which and why)::

    fedmeld supernode [--sleep-cap SECONDS] <flower-supernode arguments>

It caps the waits inside Flower's SuperNode loop and then runs Flower's own ``flower-supernode``
unchanged, with the same arguments.
"""

from __future__ import annotations

import argparse
import sys

from flwr.supernode import start_client_internal as supernode_loop
from flwr.supernode.cli import flower_supernode

from .waits import POLL_SECONDS, shorten_waits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedmeld supernode", add_help=False, allow_abbrev=False,
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sleep-cap", type=float, default=POLL_SECONDS, metavar="SECONDS",
                        help="longest sleep of the SuperNode loop (Flower: 3 s idle, 0.5 s reply polls); "
                             f"default {POLL_SECONDS}")
    ours, flower_args = parser.parse_known_args(argv)
    if {"-h", "--help"} & set(flower_args):
        parser.print_help()
        print("\nEverything else goes to flower-supernode:\n")
    shorten_waits(supernode_loop, ours.sleep_cap)
    sys.argv = ["flower-supernode", *flower_args]
    flower_supernode()


if __name__ == "__main__":
    main()
