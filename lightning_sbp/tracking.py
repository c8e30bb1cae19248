"""What each step records: its logged values and counts, non-finite losses, and gradient errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sbp.metrics import (
    ExactGradientError,
    GradientApproximationError,
    GradientErrorRatio,
    RandomSubsetGradientError,
)
from lightning_sbp.scoring import frozen_running_stats, untouched_rng
from lightning_sbp.selectors import Scores, Selection

__all__ = ["GradientErrorTracker", "StepLog", "loggers_write_this_step", "subset_and_full_gradients"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[Any], tuple[Tensor, Tensor]]


def loggers_write_this_step(trainer: pl.Trainer) -> bool:
    """Whether the loggers write this step: step values logged on other steps would only be overwritten.

    Lightning has no public answer: this reads the private ``Trainer._logger_connector.should_update_logs``,
    which follows ``log_every_n_steps``. When that attribute is gone every step logs, which is
    correct but slower; a test fails when Lightning renames it.
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


class StepLog:
    """The per-step record of one fit: counts of examples, the ``sbp/`` step values, non-finite losses.

    Attributes:
        examples_seen: examples in all training batches so far.
        examples_backpropagated: examples that went through a backward pass.
        selective_steps: steps that selected a subset.
    """

    def __init__(self) -> None:
        self.examples_seen = 0
        self.examples_backpropagated = 0
        self.selective_steps = 0
        self._nonfinite: Tensor | None = None
        self._warned_nonfinite = False

    def full_step(self, pl_module: pl.LightningModule, size: int) -> None:
        """Count and log a step that trained on the whole batch of ``size`` examples."""
        self._count(size, size)
        if loggers_write_this_step(pl_module.trainer):
            self._log(pl_module, {"sbp/active": 0.0, "sbp/k": float(size)}, size)

    def selective_step(
        self,
        pl_module: pl.LightningModule,
        size: int,
        selection: Selection,
        scores: Scores | None,
        timings: tuple[float, float, float],
        values: dict[str, Any],
    ) -> None:
        """Count and log a selective step.

        Args:
            pl_module: the module that logs.
            size: the number of examples in the batch.
            selection: the subset trained on; its ``stats`` are logged as ``sbp/<key>``.
            scores: the scores the selection was made from; ``None`` when the step ran no scoring pass.
            timings: ``time.perf_counter()`` before scoring, after scoring and after selecting.
            values: further step values to log with these (the gradient errors).
        """
        k = int(selection.indices.shape[0])
        if scores is not None:
            self._watch_nonfinite(scores.losses)
        self._count(size, k)
        self.selective_steps += 1
        if not loggers_write_this_step(pl_module.trainer):
            return
        started, scored, selected = timings
        values = {
            **values,
            **{f"sbp/{key}": value for key, value in selection.stats.items()},
            "sbp/active": 1.0,
            "sbp/k": float(k),
            "sbp/score_ms": 1e3 * (scored - started),
            "sbp/select_ms": 1e3 * (selected - scored),
        }
        if scores is not None:
            finite = torch.isfinite(scores.losses)
            kept = finite[selection.indices]
            values["sbp/full_loss"] = scores.losses.where(finite, torch.nan).nanmean()
            values["sbp/selected_loss"] = scores.losses[selection.indices].where(kept, torch.nan).nanmean()
        self._log(pl_module, values, size)

    def warn_nonfinite(self, trainer: pl.Trainer | None = None) -> None:
        """Warn, once per fit, when losses were not finite; with a ``trainer``, only on the steps it logs.

        Reading the flag costs one host-device synchronisation, paid only when called.
        """
        if self._warned_nonfinite or self._nonfinite is None:
            return
        if trainer is not None and not loggers_write_this_step(trainer):
            return
        if bool(self._nonfinite):
            self._warned_nonfinite = True
            rank_zero_warn(
                "SelectiveBackprop saw NaN or inf per-example losses; those examples rank last in selection "
                "and are left out of the logged losses. Check the learning rate, the data and the loss."
            )
        self._nonfinite = None

    def _count(self, seen: int, backpropagated: int) -> None:
        self.examples_seen += seen
        self.examples_backpropagated += backpropagated

    def _watch_nonfinite(self, losses: Tensor) -> None:
        flag = ~torch.isfinite(losses).all()
        self._nonfinite = flag if self._nonfinite is None else self._nonfinite | flag

    def _log(self, pl_module: pl.LightningModule, values: dict[str, Any], size: int) -> None:
        values["sbp/backprop_fraction"] = self.examples_backpropagated / self.examples_seen
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=size)


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

    device = next(model.parameters()).device
    with torch.enable_grad(), frozen_running_stats(model), untouched_rng(device):
        logits, targets = forward(batch)
        reference = gradients(loss_fn(logits, targets).mean())
        logits, targets = forward(subset)
        approximation = gradients((weights * loss_fn(logits, targets)).mean())
    return approximation, reference


class GradientErrorTracker(torch.nn.Module):
    """The gradient-error metrics of one fit, updated on every selective step and logged per epoch.

    A module, so that the metrics move to the training device together.

    Args:
        sketch_dim: measure on a TensorSketch of this dimension of the last-layer gradients whenever it is
            cheaper than the exact Gram matrix (heads with large vocabularies, see
            :func:`~lightning_sbp.functional.gradient_gram`), drawn independently of any sketch the
            selector used; ``None`` measures exactly.
    """

    def __init__(self, sketch_dim: int | None = None) -> None:
        super().__init__()
        self.sketch_dim = sketch_dim
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
        seed: int = 0,
    ) -> dict[str, Tensor]:
        """Update the metrics with one batch and log their epoch values.

        Args:
            pl_module: the module that logs.
            scores: the full batch's scores with its last layer, as the trainer would compute them.
            selection: the subset trained on.
            exact: when given, computes the subset and full-batch gradients over all parameters.
            seed: seeds the sketch, when there is one.

        Returns:
            This batch's values under ``sbp/<name>_step``, to log with the step's other values.
        """
        values: dict[str, Tensor] = {}
        k = int(selection.indices.shape[0])
        # k = N happens only under DDP, on a rank whose batch is too small to select from: a whole batch matches
        # itself, and its 0/0 ratio would poison the epoch mean.
        if k < scores.size:
            gram = self.gram(scores, seed)
            error = self.grad_error(gram, selection.indices, selection.weights)
            random_error = self.grad_error_random(gram, k)
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

    def gram(self, scores: Scores, seed: int = 0) -> Tensor:
        """The float32 Gram matrix the errors are measured on: exact, or sketched with ``sketch_dim``."""
        return scores.gram_in(torch.float32, self.sketch_dim, seed)
