"""The adapter registry: the one list of adapter types.

An adapter is a function ``(model, cfg) -> None`` that injects modules and/or flips
``requires_grad=True`` on the parameters it owns, registered with ``@register_adapter("name", ...)``
in a module of this package (every module here is imported by ``fedmeld.peft``). ``apply_peft``
freezes everything first, then applies the adapters named in ``cfg.method``: those that wrap
weights first, then the others in name order. What the run config accepts for ``peft`` (and its
``--help``) is derived from this registry and the flags declared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from .config import PeftConfig

AdapterFn = Callable[[nn.Module, "PeftConfig"], None]


@dataclass(frozen=True)
class Adapter:
    """A registered adapter type and what the rest of fedmeld must know about it."""

    name: str
    apply: AdapterFn
    help: str  # one line for --help
    wraps_weights: bool = False  # wraps the target layers: at most one such adapter per model
    alone: bool = False  # must be the only component; the classifier is not added to it
    updates_backbone: bool = False  # trains the backbone itself through low-rank updates merged into it


ADAPTERS: dict[str, Adapter] = {}


def register_adapter(name: str, *, help: str, wraps_weights: bool = False, alone: bool = False,
                     updates_backbone: bool = False) -> Callable[[AdapterFn], AdapterFn]:
    """Register ``fn`` as adapter ``name`` (usable in ``PeftConfig.method`` and the run config's ``peft``)."""
    if not name or "+" in name:
        raise ValueError(f"adapter name must be non-empty and contain no '+': {name!r}")

    def decorator(fn: AdapterFn) -> AdapterFn:
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered (by {ADAPTERS[name].apply.__module__})")
        ADAPTERS[name] = Adapter(name, fn, help, wraps_weights, alone, updates_backbone)
        return fn

    return decorator


def application_order(names: set[str]) -> list[Adapter]:
    """The adapters ``names`` in the order ``apply_peft`` applies them: wrappers first, as they
    replace modules whose parameters the others then mark trainable."""
    return sorted((ADAPTERS[n] for n in names), key=lambda a: (not a.wraps_weights, a.name))
