"""How well a subset's gradient approximates the full batch's, as torchmetrics.

Each metric is a thin class over a pure function of :mod:`lightning_sbp.functional`: ``update``
measures one batch, ``compute`` returns the mean over the batches seen, reduced across
processes. Batches on which the error is not defined (the full batch's gradient vanishes) or not
finite are skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_sbp.functional.grad_error import (
    random_subset_gradient_error,
    relative_gradient_error,
    subset_gradient_error,
)

__all__ = [
    "ExactGradientError",
    "GradientApproximationError",
    "GradientErrorRatio",
    "RandomSubsetGradientError",
]


class _BatchMean(MeanMetric):
    """The mean over batches of one value per batch, summed across processes, skipping degenerate batches.

    A batch whose value is not defined (its full-batch gradient vanishes, as when every loss is
    non-finite and every gradient is zeroed) or not finite enters with weight zero: the epoch mean
    stays the mean of the batches that could be measured, and the value of such a batch alone
    (what ``forward`` returns for step logging) is NaN, not a misleading 0. Deciding it takes no
    host-device synchronisation. The epoch value is NaN only when no batch could be measured.
    """

    is_differentiable = False  # type: ignore[assignment]
    higher_is_better = False  # type: ignore[assignment]

    def __init__(self, **kwargs: Any) -> None:
        # Only MeanMetric.update reads nan_strategy, and _add takes its place; "ignore" is accepted by every
        # torchmetrics release from the floor on.
        super().__init__(nan_strategy="ignore", **kwargs)
        self.set_dtype(torch.float64)
        # MeanMetric's running sum is the state "mean_value" in recent torchmetrics and "value" in 1.0.
        self._sum_state = "mean_value" if hasattr(self, "mean_value") else "value"

    def _add(self, value: Tensor, defined: Tensor) -> None:
        # MeanMetric's own update cannot skip without a sync: its NaN strategies test `nans.any()` on the host,
        # and "disable" resets the weights to one. The states, their reduction and compute are MeanMetric's.
        counted = defined & torch.isfinite(value)
        total = getattr(self, self._sum_state)
        setattr(self, self._sum_state, total + torch.where(counted, value.detach().to(total.dtype), 0.0))
        self.weight += counted.to(self.weight.dtype)


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

    def update(self, gram: Tensor, indices: Tensor, weights: Tensor) -> None:  # type: ignore[override]
        """Measure one batch: its Gram matrix ``[N, N]``, the kept indices ``[k]`` and their weights ``[k]``."""
        self._add(subset_gradient_error(gram, indices, weights), gram.sum() > 0)


class RandomSubsetGradientError(_BatchMean):
    """The same relative error expected from a uniformly random subset of the same size.

    Per batch, the root of the expected squared relative error of a subset of ``k`` examples
    drawn without replacement, in closed form from the Gram matrix (see
    :func:`~lightning_sbp.functional.random_subset_gradient_error`).
    """

    def update(self, gram: Tensor, k: int) -> None:  # type: ignore[override]
        """Measure one batch: its Gram matrix ``[N, N]`` and the subset size ``k``."""
        self._add(random_subset_gradient_error(gram, k), gram.sum() > 0)


class GradientErrorRatio(_BatchMean):
    """The mean over batches of a selector's error divided by random selection's.

    Below 1, the selector's subsets approximate the full-batch gradient better than random
    subsets of the same size.
    """

    def update(self, error: Tensor, random_error: Tensor) -> None:  # type: ignore[override]
        """Measure one batch from its selector error and its random-subset error."""
        self._add(error.double() / random_error.double(), random_error > 0)


class ExactGradientError(_BatchMean):
    """Relative error of the subset gradient over all trainable parameters, from autograd.

    The ground truth the last-layer proxy stands for, at the price of a full backward.
    """

    def update(self, approximation: list[Tensor], reference: list[Tensor]) -> None:  # type: ignore[override]
        """Measure one batch from subset gradients and full-batch gradients, one tensor per parameter."""
        reference_norm = torch.stack([torch.linalg.vector_norm(grad) for grad in reference]).amax()
        self._add(relative_gradient_error(approximation, reference), reference_norm > 0)
