"""Selection policies and their registry.

Every selector module registers itself on import, so the names are available as soon as this
package is.
"""

from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.gradnorm import GradNormSelector
from lightning_sbp.selectors.loss import LossSelector
from lightning_sbp.selectors.omp import OMPSelector
from lightning_sbp.selectors.random import RandomSelector
from lightning_sbp.selectors.registry import available_selectors, get_selector, register_selector
from lightning_sbp.selectors.topk import TopKSelector

__all__ = [
    "GradNormSelector",
    "LossSelector",
    "OMPSelector",
    "RandomSelector",
    "Scores",
    "Selection",
    "Selector",
    "TopKSelector",
    "available_selectors",
    "get_selector",
    "register_selector",
]
