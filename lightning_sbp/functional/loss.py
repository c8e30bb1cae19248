"""The default per-example loss of the scoring pass."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "per_example_cross_entropy"]

IGNORE_INDEX = -100


def per_example_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy of each example, in float32.

    Token-level outputs (language models, token classifiers) give each example the mean over its
    positions whose target is not ``IGNORE_INDEX`` (-100, as in transformers' labels); an example
    without any such position scores zero.

    Args:
        logits: ``[N, C]``, or ``[N, T, C]`` (any number of positions between batch and classes).
        targets: ``[N]`` class indices, or ``[N, T]`` matching the logits' positions.

    Returns:
        The losses, shape ``[N]``.
    """
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    per_position = F.cross_entropy(logits.float().movedim(-1, 1), targets, reduction="none", ignore_index=IGNORE_INDEX)
    counted = (targets != IGNORE_INDEX).flatten(1).sum(dim=1)
    return per_position.flatten(1).sum(dim=1) / counted.clamp_min(1)
