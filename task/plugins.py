"""Adapters and aggregation rules that live outside fedmeld: modules named in ``$FEDMELD_PLUGINS``.

A built-in adapter is a module in ``peft/`` and a built-in rule a module in ``task/aggregators/``;
both packages import every module they hold. A site's own adapter or rule can stay in its own
module: ``FEDMELD_PLUGINS=my_rules,my_adapters`` (comma-separated importable names) imports them
before the run config is read, so their ``@register_adapter``/``@register_aggregator`` names are
valid ``peft``/``aggregation`` values and appear in ``--help``. Every process of a federation
(server, SuperNodes' ClientApps) needs the same plugins, so set the variable for all of them.
"""

from __future__ import annotations

import importlib
import os

ENV = "FEDMELD_PLUGINS"


def load_plugins() -> list[str]:
    """Import every module named in ``$FEDMELD_PLUGINS`` (once: imports are cached); return their names."""
    names = [n.strip() for n in os.environ.get(ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ImportError(f"{ENV} names {name!r}, which cannot be imported ({err}); put the module on "
                              f"PYTHONPATH or remove it from {ENV}") from err
    return names
