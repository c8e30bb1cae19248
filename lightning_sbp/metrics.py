"""How well a subset's gradient approximates the full batch's, as torchmetrics.

Each metric is a thin class over a pure function of :mod:`lightning_sbp.functional`: ``update``
measures one batch, ``compute`` returns the mean over the batches seen, reduced across
processes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_sbp.functional.grad_error import random_subset_gradient_error, subset_gradient_error

__all__ = [
    "ExactGradientError",
    "GradientApproximationError",
    "GradientErrorRatio",
    "RandomSubsetGradientError",
    "relative_gradient_error",
]


def relative_gradient_error(approximation: list[Tensor], reference: list[Tensor]) -> Tensor:
    """``‖approximation − reference‖ / ‖reference‖`` over parameter tensors taken as one vector.

    Args:
        approximation: gradients of the weighted subset loss, one tensor per parameter.
        reference: gradients of the full-batch loss, in the same order and shapes.

    Returns:
        A 0-dim float64 tensor: 0 when both vanish, inf when only the reference does.
    """
    if len(approximation) != len(reference):
        raise ValueError(f"got {len(approximation)} approximate and {len(reference)} reference gradients")
    difference = torch.zeros((), dtype=torch.float64, device=reference[0].device)
    norm = torch.zeros_like(difference)
    for approx, ref in zip(approximation, reference, strict=True):
        difference += (approx.double() - ref.double()).square().sum()
        norm += ref.double().square().sum()
    ratio = difference.sqrt() / norm.sqrt()
    return torch.where(difference == 0, torch.zeros_like(ratio), ratio)


class _BatchMean(Metric):
    """The mean over batches of one value per batch, summed across processes."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    total: Tensor
    batches: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("batches", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, value: Tensor) -> None:
        self.total += value.detach().to(self.total.dtype)
        self.batches += 1

    def compute(self) -> Tensor:
        """The mean of the per-batch values seen since the last reset."""
        return self.total / self.batches


class GradientApproximationError(_BatchMean):
    """Relative error of a weighted subset's mean gradient against the full batch's mean gradient.

    Per batch, ``‖(1/k) Σ_S w_i g_i − ḡ‖ / ‖ḡ‖`` from the Gram matrix ``K_ij = g_i · g_j`` of the
    per-example gradients (see :func:`~lightning_sbp.functional.subset_gradient_error`); the
    metric is its mean over batches. Lower is better; random selection's value is the yardstick.

    Example:
        >>> gram = torch.eye(4, dtype=torch.float64)
        >>> metric = GradientApproximationError()
        >>> metric(gram, torch.tensor([0, 1]), torch.ones(2)).item()
        1.0
    """

    def update(self, gram: Tensor, indices: Tensor, weights: Tensor) -> None:
        """Measure one batch: its Gram matrix ``[N, N]``, the kept indices ``[k]`` and their weights ``[k]``."""
        self._add(subset_gradient_error(gram, indices, weights))


class RandomSubsetGradientError(_BatchMean):
    """The same relative error expected from a uniformly random subset of the same size.

    Per batch, the root of the expected squared relative error of a subset of ``k`` examples
    drawn without replacement, in closed form from the Gram matrix (see
    :func:`~lightning_sbp.functional.random_subset_gradient_error`).
    """

    def update(self, gram: Tensor, k: int) -> None:
        """Measure one batch: its Gram matrix ``[N, N]`` and the subset size ``k``."""
        self._add(random_subset_gradient_error(gram, k))


class GradientErrorRatio(_BatchMean):
    """The mean over batches of a selector's error divided by random selection's.

    Below 1, the selector's subsets approximate the full-batch gradient better than random
    subsets of the same size.
    """

    def update(self, error: Tensor, random_error: Tensor) -> None:
        """Measure one batch from its selector error and its random-subset error."""
        self._add(error.double() / random_error.double())


class ExactGradientError(_BatchMean):
    """Relative error of the subset gradient over all trainable parameters, from autograd.

    The ground truth the last-layer proxy stands for, at the price of a full backward.
    """

    def update(self, approximation: list[Tensor], reference: list[Tensor]) -> None:
        """Measure one batch from subset gradients and full-batch gradients, one tensor per parameter."""
        self._add(relative_gradient_error(approximation, reference))
