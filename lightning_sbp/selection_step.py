"""The selection step: score a batch, select its subset and measure the selection, with numerics of its own.

Lightning runs ``training_step`` inside the autocast of its precision setting (``bf16-mixed``,
``16-mixed``), and everything called from it inherits that: a float32 Gram matrix, an OMP fit or a
gradient error computed there would silently run in half precision. This unit draws the line:

* the scoring forward runs at the precision the trainer gives the step, or the one ``score_precision``
  asks for: it is the model's forward, and its losses rank what the model computes;
* everything after it runs with autocast off: the logit gradients (float32), the Gram matrices and OMP
  (the selector's ``dtype``), gradnorm's probabilities (float32), and every gradient-error measurement
  (the tracker's ``dtype``).

The callback decides when a step selects and wires the result into Lightning's hooks; this unit decides
what a selective step computes before its subset pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_sbp.batches import BatchAdapter
from lightning_sbp.functional._inputs import autocast_off
from lightning_sbp.score_cache import ScoreCache
from lightning_sbp.scoring import ForwardScores, Scorer, ScoringError
from lightning_sbp.selectors import Scores, Selection, Selector
from lightning_sbp.selectors.seeds import mix_seed, step_generator
from lightning_sbp.timing import Mark, Stopwatch, mark
from lightning_sbp.tracking import GradientErrorTracker, subset_and_full_gradients

__all__ = ["SelectedBatch", "SelectionStep"]


@dataclass(frozen=True)
class SelectedBatch:
    """What the selection step hands the training step.

    Attributes:
        selection: the rows to train on and their weights.
        losses: the full batch's per-example losses when the step ran a scoring pass, else ``None`` (cached
            scores are not this model's).
        measured: this step's gradient-error values under their log keys; empty on steps that do not measure.
        marks: points in time before scoring, after scoring and after selecting (``lightning_sbp.timing``).
    """

    selection: Selection
    losses: Tensor | None
    measured: dict[str, Tensor]
    marks: tuple[Mark, Mark, Mark]


class SelectionStep:
    """Scoring, selection and measurement of one selective step, as one unit with its own numerics.

    Args:
        selector: the selection policy.
        scorer: the scoring pass (forward, loss, precision, scale, last-layer capture).
        batches: reads and indexes batches (the callback, whose batch hooks a user may override).
        seed: seeds the per-rank, per-step generators of random selectors and sketches.
        grad_error_every: measure on the first selective step and every this many after it.
        exact_grad_error_every: every this many selective steps, also the error over all parameters; ``0`` never.
        sketch_dim: measure on a TensorSketch of this dimension when cheaper than the exact Gram matrix.
        grad_error_dtype: the dtype of the gradient-error measurements.

    Attributes:
        score_cache: the stale-score cache, when ``stale_epochs`` is set (attached once the data is known).
        tracker: the gradient-error metrics, when tracking is on and the last layer was found.
        measurement: the time spent on work done only to measure (see
            :attr:`~lightning_sbp.SelectiveBackprop.measurement_seconds`).
    """

    def __init__(
        self,
        selector: Selector,
        scorer: Scorer,
        batches: BatchAdapter,
        *,
        seed: int = 0,
        grad_error_every: int = 64,
        exact_grad_error_every: int = 0,
        sketch_dim: int | None = None,
        grad_error_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.selector = selector
        self.scorer = scorer
        self.batches = batches
        self.seed = seed
        self.grad_error_every = grad_error_every
        self.exact_grad_error_every = exact_grad_error_every
        self.sketch_dim = sketch_dim
        self.grad_error_dtype = grad_error_dtype
        self.score_cache: ScoreCache | None = None
        self.tracker: GradientErrorTracker | None = None
        self.measurement = Stopwatch()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, track: bool) -> None:
        """Find the layers the selector and the measurements read; ``track`` asks for gradient errors."""
        self.scorer.setup(trainer, pl_module, self.selector.needs_last_layer, track)
        tracking = track and self.scorer.capture is not None
        self.tracker = GradientErrorTracker(self.sketch_dim, self.grad_error_dtype) if tracking else None
        self.selector.setup(pl_module)

    def to(self, device: torch.device) -> None:
        """Keep the metrics and the timing on the training device."""
        if self.tracker is not None:
            self.tracker.to(device)
        self.measurement = Stopwatch(device)

    def measures(self, ordinal: int) -> tuple[bool, bool]:
        """Whether the ``ordinal``-th selective step (from 0) measures the gradient errors, and also the exact one."""
        if self.tracker is None:
            return False, False
        every = self.exact_grad_error_every
        exact_due = bool(every) and ordinal % every == 0
        return exact_due or ordinal % self.grad_error_every == 0, exact_due

    def run(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        k: int,
        *,
        ordinal: int,
        batch_idx: int,
        host_indices: Tensor | None = None,
    ) -> SelectedBatch:
        """Score ``batch``, select ``k`` of its rows, and measure the selection when this step measures.

        Args:
            pl_module: the module being trained.
            batch: the whole batch, as the training step received it.
            k: the subset size.
            ordinal: how many selective steps came before this one in the run.
            batch_idx: the batch's index in its epoch (tells accumulation micro-steps apart).
            host_indices: the batch's example indices read on the host before the batch moved to the device,
                for the stale-score cache; read from the batch when ``None``.
        """
        trainer = pl_module.trainer
        device = pl_module.device
        measuring, exact_due = self.measures(ordinal)
        started = mark(device)
        forward: ForwardScores | None = None
        scores: Scores | None = None
        full_precision = False
        if self.selector.needs_scores:
            # A measurement re-scores cheap scores at full cost, so only a full-cost pass captures the layer for it.
            last_layer = self.selector.needs_last_layer or (measuring and not self.scorer.cheap)
            scores, forward, full_precision = self._scores(pl_module, batch, last_layer, host_indices)
        elif measuring:
            # A selector that reads no score (random) scores only the steps that measure, and that pass is
            # measurement work, not the selector's.
            self.measurement.start()
            forward, full_precision = self._forward_for_tracking(pl_module, batch), True
            self.measurement.stop()
        scored = mark(device)

        size = self.batches.batch_size(batch)
        with autocast_off(device):
            selection = self._select(trainer, scores or _unscored(size, device), k, batch_idx)
        selected = mark(device)

        measured: dict[str, Tensor] = {}
        if measuring and self.tracker is not None:
            self.measurement.start()
            with autocast_off(device):
                true_scores = self._true_scores(pl_module, batch, scores, forward, full_precision)
                measured = self._measure(pl_module, batch, selection, true_scores, exact_due)
            self.measurement.stop()
        # The losses of this step's own scoring pass, also one that ran only to measure. Cached scores are an
        # earlier model's: logged as this step's batch loss, they would draw an old curve as a current one.
        losses = forward.losses if forward is not None else None
        return SelectedBatch(selection, losses, measured, (started, scored, selected))

    def _scores(
        self, pl_module: pl.LightningModule, batch: Any, last_layer: bool, host_indices: Tensor | None
    ) -> tuple[Scores, ForwardScores | None, bool]:
        """The scores the selector reads, the forward they came from, and whether it ran at full cost.

        A stale-cache hit gives cached scores and no forward. Otherwise the scoring pass runs as the options
        make it (lower precision, rescaled); its last layer is finished only when the selector reads it, and
        the forward is kept for a measurement that reads it on this step.
        """
        cache, epoch, trainer = self.score_cache, pl_module.current_epoch, pl_module.trainer
        indices = None
        if cache is not None:
            indices = self.batches.example_indices(batch)
            if indices is None:
                raise ValueError("stale_epochs needs batches that carry example indices; this batch has none")
            cached = cache.lookup_on_every_rank(indices, epoch, trainer, host_indices)
            if cached is not None:
                return cached, None, False
        forward = self.scorer.forward_cheaply(pl_module, batch, self.batches, last_layer)
        scores = forward.with_last_layer() if self.selector.needs_last_layer else forward.without_last_layer()
        if cache is not None and indices is not None:
            cache.store_from_every_rank(indices, scores, epoch, trainer, host_indices)
        return scores, forward, not self.scorer.cheap

    def _forward_for_tracking(self, pl_module: pl.LightningModule, batch: Any) -> ForwardScores | None:
        """The forward for the gradient errors alone: a module the defaults cannot score loses the tracking."""
        try:
            return self.scorer.forward(pl_module, batch)
        except ScoringError as error:
            self.tracker = None
            reason = str(error).rstrip(".")
            rank_zero_warn(
                f"SelectiveBackprop does not track gradient errors, which need a scoring pass: {reason}. "
                f"{type(self.selector).__name__} itself reads no score, so training goes on."
            )
            return None

    def _select(self, trainer: pl.Trainer, scores: Scores, k: int, batch_idx: int) -> Selection:
        if k >= scores.size:
            return Selection.uniform(torch.arange(scores.size, device=scores.losses.device))
        generator = step_generator(self.seed, trainer.global_rank, trainer.global_step, batch_idx, scores.losses.device)
        return self.selector.select(scores, k, generator)

    def _true_scores(
        self,
        pl_module: pl.LightningModule,
        batch: Any,
        scores: Scores | None,
        forward: ForwardScores | None,
        full_precision: bool,
    ) -> Scores:
        """The full batch's scores with its last layer, as the trainer's precision at full scale gives them.

        Cached, rescaled or lower-precision scores are not that: the errors are then measured against a
        full-cost re-score, which is measurement work.
        """
        if full_precision and scores is not None and scores.features is not None:
            return scores
        if not full_precision or forward is None or not forward.has_last_layer:
            forward = self.scorer.forward(pl_module, batch)
        return forward.with_last_layer()

    def _measure(
        self, pl_module: pl.LightningModule, batch: Any, selection: Selection, true_scores: Scores, exact_due: bool
    ) -> dict[str, Tensor]:
        """The gradient-error step values of ``selection``, measured on ``true_scores``."""
        assert self.tracker is not None
        exact = None
        if exact_due:
            model_forward, loss_fn = self.scorer.forward_and_loss(pl_module)
            subset = self.batches.index_batch(batch, selection.indices)
            exact = functools.partial(
                subset_and_full_gradients, pl_module, model_forward, loss_fn, batch, subset, selection.weights
            )
        seed = mix_seed(self.seed, pl_module.global_rank, pl_module.global_step)
        return self.tracker.measure(pl_module, true_scores, selection, exact, seed)


def _unscored(size: int, device: torch.device) -> Scores:
    """What a selector that reads no score sees of a batch of ``size`` examples: its size and device."""
    return Scores(losses=torch.full((size,), torch.nan, device=device))
