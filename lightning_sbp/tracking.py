"""Tracking how well each selected subset's gradient matches the full batch's, during training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sbp.metrics import (
    ExactGradientError,
    GradientApproximationError,
    GradientErrorRatio,
    RandomSubsetGradientError,
)
from lightning_sbp.scoring import frozen_running_stats
from lightning_sbp.selectors import Scores, Selection

__all__ = ["GradientErrorTracker", "subset_and_full_gradients"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[Any], tuple[Tensor, Tensor]]


def subset_and_full_gradients(
    model: torch.nn.Module, forward: Forward, loss_fn: LossFn, batch: Any, subset: Any, weights: Tensor
) -> tuple[list[Tensor], list[Tensor]]:
    """Gradients of the weighted subset loss and of the full-batch loss over all trainable parameters.

    Computed with ``torch.autograd.grad``: ``.grad``, optimiser state and running statistics
    stay as they were. Parameters the loss does not reach get zero gradients.
    """
    params = [param for param in model.parameters() if param.requires_grad]

    def gradients(loss: Tensor) -> list[Tensor]:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    with torch.enable_grad(), frozen_running_stats(model):
        logits, targets = forward(batch)
        reference = gradients(loss_fn(logits, targets).mean())
        logits, targets = forward(subset)
        approximation = gradients((weights * loss_fn(logits, targets)).mean())
    return approximation, reference


class GradientErrorTracker(torch.nn.Module):
    """The gradient-error metrics of one fit, updated on every selective step and logged per epoch.

    A module, so that the metrics move to the training device together.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grad_error = GradientApproximationError()
        self.grad_error_random = RandomSubsetGradientError()
        self.grad_error_ratio = GradientErrorRatio()
        self.grad_error_exact = ExactGradientError()

    def measure(
        self,
        pl_module: pl.LightningModule,
        scores: Scores,
        selection: Selection,
        exact: Callable[[], tuple[list[Tensor], list[Tensor]]] | None = None,
    ) -> dict[str, Tensor]:
        """Update the metrics with one batch and log their epoch values.

        Args:
            pl_module: the module that logs.
            scores: the full batch's scores with its last layer, as the trainer would compute them.
            selection: the subset trained on.
            exact: when given, computes the subset and full-batch gradients over all parameters.

        Returns:
            This batch's values under ``sbp/<name>_step``, to log with the step's other values.
        """
        values: dict[str, Tensor] = {}
        k = int(selection.indices.shape[0])
        # k = N happens only under DDP, on a rank whose batch is too small to select from: a whole batch matches
        # itself, and its 0/0 ratio would poison the epoch mean.
        if k < scores.size:
            error = self.grad_error(scores.gram, selection.indices, selection.weights)
            random_error = self.grad_error_random(scores.gram, k)
            values["grad_error"] = error
            values["grad_error_random"] = random_error
            values["grad_error_ratio"] = self.grad_error_ratio(error, random_error)
        if exact is not None:
            values["grad_error_exact"] = self.grad_error_exact(*exact())
        for name in values:
            # Epoch values are each metric's mean over the epoch, synced across ranks at its end.
            metric = getattr(self, name)
            pl_module.log(f"sbp/{name}_epoch", metric, on_step=False, on_epoch=True, metric_attribute=f"sbp_{name}")
        return {f"sbp/{name}_step": value for name, value in values.items()}
