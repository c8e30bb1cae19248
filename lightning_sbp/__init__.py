"""Selective Backprop for PyTorch Lightning.

Forward every example of a batch, backpropagate only a selected, possibly weighted, subset.

The public names load their modules (and with them torch and Lightning) when first read, so that
``import lightning_sbp`` alone, as the ``lightning-sbp`` command does before it knows its
subcommand, costs nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_sbp.callback import SelectiveBackprop
    from lightning_sbp.mixin import SelectiveBackpropMixin
    from lightning_sbp.schedule import Schedule
    from lightning_sbp.selectors import (
        Scores,
        Selection,
        Selector,
        available_selectors,
        get_selector,
        register_selector,
    )

__version__ = "0.1.0"

_HOMES = {
    "SelectiveBackprop": "lightning_sbp.callback",
    "SelectiveBackpropMixin": "lightning_sbp.mixin",
    "Schedule": "lightning_sbp.schedule",
    **dict.fromkeys(
        ("Scores", "Selection", "Selector", "available_selectors", "get_selector", "register_selector"),
        "lightning_sbp.selectors",
    ),
}
"""Each public name and the module that defines it."""

__all__ = [
    "Schedule",
    "Scores",
    "Selection",
    "SelectiveBackprop",
    "SelectiveBackpropMixin",
    "Selector",
    "__version__",
    "available_selectors",
    "get_selector",
    "register_selector",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module, or a subpackage (``lightning_sbp.recipes``), on first access."""
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(home), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names, with the submodules imported so far."""
    modules = {name for name, value in globals().items() if isinstance(value, types.ModuleType)}
    return sorted({*__all__, *(modules - {"importlib", "types"})})
