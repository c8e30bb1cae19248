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
from torchmetrics import Metric

from lightning_sbp.functional.grad_error import (
    random_subset_gradient_error,
    relative_gradient_error,
    subset_gradient_error,
)

__all__ = [
    "ExactGradientError",
    "GradientApproximationError",
    "GradientErrorRatio",
    "GradientErrorSquaredRatio",
    "RandomSubsetGradientError",
]


class _BatchMean(Metric):
    """The mean over batches of one value per batch, summed across processes, skipping degenerate batches.

    Its states are its own (``add_state``): ``total``, the sum of the values of the batches counted, and
    ``count``, how many batches were counted, both float64 and summed across processes. A batch whose value
    is not defined (its full-batch gradient vanishes, as when every loss is non-finite and every gradient is
    zeroed) or not finite enters with weight zero: the epoch mean stays the mean of the batches that could be
    measured, and the value of such a batch alone (what ``forward`` returns for step logging) is NaN, not a
    misleading 0. Deciding it takes no host-device synchronisation. The epoch value is NaN only when no batch
    could be measured. Every value is computed with autocast off (see
    :func:`~lightning_sbp.functional.subset_gradient_error`), so a metric updated inside a mixed-precision
    training step measures in its own dtype.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, value: Tensor, defined: Tensor) -> None:
        counted = defined & torch.isfinite(value)
        self.total = self.total + torch.where(counted, value.detach().to(self.total.dtype), 0.0)
        self.count = self.count + counted.to(self.count.dtype)

    def compute(self) -> Tensor:
        """The mean of the counted batches' values; NaN when no batch was counted."""
        return torch.where(self.count > 0, self.total / self.count.clamp(min=1), torch.nan)


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
        self._add(subset_gradient_error(gram, indices, weights), gram.sum() > 0)


class RandomSubsetGradientError(_BatchMean):
    """The same relative error expected from a uniformly random subset of the same size.

    Per batch, the root of the expected squared relative error of a subset of ``k`` examples
    drawn without replacement, in closed form from the Gram matrix (see
    :func:`~lightning_sbp.functional.random_subset_gradient_error`).
    """

    def update(self, gram: Tensor, k: int) -> None:
        """Measure one batch: its Gram matrix ``[N, N]`` and the subset size ``k``."""
        self._add(random_subset_gradient_error(gram, k), gram.sum() > 0)


class GradientErrorRatio(_BatchMean):
    """The mean over batches of a selector's error divided by random selection's.

    Biased low as a yardstick: random's error is the root of an expected square, and the mean of a
    root is below it (Jensen's inequality), so random selection itself averages a little below 1.
    Compare with random's own ratio, or use :class:`GradientErrorSquaredRatio`.
    """

    def update(self, error: Tensor, random_error: Tensor) -> None:
        """Measure one batch from its selector error and its random-subset error."""
        self._add(error.double() / random_error.double(), random_error > 0)


class GradientErrorSquaredRatio(_BatchMean):
    """The mean over batches of a selector's squared error divided by random selection's expected squared error.

    For uniformly random subsets the expectation is exactly 1 on every batch (random's error is the
    root of that expectation, in closed form), so the mean over any number of batches is an unbiased
    estimate of 1 for random selection: below 1, a selector's subsets match the full-batch gradient
    better than random subsets of the same size, in mean square.
    """

    def update(self, error: Tensor, random_error: Tensor) -> None:
        """Measure one batch from its selector error and its random-subset error."""
        self._add(error.double().square() / random_error.double().square(), random_error > 0)


class ExactGradientError(_BatchMean):
    """Relative error of the subset gradient over all trainable parameters, from autograd.

    The ground truth the last-layer proxy stands for, at the price of a full backward.
    """

    def update(self, approximation: list[Tensor], reference: list[Tensor]) -> None:
        """Measure one batch from subset gradients and full-batch gradients, one tensor per parameter."""
        reference_norm = torch.stack([torch.linalg.vector_norm(grad) for grad in reference]).amax()
        self._add(relative_gradient_error(approximation, reference), reference_norm > 0)
