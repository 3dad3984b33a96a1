"""The ``fedmeld`` command: one entry point for every command line fedmeld has.

``fedmeld COMMAND [arguments]``; ``fedmeld COMMAND --help`` explains each. The commands take the
same run-config keys (``key=value``) as ``flwr run . --run-config``.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module with a main(argv), one line of help)
COMMANDS = {
    "run": ("fedmeld.simulations.run", "one federated simulation (Ray or in-process); writes a run directory"),
    "deploy": ("fedmeld.simulations.deploy", "the same app under Flower's deployment runtime on this machine"),
    "sweep": ("fedmeld.simulations.sweep", "a grid of runs (presets in simulations/presets/), with tables and plots"),
    "bench": ("fedmeld.simulations.bench", "GPU speed and memory of each fine-tuning mode, federation overhead"),
    "scaling": ("fedmeld.simulations.scaling", "the deployment over 1, 2, 4 ... GPUs, one SuperNode per client"),
    "pretrain": ("fedmeld.simulations.pretrain", "pretrain a backbone on fractals or other MedMNIST sets for weights="),
    "report": ("fedmeld.simulations.report", "runs side by side: one table, curves redrawn, a comparison plot"),
    "lte-compare": ("fedmeld.simulations.lte_compare", "LTE against full training and LoRA from scratch"),
    "keys": ("fedmeld.simulations.security", "TLS certificates and SuperNode key pairs for a secure deployment"),
    "supernode": ("fedmeld.task.flower.supernode", "flower-supernode with its hard-coded waits capped"),
    "executor": ("fedmeld.task.flower.executor", "a long-lived ClientApp executor for a SuperNode (--isolation process)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return ("usage: fedmeld COMMAND [arguments]   (fedmeld COMMAND --help for its arguments)\n\n"
            "Federated adapter training of timm models on MedMNIST with Flower.\n\ncommands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"fedmeld: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
