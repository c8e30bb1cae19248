"""The default per-example loss of the scoring pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sbp.functional._inputs import DEFAULT_CHUNK_ELEMENTS, row_blocks

__all__ = ["IGNORE_INDEX", "per_example_cross_entropy"]

IGNORE_INDEX = -100


def per_example_cross_entropy(
    logits: Tensor, targets: Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> Tensor:
    """Softmax cross-entropy of each example, in float32.

    Token-level outputs (language models, token classifiers) give each example the mean over its
    positions whose target is not ``IGNORE_INDEX`` (-100, as in transformers' labels); an example
    without any such position scores zero.

    Half-precision logits are converted to float32 a block of examples at a time, so that the float32
    copy and the log-softmax the loss needs never hold more than ``chunk_elements`` elements beyond
    the logits themselves (a language model's ``[N, T, V]`` head is the case that matters).

    Args:
        logits: ``[N, C]``, or ``[N, T, C]`` (any number of positions between batch and classes).
        targets: ``[N]`` class indices, or ``[N, T]`` matching the logits' positions.
        chunk_elements: the most logits converted and normalised at once.

    Returns:
        The losses, shape ``[N]``.
    """
    blocks = row_blocks(logits.shape[0], logits[0].numel() if logits.shape[0] else 1, chunk_elements)
    if len(blocks) <= 1:
        return _cross_entropy(logits, targets)
    return torch.cat([_cross_entropy(logits[block], targets[block]) for block in blocks])


def _cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.dim() == 2:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    per_position = F.cross_entropy(logits.float().movedim(-1, 1), targets, reduction="none", ignore_index=IGNORE_INDEX)
    counted = (targets != IGNORE_INDEX).flatten(1).sum(dim=1)
    return per_position.flatten(1).sum(dim=1) / counted.clamp_min(1)
