"""Selective Backprop for PyTorch Lightning.

Forward every example of a batch, backpropagate only a selected, possibly weighted, subset.
"""

from lightning_sbp.callback import SelectiveBackprop
from lightning_sbp.mixin import SelectiveBackpropMixin
from lightning_sbp.schedule import Schedule
from lightning_sbp.selectors import Scores, Selection, Selector, available_selectors, get_selector, register_selector

__version__ = "0.1.0"

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
