"""The run configuration: one typed, validated view of Flower's ``run_config``.

Every key is a field of ``RunConfig`` with its default, type, allowed values and help text, so an
installed fedmeld needs no file to know them. ``[tool.flwr.app.config]`` of ``pyproject.toml``
repeats the defaults because ``flwr run .`` reads them there (a test keeps the two equal). The
choices of ``peft`` and ``aggregation`` are not listed here: they come from the adapter and
aggregator registries, plugins included (``fedmeld.task.plugins``).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedmeld.peft import ADAPTERS, PeftConfig
from fedmeld.peft.config import MERGE_MODES
from fedmeld.task.aggregators import AGGREGATORS, Aggregator, RuleSettings
from fedmeld.task.attacks import ATTACKS, Attack, parse_attackers
from fedmeld.task.plugins import load_plugins

RESIZE_MODES = ("nearest", "bilinear", "bicubic")  # choices the engine's Inputs takes, too
AUGMENTS = ("none", "flip", "light")
PRECISIONS = ("bf16", "fp32")
COMPILE_MODES = ("off", "default", "cudagraphs")  # the engine's training step: eager, torch.compile, CUDA graph
MEDMNIST_2D = (
    "pathmnist", "chestmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist",
    "breastmnist", "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
)


class ConfigError(ValueError):
    """A run-config key or value that cannot be used; the message says how to fix it."""


def parse_pairs(pairs: Iterable[str]) -> dict[str, Any]:
    """``key=value`` with TOML values (``lr=0.01``, ``pretrained=true``); bare words are strings."""
    parsed = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"expected key=value, got {pair!r}")
        try:
            parsed[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            parsed[key.strip()] = raw.strip()
    return parsed


def model_kwargs(value: str) -> dict[str, Any] | None:
    """``model-args`` (comma-separated ``key=value``) as keyword arguments; None if malformed."""
    try:
        kwargs = parse_pairs(p for p in value.split(",") if p.strip())
    except ConfigError:
        return None
    return kwargs if all(k.isidentifier() for k in kwargs) else None


def _valid_ints(value: str, low: int) -> bool:
    """Empty, or comma-separated integers >= ``low``."""
    try:
        return not value.strip() or all(int(r) >= low for r in value.split(","))
    except ValueError:
        return False


def peft_method(peft: str) -> str:
    """The run config's ``peft`` as a PeftConfig method: the classifier trains with every choice
    except those that must stand alone (which train it themselves, or are ``head`` alone)."""
    parts = peft.split("+")
    alone = len(parts) == 1 and parts[0] in ADAPTERS and ADAPTERS[parts[0]].alone
    return peft if alone or parts == ["head"] else f"{peft}+head"


def _peft_problem(value: str) -> str:
    """What is wrong with a ``peft`` value (PeftConfig's validation says it), or ''."""
    parts = value.split("+")
    if len(set(parts)) != len(parts):
        return f"must be {_peft_rule()}; it names a part twice"
    try:
        PeftConfig(method=peft_method(value))
    except ValueError as err:
        return f"must be {_peft_rule()}; {str(err).split(': ', 1)[-1]}"
    return ""


def _peft_rule() -> str:
    names = sorted(ADAPTERS)
    alone = [n for n in names if ADAPTERS[n].alone or n == "head"]
    wrappers = [n for n in names if ADAPTERS[n].wraps_weights and n not in alone]
    return (f"'+'-joined parts of {', '.join(n for n in names if n not in alone)} (at most one of "
            f"{'/'.join(wrappers)}), or one of {', '.join(alone)}")


def _peft_help() -> str:
    listed = "; ".join(f"{n}: {ADAPTERS[n].help}" for n in sorted(ADAPTERS))
    return (f"What trains: {_peft_rule()}; e.g. lora+norm. The classifier head (resized to the dataset) "
            f"always trains. {listed}.")


def _aggregation_help() -> str:
    return "How client updates combine. " + "; ".join(f"{n}: {AGGREGATORS[n].help}" for n in sorted(AGGREGATORS)) + "."


def _attack_help() -> str:
    return ("Poisoned-client drill (task/attacks.py): what the partitions in attackers do instead of training "
            "honestly; none: nobody attacks. " + "; ".join(f"{n}: {ATTACKS[n].help}" for n in sorted(ATTACKS)) + ".")


def _key(default: Any, help: str | Callable[[], str], choices: tuple[Any, ...] | Callable[[], tuple] | None = None,
         check: Callable[[Any], bool] | None = None, rule: str = "") -> Any:
    """A field with its default and what --help and validation need; ``help`` and ``choices`` may be
    callables, read when needed, so that registries (and plugins) fill them."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check, "rule": rule})


def _meta(f: dataclasses.Field, name: str) -> Any:
    value = f.metadata[name]
    return value() if callable(value) and name in ("help", "choices") else value


_positive = (lambda v: v > 0, "must be > 0")
_non_negative = (lambda v: v >= 0, "must be >= 0")
_fraction = (lambda v: 0 < v <= 1, "must be in (0, 1]")


@dataclass(frozen=True)
class RunConfig:
    """Every run-config key, spelled with '_' here and '-' in TOML and on the command line."""

    dataset: str = _key('breastmnist', "MedMNIST 2D dataset flag.", MEDMNIST_2D)
    image_size: int = _key(28, "MedMNIST image size; picks the file (e.g. breastmnist_64.npz).", (28, 64, 128, 224))
    input_size: int = _key(0, "Model input resolution; images are resized on the device when it differs from "
                           "image-size (e.g. 32 for ConvNeXt on 28 px files). 0: image-size.",
                           check=_non_negative[0], rule=_non_negative[1])
    resize: str = _key("bilinear", "How images are resized to input-size on the device (MedMNIST v2's (224) rows "
                       "upsample 28 px with nearest).", RESIZE_MODES)
    augment: str = _key("none", "Training augmentation on the device, seeded per client and round: none, flip "
                        "(horizontal), light (flip, rotation within 10 degrees, shift within 1/8).",
                        AUGMENTS)
    stem: str = _key("default", "CNN stem: default (timm's), or small for small inputs (ResNet: 3x3 stride-1 conv, "
                     "no max-pool, as MedMNIST v2's (28) rows; ConvNeXt: 2x2 stride-2 patchify; EfficientNet: "
                     "stride-1 stem). Pretrained stems are kept where the shape allows, else centre-cropped.",
                     ("default", "small"))
    data_root: str = _key('', "Directory holding the MedMNIST .npz files. Empty: $MEDMNIST_ROOT, "
                          "else medmnist's default (~/.medmnist), downloading when the file is absent.")
    model: str = _key("resnet18", "timm model name, e.g. resnet18, convnext_atto, vit_tiny_patch16_224.")
    model_args: str = _key("", "Extra timm.create_model keyword arguments, comma-separated key=value with TOML "
                           "values, e.g. zero_init_last=false (torchvision's ResNet init) or drop_path_rate=0.1.",
                           check=lambda v: model_kwargs(v) is not None, rule="must be comma-separated key=value "
                           "with TOML values, e.g. zero_init_last=false,drop_rate=0.1")
    init: str = _key("timm", "How a random backbone is initialised: timm (the model's own init) or torch (every layer "
                     "as PyTorch constructs it, reset_parameters(): the CIFAR-style ResNets of MedMNIST v2's (28) "
                     "rows set no init of their own). Not with pretrained weights.", ("timm", "torch"))
    precision: str = _key("bf16", "Compute precision on CUDA: bf16 (autocast) or fp32 (MedMNIST v2's). The CPU "
                          "always computes in fp32.", PRECISIONS)
    compile: str = _key("off", "Client training step: off (eager), default (torch.compile; compiles once per "
                        "process, seconds to minutes), or cudagraphs (CUDA only: each local training call captures "
                        "one full batch's forward and backward as a CUDA graph and replays it, one launch per step, "
                        "which is what small models at large batches are bound by). Compile time is reported apart "
                        "(compile_seconds).", COMPILE_MODES)
    pretrained: bool = _key(False, "Load pretrained weights: from `weights` if set, else timm's hub/HF cache "
                            "(set HF_HUB_OFFLINE=1 to use only the cache).")
    weights: str = _key('', "Local weights file (.safetensors/.pth/.bin) for the backbone; implies pretrained. "
                        "The classifier is resized, grayscale input adapted.")
    init_adapter: str = _key('', "Directory of a Hugging Face peft LoRA/DoRA adapter (adapter_config.json + "
                             "adapter_model.safetensors, e.g. another run's hf_peft/) the global adapter starts from "
                             "at round 0, head and norms included. Its model, target modules, rank and LoRA/DoRA "
                             "type must be the run's (a different lora_alpha is rescaled into B, exactly). Like "
                             "weights, every node reads it. Empty: a fresh adapter.")
    num_clients: int = _key(4, "Number of clients (hospitals) the training split is partitioned over.",
                            check=_positive[0], rule=_positive[1])
    partition: str = _key('dirichlet', "How labels are spread over clients.", ("iid", "dirichlet"))
    dirichlet_alpha: float = _key(0.5, "Dirichlet concentration for partition=dirichlet; small = skewed.",
                                  check=_positive[0], rule=_positive[1])
    val_fraction: float = _key(0.1, "Share of each client's partition kept as its local validation split.",
                               check=lambda v: 0 <= v < 1, rule="must be in [0, 1)")
    num_server_rounds: int = _key(8, "Federated rounds.", check=_positive[0], rule=_positive[1])
    local_epochs: int = _key(2, "Local epochs per round on each client.", check=_positive[0], rule=_positive[1])
    batch_size: int = _key(32, "Local mini-batch size.", check=_positive[0], rule=_positive[1])
    lr: float = _key(0.01, "Client AdamW learning rate (the peak, under a schedule).", check=_positive[0],
                     rule=_positive[1])
    lr_schedule: str = _key("constant", "Learning rate over the rounds (task/schedule.py; t counts rounds, local "
                            "epochs as fractions): constant, cosine (to 0 at the last round), multistep (x lr-gamma "
                            "at each of lr-milestones).", ("constant", "cosine", "multistep"))
    lr_milestones: str = _key("", "Comma-separated rounds at which multistep multiplies the lr by lr-gamma "
                              "(MedMNIST v2: 50,75 of 100).", check=lambda v: _valid_ints(v, low=1),
                              rule="must be empty or comma-separated integers >= 1")
    lr_gamma: float = _key(0.1, "multistep's factor per milestone.", check=_positive[0], rule=_positive[1])
    lr_warmup: int = _key(0, "Rounds of linear warmup from lr/(rounds x local-epochs) to lr before the schedule.",
                          check=_non_negative[0], rule=_non_negative[1])
    weight_decay: float = _key(0.0, "Client AdamW weight decay.", check=_non_negative[0], rule=_non_negative[1])
    peft: str = _key("lora+norm", _peft_help)
    lora_rank: int = _key(8, "LoRA rank r.", check=_positive[0], rule=_positive[1])
    lora_alpha: float = _key(16.0, "LoRA alpha; the update is scaled by alpha/r.", check=_positive[0], rule=_positive[1])
    vera_rank: int = _key(256, "VeRA: rank of the frozen random matrices shared across layers (regenerated from "
                          "seed, never sent).", check=_positive[0], rule=_positive[1])
    optimizer: str = _key('adamw', "Client optimizer: adamw, or galore-adamw (GaLore: gradients of weight matrices "
                          "projected to galore-rank; usually with peft=full).", ("adamw", "galore-adamw"))
    galore_rank: int = _key(8, "GaLore projection rank.", check=_positive[0], rule=_positive[1])
    galore_update_gap: int = _key(50, "GaLore: optimizer steps between refreshes of the projection.",
                                  check=_positive[0], rule=_positive[1])
    galore_scale: float = _key(0.25, "GaLore: scale of the projected-back update.", check=_positive[0], rule=_positive[1])
    lora_dropout: float = _key(0.0, "Dropout on the LoRA side path.", check=lambda v: 0 <= v < 1, rule="must be in [0, 1)")
    target_modules: str = _key('', "Comma-separated LoRA target patterns (module names, suffixes or globs); "
                               "empty: the model family's defaults.")
    lte_heads: int = _key(4, "LTE: parallel LoRA heads per client, each on its own micro-batch (batch-size must "
                          "divide by it).", check=_positive[0], rule=_positive[1])
    lte_merge_every: int = _key(1, "LTE: optimizer steps between merges of the heads into the backbone.",
                                check=_positive[0], rule=_positive[1])
    lte_merge_mode: str = _key('resetless', "LTE merge rule: resetless (the base takes the mean change of s·B·A, factors "
                               "kept) or reinit (merge the mean s·B·A, then re-initialise the heads, ReLoRA-style).",
                               MERGE_MODES)
    lte_reset_moments: bool = _key(False, "LTE: clear AdamW's moments of the heads' factors at every merge, so the heads "
                                   "restart from zero momentum (with lte-merge-mode=reinit the fresh heads otherwise "
                                   "inherit the old heads' moments).")
    bn_stats: str = _key('aggregate', "BatchNorm running statistics: aggregate them like adapter deltas, or freeze them.",
                         ("aggregate", "frozen"))
    aggregation: str = _key("fedavg", _aggregation_help, lambda: tuple(sorted(AGGREGATORS)))
    client_ranks: str = _key('', "Comma-separated LoRA ranks, one per client by partition id (cycled), e.g. 4,8,8,16; "
                             "empty: every client uses lora-rank. Every client scales by lora-alpha/max(ranks). "
                             "fedavg zero-pads smaller factors to the largest rank (HetLoRA baseline); exact "
                             "aggregates mixed ranks exactly.", check=lambda v: _valid_ints(v, low=1),
                             rule="must be empty or comma-separated positive integers")
    robust_f: int = _key(1, "Byzantine replies per round the robust rules assume (f): trimmed-mean drops f values "
                         "at each side; krum and multi-krum need n >= 2f+3 replies, median, trimmed-mean and "
                         "clipped-mean with clip-norm 0 need n >= 2f+1, direction-clipped-mean (drops up to f) "
                         "n >= 2f+2. min-clients must be at least that n, so that a "
                         "round with fewer usable replies is recorded and not applied.", check=_non_negative[0],
                         rule=_non_negative[1])
    clip_norm: float = _key(0.0, "clipped-mean and direction-clipped-mean: bound on each client's effective update "
                            "norm (s·B·A per LoRA layer, other trained tensors as they are, BatchNorm statistics "
                            "left out); 0: the median of the round's norms (of the replies kept).",
                            check=_non_negative[0], rule=_non_negative[1])
    direction_z: float = _key(0.0, "direction-clipped-mean: drop a reply only if its median cosine is negative and more "
                              "than this many robust standard deviations (1.4826 x MAD of the round's median cosines) "
                              "below their median; 0: every negative one (up to robust-f).",
                              check=_non_negative[0], rule=_non_negative[1])
    direction_memory: float = _key(0.0, "direction-clipped-mean: score a reply by its client's discounted sum of "
                                   "median cosines over the rounds it took part in, score = direction-memory x "
                                   "score + this round's; 0: this round alone, 1: the plain sum (never forgets; "
                                   "a client that turns bad late keeps its credit longer). Catches attackers among "
                                   "many small clients, whose single rounds look honest.",
                                   check=lambda v: 0 <= v <= 1, rule="must be between 0 and 1")
    krum_m: int = _key(0, "multi-krum: how many best-scored replies are averaged; 0: n - robust-f.",
                       check=_non_negative[0], rule=_non_negative[1])
    attack: str = _key("none", _attack_help, lambda: ("none", *sorted(ATTACKS)))
    attack_scale: float = _key(5.0, "k of the update attacks: sign-flip sends -k times the honest delta, scale k "
                               "times, noise Gaussian noise of k times its RMS per tensor.", check=_positive[0],
                               rule=_positive[1])
    attackers: str = _key("", "Comma-separated partition ids that run attack (e.g. 0, or 0,3); ignored under "
                          "attack=none.",
                          check=lambda v: _valid_ints(v, low=0), rule="must be empty or comma-separated partition ids "
                          "(integers >= 0)")
    server_optimizer: str = _key('sgd', "Server step on the aggregated delta: sgd (lr 1 = FedAvg), momentum (FedAvgM), "
                                 "adam (FedAdam), yogi (FedYogi).", ("sgd", "momentum", "adam", "yogi"))
    server_lr: float = _key(1.0, "Server learning rate on the aggregated delta (1.0 with sgd = FedAvg).",
                            check=_positive[0], rule=_positive[1])
    server_beta1: float = _key(0.9, "Server momentum / first-moment decay (momentum, adam, yogi).",
                               check=lambda v: 0 <= v < 1, rule="must be in [0, 1)")
    server_beta2: float = _key(0.99, "Server second-moment decay (adam, yogi).", check=lambda v: 0 <= v < 1,
                               rule="must be in [0, 1)")
    server_tau: float = _key(0.001, "Adaptivity floor added to the root second moment (adam, yogi).",
                             check=_positive[0], rule=_positive[1])
    proximal_mu: float = _key(0.0, "FedProx: weight of (mu/2)·||w - w_global||² in each client's loss; 0 = off.",
                              check=_non_negative[0], rule=_non_negative[1])
    dp_clip: float = _key(0.0, "DP-SGD (task/privacy.py): clip each example's gradient of the trainable adapters to "
                          "this L2 norm, with Poisson-sampled batches and Gaussian noise (dp-noise or dp-epsilon); "
                          "0: off. Needs peft of lora, norm, head and, with BatchNorm, bn-stats=frozen.",
                          check=_non_negative[0], rule=_non_negative[1])
    dp_noise: float = _key(0.0, "DP-SGD noise multiplier sigma: noise std = sigma x dp-clip (0 with dp-clip: clipping "
                           "only, epsilon infinite).", check=_non_negative[0], rule=_non_negative[1])
    dp_epsilon: float = _key(0.0, "DP-SGD target epsilon: each client's sigma is computed (Opacus) so that taking part "
                             "in all num-server-rounds spends at most this at dp-delta; 0: use dp-noise.",
                             check=_non_negative[0], rule=_non_negative[1])
    dp_delta: float = _key(1e-5, "delta of every reported (epsilon, delta); keep it well below 1 / (examples per "
                           "client).", check=lambda v: 0 < v < 1, rule="must be in (0, 1)")
    dp_max_epsilon: float = _key(0.0, "Privacy budget: the run stops cleanly before a round after which any client's "
                                 "epsilon (or client-level DP's) would exceed it, and exports as usual; 0: no cap.",
                                 check=_non_negative[0], rule=_non_negative[1])
    dp_secure_rng: bool = _key(False, "Draw DP noise and Poisson samples from the OS's cryptographically secure "
                               "generator. Off (default), they come from `seed`, which every node knows: "
                               "reproducible, but no protection against a party that knows the seed.")
    client_dp_clip: float = _key(0.0, "Client-level DP on the server (fedavg/ffa): clip each client's whole update to "
                                 "this L2 norm, average with equal weights, add Gaussian noise; 0: off.",
                                 check=_non_negative[0], rule=_non_negative[1])
    client_dp_noise: float = _key(0.0, "Client-level DP noise multiplier z: noise std on the sum of clipped updates = "
                                  "z x client-dp-clip.", check=_non_negative[0], rule=_non_negative[1])
    local_params: str = _key('', "Comma-separated adapter-name patterns kept on each client and never sent "
                             "(personalisation: e.g. norm weights for FedBN-style, head for FedPer-style).")
    fraction_train: float = _key(1.0, "Fraction of connected clients sampled each round.",
                                 check=_fraction[0], rule=_fraction[1])
    client_eval_every: int = _key(1, "Rounds between the clients' evaluations of the global model on their local "
                                  "validation splits (client_val_accuracy), "
                                  "and always the last round. Each is a second message to every node: in a "
                                  "deployment it costs about as much as a small model's training (README: speed). "
                                  "The server's own val/test evaluation, which selects the round, and under "
                                  "exact/LTE the replica check (also on the train replies) run every round.",
                                  check=_positive[0], rule=_positive[1])
    min_clients: int = _key(2, "Minimum connected clients before a round starts (deployment), and minimum usable "
                               "train replies for a round to change the global model (fewer: the round is "
                               "recorded, the model unchanged).",
                            check=_positive[0], rule=_positive[1])
    round_timeout: int = _key(600, "Seconds the server waits for replies in a round; late clients are dropped.",
                              check=_positive[0], rule=_positive[1])
    device: str = _key('auto', "Client device: auto (CUDA when present), cpu, cuda or cuda:N (cpu:N: the CPU, as "
                       "worker N of the in-process backend).",
                       check=lambda v: v in ("auto", "cpu", "cuda") or v.startswith(("cuda:", "cpu:")),
                       rule="must be auto, cpu, cuda, cuda:N or cpu:N")
    seed: int = _key(0, "Seed for partitioning, model init, client sampling, shuffling and augmentation.")
    select_metric: str = _key("val_auc", "Official validation-split metric that selects the reported round (the "
                              "server evaluates val and test every round; summary.json gives the last and the "
                              "selected round's test metrics).", ("val_auc", "val_accuracy", "val_loss"))
    out: str = _key('runs', "Directory under which the run directory is created (use an absolute path with flwr run).")
    resume: str = _key("", "Run directory of an interrupted run to continue after its last completed round "
                       "(fedmeld run --resume DIR sets it; in a deployment, an absolute path). Its checkpoint's "
                       "config must match this one.")
    run_name: str = _key('', "Name of the run directory under `out`; empty: <date>-<time>-<dataset>-<peft>. "
                         "An existing non-empty directory is refused, never overwritten.")

    @classmethod
    def from_mapping(cls, overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """The defaults updated with ``overrides`` (Flower's '-' keys), checked."""
        values = defaults()
        for key, value in (overrides or {}).items():
            if key not in values:
                raise ConfigError(f"unknown run-config key {key!r}; valid keys: {', '.join(values)}")
            values[key] = _coerce(key, value, values[key])
        return cls(**{k.replace("-", "_"): v for k, v in values.items()})

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, key = getattr(self, f.name), f.name.replace("_", "-")
            choices, check = _meta(f, "choices"), f.metadata["check"]
            if choices and value not in choices:
                raise ConfigError(f"bad value {value!r} for {key!r}; valid values: {', '.join(map(str, choices))}")
            if check and not check(value):
                raise ConfigError(f"bad value {value!r} for {key!r}: {f.metadata['rule']}")
        if problem := _peft_problem(self.peft):
            raise ConfigError(f"bad value {self.peft!r} for 'peft': {problem}")
        self._check_combinations()

    @property
    def aggregator(self) -> Aggregator:
        """The run's rule, with its robust settings bound."""
        return AGGREGATORS[self.aggregation].configured(self.rule_settings)

    @property
    def rule_settings(self) -> RuleSettings:
        """What the robust rules assume and need (robust-f, clip-norm, krum-m, LoRA's scale, direction-z and
        -memory)."""
        return RuleSettings(self.robust_f, self.clip_norm, self.krum_m, self.lora_alpha / self.lora_rank,
                            self.direction_z, self.direction_memory)

    @property
    def protocol(self) -> str:
        """What travels and how the server combines it: ``delta`` (adapter deltas, averaged) or
        ``backbone-merge`` (low-rank updates merged into a backbone every node replicates: an
        adapter that updates the backbone, such as LTE, or a rule such as exact)."""
        if any(ADAPTERS[p].updates_backbone for p in self.peft.split("+")):
            return "backbone-merge"
        return self.aggregator.protocol

    def _check_combinations(self) -> None:
        """Keys that are valid alone but not together; each message says what to change."""
        parts, rule = set(self.peft.split("+")), self.aggregator
        if self.init == "torch" and (self.pretrained or self.weights):
            raise ConfigError("init=torch re-initialises the backbone, which would discard the pretrained weights: "
                              "set init=timm, or pretrained=false and weights=\"\"")
        if rule.needs_lora and "lora" not in parts:
            raise ConfigError(f"aggregation={self.aggregation} needs LoRA: set peft to lora, lora+norm, ... "
                              f"(got peft={self.peft!r})")
        if self.client_ranks and ("lora" not in parts or not rule.mixed_ranks):
            mixed = ", ".join(a.name for a in AGGREGATORS.values() if a.mixed_ranks)
            raise ConfigError(f"client-ranks needs peft with lora and an aggregation that takes mixed ranks ({mixed}); "
                              f"got peft={self.peft!r}, aggregation={self.aggregation!r}")
        if self.lr_schedule == "multistep" and not self.lr_milestones:
            raise ConfigError("lr-schedule=multistep needs lr-milestones, e.g. lr-milestones=\"50,75\"")
        if self.lr_warmup >= self.num_server_rounds:
            raise ConfigError(f"lr-warmup {self.lr_warmup} must be fewer than num-server-rounds "
                              f"{self.num_server_rounds}")
        if "lte" in parts and self.batch_size % self.lte_heads:
            raise ConfigError(f"batch-size {self.batch_size} must be divisible by lte-heads {self.lte_heads}: "
                              f"each head trains on an equal micro-batch")
        self._check_robustness()
        self._check_privacy(parts)
        if self.init_adapter and (not parts & {"lora", "dora"} or self.protocol != "delta" or self.client_ranks):
            raise ConfigError(f"init-adapter starts the global LoRA/DoRA adapter of the delta protocol: it needs peft "
                              f"with lora or dora, a delta aggregation (not exact, not lte) and no client-ranks; got "
                              f"peft={self.peft!r}, aggregation={self.aggregation!r}, client-ranks={self.client_ranks!r}")
        if self.protocol == "backbone-merge":
            unsupported = {"proximal-mu": self.proximal_mu != 0, "local-params": bool(self.local_params),
                           "lora-dropout": self.lora_dropout != 0, "optimizer": self.optimizer != "adamw",
                           f"server-optimizer={self.server_optimizer}": self.server_optimizer not in ("sgd", "momentum")}
            bad = [k for k, on in unsupported.items() if on]
            if bad:
                raise ConfigError(f"peft={self.peft} with aggregation={self.aggregation} merges the mean low-rank "
                                  f"update into a backbone every node replicates (server-optimizer sgd or momentum); "
                                  f"it does not support {', '.join(bad)}: reset them to their defaults or use a "
                                  f"delta rule such as fedavg with a plain adapter")

    def _check_privacy(self, parts: set[str]) -> None:
        """DP keys that only mean something together, and what DP-SGD and client-level DP support."""
        if (self.dp_noise or self.dp_epsilon) and not self.dp_clip:
            raise ConfigError("dp-noise and dp-epsilon need dp-clip > 0 (the per-example clipping norm), e.g. dp-clip=1.0")
        if self.dp_noise and self.dp_epsilon:
            raise ConfigError(f"set one of dp-noise (sigma) and dp-epsilon (a target sigma is computed for), not both "
                              f"(got dp-noise={self.dp_noise}, dp-epsilon={self.dp_epsilon})")
        if self.client_dp_noise and not self.client_dp_clip:
            raise ConfigError("client-dp-noise needs client-dp-clip > 0 (the clipping norm of each client's update)")
        if (self.dp_max_epsilon or self.dp_secure_rng) and not (self.dp_clip or self.client_dp_clip):
            raise ConfigError("dp-max-epsilon and dp-secure-rng need DP on: dp-clip > 0 (DP-SGD at each client) or "
                              "client-dp-clip > 0 (client-level DP on the server)")
        if self.dp_clip:
            unsupported = sorted(parts - {"lora", "norm", "head"})
            if unsupported or self.protocol != "delta":
                raise ConfigError(f"dp-clip (DP-SGD) trains lora, norm and the head with the delta protocol; got "
                                  f"peft={self.peft!r}, aggregation={self.aggregation!r}: use e.g. peft=lora+norm with "
                                  f"aggregation=fedavg or ffa, or dp-clip=0")
            if self.compile != "off":
                raise ConfigError(f"dp-clip (DP-SGD) trains eagerly (per-example gradients by torch.func); got "
                                  f"compile={self.compile!r}: set compile=off")
        if self.client_dp_clip and (self.aggregation not in ("fedavg", "ffa") or self.client_ranks
                                    or self.protocol != "delta"):
            raise ConfigError(f"client-dp-clip replaces the weighted mean of fedavg/ffa by a clipped, noised mean of "
                              f"equal weights; got aggregation={self.aggregation!r}, client-ranks="
                              f"{self.client_ranks!r}, peft={self.peft!r}: use aggregation=fedavg or ffa without "
                              f"client-ranks, or client-dp-clip=0")

    def _check_robustness(self) -> None:
        """A robust rule's assumption must fit a round's replies; a drill needs an attack and attackers."""
        rule = self.aggregator
        need = rule.min_replies(self.rule_settings) if rule.min_replies else 0
        sampled = max(int(self.num_clients * self.fraction_train), 1)
        if min(sampled, self.min_clients, self.num_clients) < need:
            raise ConfigError(f"aggregation={self.aggregation} with robust-f={self.robust_f}"
                              f"{f', krum-m={self.krum_m}' if self.aggregation == 'multi-krum' else ''} needs at least "
                              f"{need} replies per round: set min-clients >= {need} (a round with fewer usable replies "
                              f"is then recorded, not applied) and num-clients x fraction-train >= {need}, or lower "
                              f"robust-f (got num-clients={self.num_clients}, fraction-train={self.fraction_train}, "
                              f"min-clients={self.min_clients})")
        if self.direction_memory and (self.aggregation != "direction-clipped-mean" or self.protocol != "delta"):
            raise ConfigError(f"direction-memory keeps per-client scores of direction-clipped-mean under the delta "
                              f"protocol; got aggregation={self.aggregation!r}, peft={self.peft!r}: set "
                              f"aggregation=direction-clipped-mean with a delta adapter, or direction-memory=0")
        attackers = parse_attackers(self.attackers)
        if self.attack != "none" and not attackers:
            raise ConfigError(f"attack={self.attack} needs attackers, the partition ids that run it (e.g. attackers=0)")
        if attackers and (attackers[-1] >= self.num_clients or len(attackers) >= self.num_clients):
            raise ConfigError(f"attackers must be partition ids below num-clients={self.num_clients}, leaving at least "
                              f"one honest client (got attackers={self.attackers!r})")
        if self.attack != "none" and ATTACKS[self.attack].kind == "update" and self.protocol != "delta":
            raise ConfigError(f"attack={self.attack} replaces the delta a client sends; peft={self.peft} with "
                              f"aggregation={self.aggregation} sends factors to merge: use a data attack (label-flip) "
                              f"or a delta rule")

    def attack_of(self, partition_id: int) -> Attack | None:
        """The attack partition ``partition_id`` runs, or None for an honest client (every client under
        attack=none, whatever attackers lists: a drill's clean run keeps its federation's keys)."""
        if self.attack == "none" or partition_id not in parse_attackers(self.attackers):
            return None
        return ATTACKS[self.attack]

    @property
    def model_size(self) -> int:
        """The resolution the model sees."""
        return self.input_size or self.image_size

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


def defaults() -> dict[str, Any]:
    """Every key with its default, '-'-spelled as in Flower's run_config."""
    return {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}


def describe() -> str:
    """One line per key: name, default, allowed values and help, for --help."""
    lines = []
    for f in dataclasses.fields(RunConfig):
        choices = _meta(f, "choices")
        listed = f" {{{'|'.join(map(str, choices))}}}" if choices else ""
        lines.append(f"  {f.name.replace('_', '-')} = {f.default!r}{listed}\n      {_meta(f, 'help')}")
    return "\n".join(lines)


load_plugins()


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Accept what TOML and command lines give (ints for floats, 'true' for bools, an integer for a text
    key such as attackers=0 or client-ranks=8, which TOML reads as a number); refuse the rest."""
    kind = type(default)
    if kind is str and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
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
