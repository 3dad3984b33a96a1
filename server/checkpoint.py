"""Resume a run from its last completed round: what the server writes after every round and reads back.

Flower's strategy loop always starts at round 1 and keeps no state on disk, so a killed ServerApp
used to lose the run. After each round the server writes ``checkpoint.safetensors`` atomically (a
temporary file renamed into place): the protocol's global state (``global/``), its other state
(``protocol/``: server-optimizer moments), the selected round's state (``selected/``), and in the
metadata the round, the run config, the round-0 metrics and the protocol's bookkeeping. Client
sampling and every client's randomness derive from (seed, round, partition), so a resumed run
computes what the uninterrupted run computes; ``metrics.jsonl`` is cut back to the checkpoint's
round. The DP ledger (``privacy``: every client's history of noise, sample rate and steps) is
in the metadata too, so a resumed run keeps the privacy it has spent. Set ``resume`` (``fedmeld run --resume RUN_DIR``, or ``resume="/abs/RUN_DIR"`` in the run
config of a deployment) to continue.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fedmeld.server.report import atomic_write
from fedmeld.task.config import ConfigError, RunConfig, defaults

FILE = "checkpoint.safetensors"
PART = ("global/", "protocol/", "selected/")
NODE_SPECIFIC = ("resume", "out", "run-name", "data-root", "device")  # may differ when resuming


@dataclass
class Checkpoint:
    round: int
    config: dict[str, Any]
    initial: dict[str, float]  # round 0's metrics
    protocol_meta: dict[str, Any]
    parts: dict[str, dict[str, torch.Tensor]]  # "global" / "protocol" / "selected" -> state
    privacy: dict[str, list] = field(default_factory=dict)  # the DP ledger's histories (task/privacy.Ledger)

    def save(self, run_dir: Path) -> None:
        tensors = {f"{part}/{k}": v.detach().cpu().contiguous() for part, state in self.parts.items()
                   for k, v in state.items()}
        meta = {"round": str(self.round), "config": json.dumps(self.config), "initial": json.dumps(self.initial),
                "protocol": json.dumps(self.protocol_meta), "privacy": json.dumps(self.privacy)}
        atomic_write(run_dir / FILE, lambda p: save_file(tensors, str(p), metadata=meta))

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        """The checkpoint of ``run_dir``; ConfigError naming the file if it is missing or unreadable."""
        path = Path(run_dir) / FILE
        if not path.is_file():
            raise ConfigError(f"resume: {path} does not exist: {run_dir} is not a fedmeld run directory, or the "
                              f"run stopped before its first round ended; start it afresh with resume=\"\"")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                header = f.metadata()
            meta = {"round": int(header["round"]), "config": json.loads(header["config"]),
                    "initial": json.loads(header["initial"]), "protocol": json.loads(header["protocol"]),
                    "privacy": json.loads(header.get("privacy", "{}"))}
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"resume: {path} is corrupt or partial ({type(err).__name__}: {err}); nothing was "
                              f"changed. Restore it from a backup or start the run afresh") from None
        parts = {p.rstrip("/"): {k[len(p):]: v for k, v in tensors.items() if k.startswith(p)} for p in PART}
        return cls(meta["round"], meta["config"], meta["initial"], meta["protocol"], parts, meta["privacy"])

    def check(self, cfg: RunConfig) -> None:
        """Refuse to continue a run with a different config: the result would be neither run."""
        mine = cfg.to_flower()
        theirs = {**defaults(), **self.config}  # a key added since the checkpoint was written: its default
        differ = sorted(k for k in mine if k not in NODE_SPECIFIC and theirs[k] != mine[k])
        if differ:
            raise ConfigError(f"resume: the run was started with other values for {', '.join(differ)} "
                              f"({', '.join(f'{k}={theirs[k]!r}' for k in differ)}); resume with "
                              f"those, or start a new run")
        if self.round >= cfg.num_server_rounds:
            raise ConfigError(f"resume: the run already completed all {cfg.num_server_rounds} rounds")
