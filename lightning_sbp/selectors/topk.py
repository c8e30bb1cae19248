"""Deterministic top-k by loss."""

from __future__ import annotations

import torch

from lightning_sbp.selectors.base import Scores, Selection, Selector, finite_or_lowest
from lightning_sbp.selectors.registry import register_selector

__all__ = ["TopKSelector"]


@register_selector("topk")
class TopKSelector(Selector):
    """The k examples with the largest losses, all weighing one.

    Non-finite losses rank below every finite loss, so they are taken only when fewer than k
    examples have a finite loss.
    """

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Take the ``k`` largest finite losses."""
        return Selection.uniform(torch.topk(finite_or_lowest(scores.losses), k, sorted=False).indices)
