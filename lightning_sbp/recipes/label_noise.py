"""Symmetric label noise: a fixed fraction of training labels flipped to another class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NoisyLabels", "check_noise_fraction", "flip_labels"]


@dataclass(frozen=True)
class NoisyLabels:
    """Labels after :func:`flip_labels`.

    Attributes:
        targets: the labels to train on, ``long`` tensor of shape ``[n]``.
        clean: the original labels, shape ``[n]``.
        flipped: ``bool`` tensor of shape ``[n]``, true where ``targets`` differs from ``clean``.
    """

    targets: Tensor
    clean: Tensor
    flipped: Tensor

    @property
    def num_flipped(self) -> int:
        """How many labels were changed."""
        return int(self.flipped.sum())


def check_noise_fraction(fraction: float) -> float:
    """Return ``fraction`` if it is a valid noise level in ``[0, 1]``, else raise ``ValueError``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"label_noise must be a fraction in [0, 1], got {fraction}")
    return float(fraction)


def flip_labels(labels: Sequence[int] | Tensor, fraction: float, num_classes: int, seed: int = 0) -> NoisyLabels:
    """Flip exactly ``round(fraction * n)`` labels, each to a class drawn uniformly among the other classes.

    The result depends only on ``labels``, ``fraction``, ``num_classes`` and ``seed``: computing it
    once and reusing it gives the same noisy labels in every epoch and on every process.

    Args:
        labels: the clean labels, integers in ``[0, num_classes)``.
        fraction: share of the labels to flip, in ``[0, 1]``.
        num_classes: the number of classes, at least 2 when anything is flipped.
        seed: seeds which labels flip and to what.

    Returns:
        The noisy labels, the clean labels and the mask of flipped positions.

    Raises:
        ValueError: for a fraction outside ``[0, 1]``, fewer than two classes, or labels out of range.
    """
    check_noise_fraction(fraction)
    clean = torch.as_tensor(labels, dtype=torch.long).flatten().clone()
    n = clean.numel()
    if n and (int(clean.min()) < 0 or int(clean.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found [{int(clean.min())}, {int(clean.max())}]")
    count = round(fraction * n)
    flipped = torch.zeros(n, dtype=torch.bool)
    targets = clean.clone()
    if count == 0:
        return NoisyLabels(targets, clean, flipped)
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got num_classes={num_classes}")
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(n, generator=generator)[:count]
    # An offset in [1, C-1] added modulo C is uniform over the C-1 other classes.
    offsets = torch.randint(1, num_classes, (count,), generator=generator)
    targets[positions] = (clean[positions] + offsets) % num_classes
    flipped[positions] = True
    return NoisyLabels(targets, clean, flipped)
