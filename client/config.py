"""The run configuration: one typed, validated view of Flower's ``run_config``.

Defaults live in exactly one place, ``[tool.flwr.app.config]`` of ``pyproject.toml``, so that
``flwr run .`` and ``python -m simulations.run`` read the same settings. This module adds what a
TOML table cannot hold: the type, the allowed values and a help text for every key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"

MEDMNIST_2D = (
    "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
    "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
)
AGGREGATION_CHOICES = ("fedavg", "exact", "ffa", "median", "trimmed-mean")
PEFT_PARTS = ("lora", "dora", "vera", "bitfit", "norm")  # combinable with '+', at most one of lora/dora/vera
PEFT_ALONE = ("head", "full", "lte")


def _valid_ranks(value: str) -> bool:
    try:
        return not value.strip() or all(int(r) > 0 for r in value.split(","))
    except ValueError:
        return False


def _valid_peft(value: str) -> bool:
    parts = value.split("+")
    if len(parts) == 1 and value in PEFT_ALONE:
        return True
    return (len(set(parts)) == len(parts) and set(parts) <= set(PEFT_PARTS)
            and sum(p in ("lora", "dora", "vera") for p in parts) <= 1)


class ConfigError(ValueError):
    """A run-config key or value that cannot be used; the message says how to fix it."""


def _key(help: str, choices: tuple[Any, ...] | None = None,
         check: Callable[[Any], bool] | None = None, rule: str = "") -> Any:
    return field(metadata={"help": help, "choices": choices, "check": check, "rule": rule})


_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_fraction = (lambda v: 0 < v <= 1, "must be in (0, 1]")


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, spelled with '_' here and '-' in TOML and on the command line."""

    dataset: str = _key("MedMNIST 2D dataset flag.", MEDMNIST_2D)
    image_size: int = _key("MedMNIST image size; picks the file (e.g. breastmnist_64.npz).", (28, 64, 128, 224))
    input_size: int = _key("Model input resolution; images are resized on the device when it differs from "
                           "image-size (e.g. 32 for ConvNeXt on 28 px files). 0: image-size.",
                           check=_non_negative[0], rule=_non_negative[1])
    data_root: str = _key("Directory holding the MedMNIST .npz files. Empty: $MEDMNIST_ROOT, "
                          "else medmnist's default (~/.medmnist), downloading when the file is absent.")
    model: str = _key("timm model name, e.g. resnet18, convnext_atto, vit_tiny_patch16_224.")
    pretrained: bool = _key("Load pretrained weights: from `weights` if set, else timm's hub/HF cache "
                            "(set HF_HUB_OFFLINE=1 to use only the cache).")
    weights: str = _key("Local weights file (.safetensors/.pth/.bin) for the backbone; implies pretrained. "
                        "The classifier is resized, grayscale input adapted.")
    num_clients: int = _key("Number of clients (hospitals) the training split is partitioned over.",
                            check=_positive[0], rule=_positive[1])
    partition: str = _key("How labels are spread over clients.", ("iid", "dirichlet"))
    dirichlet_alpha: float = _key("Dirichlet concentration for partition=dirichlet; small = skewed.",
                                  check=_positive[0], rule=_positive[1])
    val_fraction: float = _key("Share of each client's partition kept as its local validation split.",
                               check=lambda v: 0 <= v < 1, rule="must be in [0, 1)")
    num_server_rounds: int = _key("Federated rounds.", check=_positive[0], rule=_positive[1])
    local_epochs: int = _key("Local epochs per round on each client.", check=_positive[0], rule=_positive[1])
    batch_size: int = _key("Local mini-batch size.", check=_positive[0], rule=_positive[1])
    lr: float = _key("Client AdamW learning rate.", check=_positive[0], rule=_positive[1])
    weight_decay: float = _key("Client AdamW weight decay.", check=_non_negative[0], rule=_non_negative[1])
    peft: str = _key("What trains: '+'-joined parts of lora, dora, vera, bitfit, norm (at most one of "
                     "lora/dora/vera; e.g. lora+norm), or head (classifier only), full (everything), lte "
                     "(parallel LoRA heads merged into the backbone). The classifier head (resized to the "
                     "dataset) always trains.", check=_valid_peft,
                     rule=f"must be '+'-joined parts of {', '.join(PEFT_PARTS)} (at most one of lora/dora/vera), "
                          f"or one of {', '.join(PEFT_ALONE)}")
    lora_rank: int = _key("LoRA rank r.", check=_positive[0], rule=_positive[1])
    lora_alpha: float = _key("LoRA alpha; the update is scaled by alpha/r.", check=_positive[0], rule=_positive[1])
    vera_rank: int = _key("VeRA: rank of the frozen random matrices shared across layers (regenerated from "
                          "seed, never sent).", check=_positive[0], rule=_positive[1])
    optimizer: str = _key("Client optimizer: adamw, or galore-adamw (GaLore: gradients of weight matrices "
                          "projected to galore-rank; usually with peft=full).", ("adamw", "galore-adamw"))
    galore_rank: int = _key("GaLore projection rank.", check=_positive[0], rule=_positive[1])
    galore_update_gap: int = _key("GaLore: optimizer steps between refreshes of the projection.",
                                  check=_positive[0], rule=_positive[1])
    galore_scale: float = _key("GaLore: scale of the projected-back update.", check=_positive[0], rule=_positive[1])
    lora_dropout: float = _key("Dropout on the LoRA side path.", check=lambda v: 0 <= v < 1, rule="must be in [0, 1)")
    target_modules: str = _key("Comma-separated LoRA target patterns (module names, suffixes or globs); "
                               "empty: the model family's defaults.")
    lte_heads: int = _key("LTE: parallel LoRA heads per client, each on its own micro-batch (batch-size must "
                          "divide by it).", check=_positive[0], rule=_positive[1])
    lte_merge_every: int = _key("LTE: optimizer steps between merges of the heads into the backbone.",
                                check=_positive[0], rule=_positive[1])
    lte_merge_mode: str = _key("LTE merge rule: resetless (the base takes the mean change of s·B·A, factors "
                               "kept) or reinit (merge the mean s·B·A, then re-initialise the heads, ReLoRA-style).",
                               ("resetless", "reinit"))
    bn_stats: str = _key("BatchNorm running statistics: aggregate them like adapter deltas, or freeze them.",
                         ("aggregate", "frozen"))
    aggregation: str = _key("How client updates combine: fedavg (example-weighted mean of the deltas; for LoRA of A "
                            "and B separately, which is NOT the mean of the B·A products), exact (LoRA only: the "
                            "example-weighted mean of the clients' s·B·A products, merged into the backbone; clients "
                            "re-initialise LoRA each round, FLoRA-style), ffa (frozen-A LoRA: A regenerated from seed "
                            "on every node, only B trains and travels, so the mean is exact), median (coordinate-wise), "
                            "trimmed-mean (20% each side).", AGGREGATION_CHOICES)
    client_ranks: str = _key("Comma-separated LoRA ranks, one per client by partition id (cycled), e.g. 4,8,8,16; "
                             "empty: every client uses lora-rank. Every client scales by lora-alpha/max(ranks). "
                             "fedavg zero-pads smaller factors to the largest rank (HetLoRA baseline); exact "
                             "aggregates mixed ranks exactly.", check=_valid_ranks,
                             rule="must be empty or comma-separated positive integers")
    server_optimizer: str = _key("Server step on the aggregated delta: sgd (lr 1 = FedAvg), momentum (FedAvgM), "
                                 "adam (FedAdam), yogi (FedYogi).", ("sgd", "momentum", "adam", "yogi"))
    server_lr: float = _key("Server learning rate on the aggregated delta (1.0 with sgd = FedAvg).",
                            check=_positive[0], rule=_positive[1])
    server_beta1: float = _key("Server momentum / first-moment decay (momentum, adam, yogi).",
                               check=lambda v: 0 <= v < 1, rule="must be in [0, 1)")
    server_beta2: float = _key("Server second-moment decay (adam, yogi).", check=lambda v: 0 <= v < 1,
                               rule="must be in [0, 1)")
    server_tau: float = _key("Adaptivity floor added to the root second moment (adam, yogi).",
                             check=_positive[0], rule=_positive[1])
    proximal_mu: float = _key("FedProx: weight of (mu/2)·||w - w_global||² in each client's loss; 0 = off.",
                              check=_non_negative[0], rule=_non_negative[1])
    local_params: str = _key("Comma-separated adapter-name patterns kept on each client and never sent "
                             "(personalisation: e.g. norm weights for FedBN-style, head for FedPer-style).")
    fraction_train: float = _key("Fraction of connected clients sampled each round.",
                                 check=_fraction[0], rule=_fraction[1])
    min_clients: int = _key("Minimum connected clients before a round starts (deployment).",
                            check=_positive[0], rule=_positive[1])
    round_timeout: int = _key("Seconds the server waits for replies in a round; late clients are dropped.",
                              check=_positive[0], rule=_positive[1])
    device: str = _key("Client device: auto (CUDA when present), cpu, cuda or cuda:N.",
                       check=lambda v: v in ("auto", "cpu", "cuda") or v.startswith("cuda:"),
                       rule="must be auto, cpu, cuda or cuda:N")
    seed: int = _key("Seed for partitioning, model init and shuffling.")
    out: str = _key("Directory under which the run directory is created (use an absolute path with flwr run).")
    run_name: str = _key("Name of the run directory under `out`; empty: <date>-<time>-<dataset>-<peft>. "
                         "An existing non-empty directory is refused, never overwritten.")

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Defaults from pyproject.toml, updated with ``overrides`` (Flower's '-' keys), checked."""
        values = dict(defaults())
        for key, value in (overrides or {}).items():
            if key not in values:
                raise ConfigError(f"unknown run-config key {key!r}; valid keys: {', '.join(values)}")
            values[key] = value
        return cls(**{k.replace("-", "_"): _coerce(k, v, defaults()[k]) for k, v in values.items()})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, meta, key = getattr(self, f.name), f.metadata, f.name.replace("_", "-")
            if meta["choices"] and value not in meta["choices"]:
                valid = ", ".join(map(str, meta["choices"]))
                raise ConfigError(f"bad value {value!r} for {key!r}; valid values: {valid}")
            if meta["check"] and not meta["check"](value):
                raise ConfigError(f"bad value {value!r} for {key!r}: {meta['rule']}")
        self._check_combinations()

    def _check_combinations(self) -> None:
        """Keys that are valid alone but not together; each message says what to change."""
        parts = set(self.peft.split("+"))
        if self.aggregation in ("exact", "ffa") and "lora" not in parts:
            raise ConfigError(f"aggregation={self.aggregation} needs LoRA: set peft to lora, lora+norm, ... "
                              f"(got peft={self.peft!r})")
        if self.client_ranks and ("lora" not in parts or self.aggregation not in ("fedavg", "exact")):
            raise ConfigError("client-ranks needs peft with lora and aggregation fedavg (zero-padding) or exact; "
                              f"got peft={self.peft!r}, aggregation={self.aggregation!r}")
        if self.aggregation == "exact":
            unsupported = {"proximal-mu": self.proximal_mu != 0, "local-params": bool(self.local_params),
                           "lora-dropout": self.lora_dropout != 0, "optimizer": self.optimizer != "adamw",
                           "server-optimizer": self.server_optimizer != "sgd", "server-lr": self.server_lr != 1}
            bad = [k for k, on in unsupported.items() if on]
            if bad:
                raise ConfigError(f"aggregation=exact merges the mean product into the backbone as is; it does not "
                                  f"support {', '.join(bad)}: reset them to their defaults or use fedavg")

    @property
    def model_size(self) -> int:
        """The resolution the model sees."""
        return self.input_size or self.image_size

    @property
    def updates_backbone(self) -> bool:
        """LTE and exact aggregation merge low-rank updates into the backbone itself, so every
        client keeps a replica of it (client/lte.py, server/lte.py) instead of adapter deltas."""
        return self.peft == "lte" or self.aggregation == "exact"

    def for_client(self, partition_id: int | None) -> RunConfig:
        """This client's config under ``client-ranks`` (the server's: ``None``, the largest rank).
        The scale alpha/r is the same on every client, so a rank-r slice of the global factors
        means what it means at the largest rank."""
        if not self.client_ranks:
            return self
        ranks = [int(r) for r in self.client_ranks.split(",")]
        rank = max(ranks) if partition_id is None else ranks[partition_id % len(ranks)]
        return dataclasses.replace(self, lora_rank=rank, lora_alpha=self.lora_alpha * rank / max(ranks))

    def to_flower(self) -> dict[str, Any]:
        """The '-'-keyed dict Flower's run_config holds."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


@cache
def defaults() -> dict[str, Any]:
    with PYPROJECT.open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]


def describe() -> str:
    """One line per key: name, default, allowed values and help, for --help."""
    lines = []
    for f in dataclasses.fields(RunConfig):
        key = f.name.replace("_", "-")
        choices = f" {{{'|'.join(map(str, f.metadata['choices']))}}}" if f.metadata["choices"] else ""
        lines.append(f"  {key} = {defaults()[key]!r}{choices}\n      {f.metadata['help']}")
    return "\n".join(lines)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Accept what TOML and command lines give (ints for floats, 'true' for bools); refuse the rest."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
    elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise ConfigError(f"bad value {value!r} for {key!r}: expected {kind.__name__} (default {default!r})")
