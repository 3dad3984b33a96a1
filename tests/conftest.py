"""Shared fixtures: the real MedMNIST files in ../shared, and small run configs on them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OFFICIAL = Path(os.environ.get("MEDMNIST_ROOT", REPO.parent / "shared" / "data" / "medmnist"))
SUBSETS = REPO.parent / "shared" / "data" / "medmnist-subsets"


@pytest.fixture(scope="session")
def medmnist_root() -> Path:
    """The official BreastMNIST/RetinaMNIST files; tests never download."""
    if not (OFFICIAL / "breastmnist.npz").is_file():
        pytest.fail(f"real MedMNIST files not found in {OFFICIAL}; set MEDMNIST_ROOT to ../shared/data/medmnist")
    return OFFICIAL


@pytest.fixture(scope="session")
def subsets_root() -> Path:
    """The real but subsampled PneumoniaMNIST file (see ../shared/data/medmnist-subsets/SOURCES.md)."""
    if not (SUBSETS / "pneumoniamnist.npz").is_file():
        pytest.fail(f"real PneumoniaMNIST subset not found in {SUBSETS}")
    return SUBSETS


@pytest.fixture(scope="session")
def repo() -> Path:
    """The checkout's root (README.md, pyproject.toml)."""
    return REPO


@pytest.fixture
def tiny_config(medmnist_root: Path, tmp_path: Path) -> dict:
    """Run-config overrides for a small, fast federation on real BreastMNIST."""
    return {"data-root": str(medmnist_root), "model": "resnet10t", "num-clients": 2, "num-server-rounds": 2,
            "local-epochs": 1, "batch-size": 64, "out": str(tmp_path / "runs"), "run-name": "test"}


@pytest.fixture
def task_identity(monkeypatch):
    """Messages take their run and sender from the runtime's TaskIdentity; stand in for it (for tests that
    build Flower Messages outside a runtime: ``pytestmark = pytest.mark.usefixtures("task_identity")``)."""
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, attr, value)


# --- small models, layers and states that tests in several modules build -----------------------

TINY_TIMM = {  # family -> (timm model, kwargs): random-init and small enough for a CPU
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "resnet": ("resnet10t", {}),
    "convnext": ("convnext_atto", {}),
    "convnext-linear": ("convnext_atto", dict(conv_mlp=False)),  # nn.Linear MLPs, as convnext_tiny
    "effnet": ("efficientnet_b0", {}),
}


@pytest.fixture(scope="session")
def tiny_timm():
    """A factory: ``tiny_timm(family, seed=0)`` is a random-init 3-class timm model (a ``TINY_TIMM``
    family), seeded, in train mode."""
    import timm
    import torch

    def build(family: str, seed: int = 0):
        name, kwargs = TINY_TIMM[family]
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, num_classes=3, **kwargs)

    return build


@pytest.fixture(scope="session")
def tiny_timm_eval(tiny_timm):
    """A factory like ``tiny_timm``, but the model is in eval mode and its norms are perturbed: timm
    zero-inits the last BatchNorm gamma of each ResNet block, which would hide everything an adapter
    does inside the block."""
    import torch

    from fedmeld.peft.norm import NORM_TYPES

    @torch.no_grad()
    def build(family: str, seed: int = 0):
        model = tiny_timm(family, seed).eval()
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                for p in m.parameters(recurse=False):
                    p.add_(0.2 * torch.randn_like(p))
        return model

    return build


@pytest.fixture(scope="session")
def adapted(tiny_timm):
    """A factory: ``adapted(family, method="lora+norm+head", seed=0, **cfg)`` is ``tiny_timm(family, seed)``
    with ``PeftConfig(method=method, **cfg)`` applied."""
    from fedmeld.peft import PeftConfig, apply_peft

    def make(family: str, method: str = "lora+norm+head", seed: int = 0, **cfg):
        return apply_peft(tiny_timm(family, seed), PeftConfig(method=method, **cfg))

    return make


@pytest.fixture(scope="session")
def images():
    """A factory: ``images(n=2)`` is the same batch of n random 3x32x32 images every time."""
    import torch

    def make(n: int = 2):
        return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    return make


@pytest.fixture(scope="session")
def lora_names():
    """``lora_names(model)``: the names of the model's LoRALinear/LoRAConv2d layers."""
    from fedmeld.peft import LoRAConv2d, LoRALinear

    return lambda model: {n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAConv2d))}


@pytest.fixture(scope="session")
def perturb_adapters():
    """``perturb_adapters(model)`` makes every adapter non-trivial: random LoRA B and norm affine params."""
    import torch

    from fedmeld.peft.norm import NORM_TYPES

    @torch.no_grad()
    def perturb(model) -> None:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                for p in m.parameters(recurse=False):
                    p.add_(0.05 * torch.randn_like(p))

    return perturb


@pytest.fixture(scope="session")
def randomize_trainables():
    """``randomize_trainables(model, std=0.1)`` adds ``std`` Gaussian noise to every parameter that trains."""
    import torch

    @torch.no_grad()
    def randomize(model, std: float = 0.1) -> None:
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn_like(p))

    return randomize


@pytest.fixture(scope="session")
def adapted_layer():
    """A factory: ``adapted_layer(cls)`` -> ``(base, reference, layer, x)`` for a foldable layer type
    (LoRA/DoRA/VeRA, Linear or Conv2d): ``layer`` adapts ``base``, a Linear(16, 8) or a strided, padded
    3x3 Conv2d(6, 10) (rank 4, alpha 8; VeRA: shared matrices of rank 4, seed 0), ``reference`` is a
    plain copy of the base taken first, ``x`` an input for it. Seeded."""
    import copy

    import torch
    from torch import nn

    from fedmeld.peft.lora import LoRALayer
    from fedmeld.peft.vera import VeRALayer, shared_matrices

    def make(cls):
        torch.manual_seed(0)
        if issubclass(cls, nn.Linear):
            base, x = nn.Linear(16, 8), torch.randn(4, 16)
        else:
            base, x = nn.Conv2d(6, 10, 3, stride=2, padding=1), torch.randn(2, 6, 9, 9)
        reference = copy.deepcopy(base)
        if issubclass(cls, LoRALayer):
            layer = cls.from_module(base, rank=4, alpha=8.0)
        elif issubclass(cls, VeRALayer):
            vera_A, vera_B = shared_matrices(*base.weight.flatten(1).shape, rank=4, seed=0)
            layer = cls.adapt(base, vera_A=vera_A, vera_B=vera_B)
        else:
            layer = cls.adapt(base, rank=4, alpha=8.0)
        return base, reference, layer, x

    return make


@pytest.fixture(scope="session")
def toy_state():
    """``toy_state(seed)``: a small random adapter state (or delta) as the server sees one:
    ``layer.lora_A`` (4, 6), ``layer.lora_B`` (5, 4), ``norm.weight`` (5,)."""
    import torch

    def make(seed: int):
        g = torch.Generator().manual_seed(seed)
        return {"layer.lora_A": torch.randn(4, 6, generator=g), "layer.lora_B": torch.randn(5, 4, generator=g),
                "norm.weight": torch.randn(5, generator=g)}

    return make


@pytest.fixture(scope="session")
def client_factors():
    """``client_factors(ranks, out=6, inp=5, seed=0)``: one client's LoRA factors per rank in ``ranks``,
    ``{"l/B": (out, r), "l/A": (r, inp)}``, random."""
    import torch

    def make(ranks: tuple[int, ...], out: int = 6, inp: int = 5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        return [{"l/B": torch.randn(out, r, generator=g), "l/A": torch.randn(r, inp, generator=g)} for r in ranks]

    return make
