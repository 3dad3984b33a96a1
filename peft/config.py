"""PeftConfig: which parameters a client trains and ships.

It travels between server and clients as JSON, so it is a flat dataclass of
JSON-safe fields with an exact ``to_dict``/``from_dict`` round trip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from .registry import ADAPTERS

BN_STATS = ("aggregate", "frozen")
MERGE_MODES = ("resetless", "reinit")  # LTE's merge steps, peft/lte.py


@dataclass
class PeftConfig:
    method: str = "lora+norm+head"  # '+'-joined component names, order-insensitive
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_freeze_a: bool = False  # A regenerated from lora_seed + module name and frozen; only B trains
    lora_seed: int = 0
    lora_recompute_act: bool = True  # an MLP's GELU output is recomputed in backward, not kept: lora.recompute_activations
    vera_rank: int = 256  # rank of VeRA's shared frozen random A, B (only d, b of sizes r, out train)
    vera_seed: int = 0  # VeRA's A, B are regenerated from it on every client
    target_modules: list[str] | None = None  # None -> per-family defaults
    lte_heads: int = 4  # LTE: parallel LoRA heads per wrapped layer, each on its own micro-batch
    lte_merge_mode: str = "resetless"  # LTE: how a merge step folds the heads into the base (peft/lte.py)
    bn_stats: str = "aggregate"  # "aggregate" | "frozen", see peft/norm.py

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        self.validate()

    @property
    def components(self) -> tuple[str, ...]:
        """Component names, sorted, so "norm+lora" == "lora+norm"."""
        return tuple(sorted({part.strip() for part in self.method.split("+")}))

    def validate(self) -> None:
        """Raise ValueError naming the bad field and the valid choices."""
        if not isinstance(self.method, str):
            raise ValueError(f"PeftConfig.method must be a str, got {self.method!r}")
        for name in self.components:
            if name not in ADAPTERS:
                raise ValueError(
                    f"PeftConfig.method={self.method!r}: unknown component {name!r}; "
                    f"valid components: {sorted(ADAPTERS)}"
                )
        alone = [name for name in self.components if ADAPTERS[name].alone]
        if alone and len(self.components) > 1:
            raise ValueError(f"PeftConfig.method={self.method!r}: {alone[0]!r} must stand alone")
        wrappers = [name for name in self.components if ADAPTERS[name].wraps_weights]
        if len(wrappers) > 1:
            raise ValueError(f"PeftConfig.method={self.method!r}: {wrappers} are mutually exclusive "
                             f"(each adapts the same target layers); choose one")
        if "dora" in self.components and (self.lora_dropout or self.lora_freeze_a):
            raise ValueError(f"PeftConfig.method={self.method!r}: DoRA supports neither lora_dropout "
                             f"(got {self.lora_dropout!r}) nor lora_freeze_a (got {self.lora_freeze_a!r})")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"PeftConfig.lora_rank must be an int >= 1, got {self.lora_rank!r}")
        if not isinstance(self.lora_alpha, (int, float)) or self.lora_alpha <= 0:
            raise ValueError(f"PeftConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"PeftConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.lora_freeze_a, bool):
            raise ValueError(f"PeftConfig.lora_freeze_a must be a bool, got {self.lora_freeze_a!r}")
        if not isinstance(self.lora_recompute_act, bool):
            raise ValueError(f"PeftConfig.lora_recompute_act must be a bool, got {self.lora_recompute_act!r}")
        if isinstance(self.lora_seed, bool) or not isinstance(self.lora_seed, int) or self.lora_seed < 0:
            raise ValueError(f"PeftConfig.lora_seed must be an int >= 0, got {self.lora_seed!r}")
        for key in ("vera_rank", "vera_seed", "lte_heads"):
            value, low = getattr(self, key), 0 if key == "vera_seed" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"PeftConfig.{key} must be an int >= {low}, got {value!r}")
        if self.target_modules is not None and (
            not isinstance(self.target_modules, list)
            or not self.target_modules
            or not all(isinstance(p, str) and p for p in self.target_modules)
        ):
            raise ValueError(
                f"PeftConfig.target_modules must be None or a non-empty list of str, got {self.target_modules!r}"
            )
        if self.lte_merge_mode not in MERGE_MODES:
            raise ValueError(f"PeftConfig.lte_merge_mode={self.lte_merge_mode!r}; valid choices: {list(MERGE_MODES)}")
        if self.bn_stats not in BN_STATS:
            raise ValueError(f"PeftConfig.bn_stats={self.bn_stats!r}; valid choices: {list(BN_STATS)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PeftConfig:
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"PeftConfig: unknown fields {sorted(unknown)}")
        return cls(**data)
