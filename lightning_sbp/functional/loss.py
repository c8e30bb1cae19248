"""The per-example losses the scoring pass chooses from when none is given."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sbp.functional._inputs import DEFAULT_CHUNK_ELEMENTS, row_blocks

__all__ = [
    "IGNORE_INDEX",
    "per_example_binary_cross_entropy",
    "per_example_cross_entropy",
    "per_example_next_token_cross_entropy",
    "per_example_squared_error",
]

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


def per_example_next_token_cross_entropy(
    logits: Tensor, labels: Tensor, *, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> Tensor:
    """A causal language model's loss per example: each position's logits against the next position's label.

    ``labels`` are the token ids at their own positions, as transformers' causal language models take them
    (they shift inside their loss). Here the targets are shifted instead of the logits: position ``t`` is scored
    against ``labels[:, t + 1]`` and the last position against nothing, so the logits keep their ``[N, T, C]``
    shape and place, which a head applied at every position (and its last-layer gradients) needs. Each example's
    loss is the mean over its scored positions, as in :func:`per_example_cross_entropy`.

    Args:
        logits: ``[N, T, C]``.
        labels: ``[N, T]`` token ids, ``-100`` at positions without a label.
        chunk_elements: as in :func:`per_example_cross_entropy`.

    Returns:
        The losses, shape ``[N]``.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return per_example_cross_entropy(logits, targets, chunk_elements=chunk_elements)


def per_example_squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    """The mean squared error of each example over its outputs, in float32: a regression's loss.

    Args:
        outputs: ``[N, ...]``, any shape whose rows hold as many values as the targets' rows (``[N]`` and
            ``[N, 1]`` both hold one).
        targets: ``[N, ...]``, of any floating or integer dtype.

    Returns:
        The losses, shape ``[N]``.
    """
    n = outputs.shape[0]
    residuals = outputs.float().reshape(n, -1) - targets.float().reshape(n, -1)
    return residuals.square().mean(dim=1)


def per_example_binary_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The binary cross-entropy with logits of each example, averaged over its outputs, in float32.

    The loss of a binary classifier with one logit, or of a multi-label classifier with one logit per label.

    Args:
        logits: ``[N, ...]``, any shape whose rows hold as many values as the targets' rows.
        targets: ``[N, ...]``, probabilities of the positive class (0 and 1 for hard labels).

    Returns:
        The losses, shape ``[N]``.
    """
    n = logits.shape[0]
    flat_logits, flat_targets = logits.float().reshape(n, -1), targets.float().reshape(n, -1)
    return F.binary_cross_entropy_with_logits(flat_logits, flat_targets, reduction="none").mean(dim=1)
