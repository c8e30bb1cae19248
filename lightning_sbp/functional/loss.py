"""The default per-example loss of the scoring pass."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["per_example_cross_entropy"]


def per_example_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy of each example, in float32.

    Args:
        logits: ``[N, C]``.
        targets: ``[N]`` class indices.

    Returns:
        The losses, shape ``[N]``.
    """
    return F.cross_entropy(logits.float(), targets, reduction="none")
