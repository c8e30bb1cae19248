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
    GradientErrorSquaredRatio,
    RandomSubsetGradientError,
)
from lightning_sbp.scoring import frozen_running_stats, untouched_rng
from lightning_sbp.selectors import Scores, Selection
from lightning_sbp.timing import Mark, elapsed_seconds

__all__ = ["GradientErrorTracker", "StepLog", "loggers_write_this_step", "subset_and_full_gradients"]

LossFn = Callable[[Tensor, Tensor], Tensor]
Forward = Callable[[Any], tuple[Tensor, Tensor]]


def loggers_write_this_step(trainer: pl.Trainer) -> bool:
    """Whether the loggers write the step being trained: step values logged on other steps would be overwritten.

    Asked from inside the training step, before its optimiser step. Lightning writes step values when the
    number of batches that stepped, this one included, is a multiple of ``log_every_n_steps``, or when
    training stops; with automatic optimisation that count is ``global_step + 1``. Public attributes only:
    a test checks the answer against Lightning's own across accumulation, resumption and logging settings.
    """
    # Both are public attributes that the Trainer sets on itself at construction, unknown to type checkers.
    every = int(getattr(trainer, "log_every_n_steps", 50))
    if getattr(trainer, "fast_dev_run", False) or trainer.should_stop:
        return True
    return every > 0 and (trainer.global_step + 1) % every == 0


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
        self._marks: tuple[Mark, Mark, Mark] | None = None

    def full_step(self, pl_module: pl.LightningModule, size: int, trained: bool = True) -> None:
        """Count and log a step on the whole batch of ``size`` examples (``trained``: it returned a loss)."""
        self._count(size, size if trained else 0)
        if loggers_write_this_step(pl_module.trainer):
            self._log(pl_module, {"sbp/active": 0.0, "sbp/k": float(size)}, size)

    def selective_step(
        self,
        pl_module: pl.LightningModule,
        size: int,
        selection: Selection,
        losses: Tensor | None,
        measured: dict[str, Tensor],
        marks: tuple[Mark, Mark, Mark],
        trained: bool = True,
    ) -> None:
        """Count and log a selective step.

        Args:
            pl_module: the module that logs.
            size: the number of examples in the batch.
            selection: the subset trained on; its ``stats`` are logged as ``sbp/<key>``.
            losses: the batch's per-example losses, when the step had scores.
            measured: the gradient-error step values, under their log keys.
            marks: the points in time before scoring, after scoring and after selecting, logged at the end of
                the batch (see :meth:`log_timings`).
            trained: whether the step returned a loss; Lightning skips the backward of one that returns ``None``.
        """
        k = int(selection.indices.shape[0])
        if losses is not None:
            self._watch_nonfinite(losses)
        if measured:
            self.add_measurement(measured)
        self._count(size, k if trained else 0)
        self.selective_steps += 1
        if not loggers_write_this_step(pl_module.trainer):
            return
        self._marks = marks
        values = {
            **measured,
            **{f"sbp/{key}": value for key, value in selection.stats.items()},
            "sbp/active": 1.0,
            "sbp/k": float(k),
        }
        if losses is not None:
            finite = torch.isfinite(losses)
            kept = finite[selection.indices]
            values["sbp/full_loss"] = losses.where(finite, torch.nan).nanmean()
            values["sbp/selected_loss"] = losses[selection.indices].where(kept, torch.nan).nanmean()
        self._log(pl_module, values, size)

    def add_measurement(self, measured: dict[str, Tensor]) -> None:
        """Take in the gradient-error values of a step that measured; the callback's log keeps nothing more.

        A log that aggregates measurements across steps (``compare``'s) overrides this.
        """

    def log_timings(self, pl_module: pl.LightningModule) -> None:
        """Log ``sbp/score_ms`` and ``sbp/select_ms`` of the step just trained, if the loggers write it.

        Called at the end of the batch: on a GPU the times come from CUDA events, and reading them waits
        only for the scoring and the selection, which the device finished long before the step's backward.
        """
        if self._marks is None:
            return
        started, scored, selected = self._marks
        self._marks = None
        values = {
            "sbp/score_ms": 1e3 * elapsed_seconds(started, scored),
            "sbp/select_ms": 1e3 * elapsed_seconds(scored, selected),
        }
        pl_module.log_dict(values, on_step=True, on_epoch=False)

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
    """The gradient-error metrics of one fit, updated on the selective steps that measure and logged per epoch.

    A module, so that the metrics move to the training device together.

    Args:
        sketch_dim: measure on a TensorSketch of this dimension of the last-layer gradients whenever it is
            cheaper than the exact Gram matrix (heads with large vocabularies, see
            :func:`~lightning_sbp.functional.gradient_gram`), drawn independently of any sketch the
            selector used; ``None`` measures exactly.
        dtype: the dtype of the Gram matrix and of every error, ``float32`` or ``float64``.
    """

    def __init__(self, sketch_dim: int | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.sketch_dim = sketch_dim
        self.dtype = dtype
        self.grad_error = GradientApproximationError()
        self.grad_error_random = RandomSubsetGradientError()
        self.grad_error_ratio = GradientErrorRatio()
        self.grad_error_sq_ratio = GradientErrorSquaredRatio()
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
            values["grad_error_sq_ratio"] = self.grad_error_sq_ratio(error, random_error)
        if exact is not None:
            values["grad_error_exact"] = self.grad_error_exact(*exact())
        for name in values:
            # Epoch values are each metric's mean over the epoch, synced across ranks at its end.
            metric = getattr(self, name)
            pl_module.log(f"sbp/{name}_epoch", metric, on_step=False, on_epoch=True, metric_attribute=f"sbp_{name}")
        return {f"sbp/{name}_step": value for name, value in values.items()}

    def gram(self, scores: Scores, seed: int = 0) -> Tensor:
        """The Gram matrix the errors are measured on, in ``dtype``: exact, or sketched with ``sketch_dim``."""
        return scores.gram_in(self.dtype, self.sketch_dim, seed)
