"""Adapter component registry.

A component is a function ``(model, cfg) -> None`` that injects modules and/or
flips ``requires_grad=True`` on the parameters it owns. ``apply_peft`` freezes
everything first, then calls the components named in ``cfg.method`` in
registration order, so adding a new adapter type is one small module that
decorates its apply function with ``@register_adapter("name")``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from torch import nn

if TYPE_CHECKING:
    from .config import PeftConfig

AdapterFn = Callable[[nn.Module, "PeftConfig"], None]

ADAPTERS: dict[str, AdapterFn] = {}


def register_adapter(name: str) -> Callable[[AdapterFn], AdapterFn]:
    """Register ``fn`` as component ``name`` (usable in ``PeftConfig.method``)."""
    if not name or "+" in name:
        raise ValueError(f"adapter name must be non-empty and contain no '+': {name!r}")

    def decorator(fn: AdapterFn) -> AdapterFn:
        if name in ADAPTERS:
            raise ValueError(f"adapter {name!r} is already registered")
        ADAPTERS[name] = fn
        return fn

    return decorator
