"""Uniform random selection: the baseline every other selector must beat."""

from __future__ import annotations

import torch

from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.registry import register_selector

__all__ = ["RandomSelector"]


@register_selector("random")
class RandomSelector(Selector):
    """k examples drawn uniformly without replacement, all weighing one.

    In expectation its subset gradient is the full-batch gradient; it is what a smaller batch
    would give, which is why arXiv 2312.05021 finds it so hard to beat. It reads no score, so
    with gradient-error tracking off a step runs no scoring pass.
    """

    needs_scores = False

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Draw ``k`` of the ``N`` examples uniformly without replacement."""
        order = torch.randperm(scores.size, generator=generator, device=scores.losses.device)
        return Selection.uniform(order[:k])
