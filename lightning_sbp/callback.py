"""The Selective Backprop callback: score every example, backpropagate a selected subset."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_sbp.batches import BatchAdapter
from lightning_sbp.distributed import check_private_parameters, check_strategy, gather_rank_states, own_rank_state
from lightning_sbp.functional.batch import subset_size
from lightning_sbp.mixin import SelectiveBackpropMixin, default_loss_of, subset_weights
from lightning_sbp.schedule import Schedule
from lightning_sbp.score_cache import (
    STORAGE_DTYPES,
    Placement,
    ScoreCache,
    StorageDtype,
    fields_read_by,
    score_cache_for,
)
from lightning_sbp.scoring import (
    SCORE_DTYPES,
    LossFn,
    ScoreFn,
    ScoreMode,
    ScorePrecision,
    Scorer,
    has_batch_norm,
)
from lightning_sbp.selection_step import SelectedBatch, SelectionStep
from lightning_sbp.selectors import Selection, Selector, available_selectors, get_selector
from lightning_sbp.tracking import StepLog, loggers_write_this_step

__all__ = ["SelectiveBackprop"]

GradErrorDtype = Literal["float32", "float64"]


class SelectiveBackprop(BatchAdapter, Callback):
    """Forward every example of a batch, backpropagate only a selected, possibly weighted, subset.

    On a selective step the training step is split in two: a scoring pass over all ``N`` examples
    without a graph, then the module's own ``training_step`` on the ``k`` examples the selector
    keeps. Lightning's automatic optimisation, precision, gradient clipping, accumulation and
    distributed strategies see an ordinary step.

    A module that inherits :class:`~lightning_sbp.SelectiveBackpropMixin` is scored with its
    ``sbp_forward`` and ``sbp_loss`` and can apply selection weights; any other module is scored
    with its ``forward`` and ``loss_fn`` and trains on unweighted subsets.

    Args:
        selector: a registered name (see :func:`~lightning_sbp.selectors.available_selectors`) or a
            :class:`~lightning_sbp.selectors.Selector` instance.
        keep: fraction of each batch to backpropagate, ``0 < keep <= 1``; ``k = floor(keep * N)``,
            at least 1 (2 when the model has batch norm).
        start: start of the selective window, as a fraction of the run's optimiser steps.
        end: end of the selective window, as a fraction of the run's optimiser steps.
        interrupt: every ``interrupt``-th step inside the window is a full step; ``0`` never.
        score_mode: ``"train"`` scores with modules in train mode (batch statistics, dropout on,
            no running statistic updated); ``"eval"`` scores in eval mode.
        seed: seed of the per-rank, per-step generators of random selectors.
        loss_fn: per-example loss ``(logits, targets) -> [N]`` for scoring a module without the
            mixin (in YAML, the function's dotted import path). When omitted it is chosen from the
            targets at the first selective step and said once: cross-entropy for class indices, the
            squared error for one output per example (binary cross-entropy with logits when every
            target is 0 or 1), binary cross-entropy, cross-entropy or the squared error for targets of
            the outputs' shape (see :mod:`lightning_sbp.default_loss`).
        last_layer: qualified name of the final ``nn.Linear`` whose gradients selectors and
            metrics read; the last ``nn.Linear`` registered when omitted.
        track_grad_error: measure, on every ``grad_error_every``-th selective step, how well the subset's
            last-layer gradient approximates the full batch's (``sbp/grad_error_step`` and ``_epoch``), what
            a random subset of the same size would give (``sbp/grad_error_random_*``) and their ratio
            (``sbp/grad_error_ratio_*``).
        grad_error_every: measure the gradient errors on the first selective step and every this many
            after it. Only those steps pay the full-cost re-score that a cheaper scoring pass needs
            for them, so tracking stays within a few percent of a step (see the benchmarks); ``1``
            measures every selective step.
        grad_error_sketch_dim: measure the gradient errors on a TensorSketch of this dimension of the
            last-layer gradients whenever that is cheaper than the exact Gram matrix (language-model heads
            with large vocabularies); ``None`` always measures exactly.
        exact_grad_error_every: every this many selective steps, also log ``sbp/grad_error_exact_*``,
            the same error over all trainable parameters from two extra backward passes; ``0`` never.
        grad_error_dtype: the dtype of every gradient-error measurement, ``"float32"`` or ``"float64"``; they
            run with autocast off whatever the trainer's precision.
        score_precision: ``"same"`` scores under the trainer's precision; ``"bf16"`` or ``"16"``
            score under autocast to bfloat16 or float16, whatever the training precision.
        score_scale: the scoring pass sees inputs resampled to this fraction of their spatial size,
            ``0 < score_scale <= 1``; the subset pass always sees the full inputs.
        stale_epochs: reuse each example's scores for this many epochs after the one that computed
            them, skipping the scoring pass on batches whose scores are all fresh; ``0`` never.
            Needs batches that carry example indices (see :meth:`~lightning_sbp.SelectiveBackprop.example_indices`).
        score_fn: ``(module, batch) -> per-example losses [N]``: how to score a module whose batch or
            ``forward`` the defaults cannot read (in YAML, the function's dotted import path). It gives
            losses only, so it serves the selectors that read nothing else (``random``, ``topk``,
            ``loss``) and turns gradient-error tracking off; for the others inherit
            :class:`~lightning_sbp.SelectiveBackpropMixin` and override ``sbp_forward``/``sbp_loss``.
        score_cache_dtype: storage dtype of the stale-score cache, ``"float32"``, ``"bfloat16"`` or
            ``"float16"``. The cache keeps only what the selector reads (losses; and the last layer's
            inputs and logit gradients for ``omp`` and ``gradnorm``): ``size * (4 + bytes(dtype) *
            (1 [+ C + D]))`` bytes, logged when training starts.
        score_cache_placement: ``"device"`` keeps the cache on the training device; ``"cpu"`` in
            host memory (pinned under CUDA), at the price of a copy to the host on every scored step.
        checkpoint_score_cache: save the score cache in checkpoints; off by default, since it can be
            as large as the dataset's scores and a resumed run only re-scores one epoch without it.

    Under mixed precision (``bf16-mixed``, ``16-mixed``) the scoring forward runs at the trainer's
    precision (or ``score_precision``), and everything after it with autocast off: the logit gradients
    in float32, the Gram matrices and OMP in the selector's ``dtype``, the gradient errors in
    ``grad_error_dtype`` (see :mod:`lightning_sbp.selection_step`).

    The gradient-error metrics always measure against the full batch scored at the trainer's
    precision and full scale: with a cheaper scoring pass (``score_precision``, ``score_scale``,
    ``stale_epochs``) they show what it costs in selection quality, at the price of one more
    scoring pass; ``track_grad_error=False`` leaves only the cheap one.

    Raises:
        ValueError: for any argument outside its allowed values.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SelectiveBackprop(selector="random", keep=0.5)], logger=False)
    """

    def __init__(
        self,
        selector: str | Selector = "random",
        keep: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
        interrupt: int = 0,
        score_mode: ScoreMode = "train",
        seed: int = 0,
        loss_fn: LossFn | None = None,
        last_layer: str | None = None,
        track_grad_error: bool = True,
        exact_grad_error_every: int = 0,
        score_precision: ScorePrecision = "same",
        score_scale: float = 1.0,
        stale_epochs: int = 0,
        score_fn: ScoreFn | None = None,
        grad_error_every: int = 64,
        grad_error_sketch_dim: int | None = None,
        score_cache_dtype: StorageDtype = "float32",
        score_cache_placement: Placement = "device",
        checkpoint_score_cache: bool = False,
        grad_error_dtype: GradErrorDtype = "float32",
    ) -> None:
        if isinstance(selector, str):
            selector = get_selector(selector)
        elif not isinstance(selector, Selector):
            raise ValueError(
                f"selector must be a registered name ({', '.join(available_selectors())}) or a Selector instance, "
                f"got {selector!r}"
            )
        if isinstance(keep, bool) or not isinstance(keep, int | float) or not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be a fraction in (0, 1], got {keep!r}")
        if score_mode not in ("train", "eval"):
            raise ValueError(f"score_mode must be 'train' or 'eval', got {score_mode!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if score_fn is not None and not callable(score_fn):
            raise ValueError(
                f"score_fn must be a callable (module, batch) -> per-example losses [N], got {score_fn!r}; in YAML "
                "give its dotted import path"
            )
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be a callable (logits, targets) -> per-example losses, got {loss_fn!r}")
        if last_layer is not None and not isinstance(last_layer, str):
            raise ValueError(f"last_layer must be the qualified name of an nn.Linear, got {last_layer!r}")
        if not isinstance(track_grad_error, bool):
            raise ValueError(f"track_grad_error must be True or False, got {track_grad_error!r}")
        if isinstance(exact_grad_error_every, bool) or not isinstance(exact_grad_error_every, int):
            raise ValueError(
                f"exact_grad_error_every must be 0 (never) or a positive integer, got {exact_grad_error_every!r}"
            )
        if exact_grad_error_every < 0:
            raise ValueError(
                f"exact_grad_error_every must be 0 (never) or a positive integer, got {exact_grad_error_every}"
            )
        if score_precision not in SCORE_DTYPES:
            raise ValueError(
                f"score_precision must be one of {', '.join(map(repr, SCORE_DTYPES))}; got {score_precision!r}"
            )
        if isinstance(score_scale, bool) or not isinstance(score_scale, int | float) or not 0.0 < score_scale <= 1.0:
            raise ValueError(f"score_scale must be a fraction in (0, 1], got {score_scale!r}")
        if isinstance(stale_epochs, bool) or not isinstance(stale_epochs, int) or stale_epochs < 0:
            raise ValueError(f"stale_epochs must be 0 (never) or a positive integer, got {stale_epochs!r}")
        if isinstance(grad_error_every, bool) or not isinstance(grad_error_every, int) or grad_error_every < 1:
            raise ValueError(f"grad_error_every must be a positive integer (1: every step), got {grad_error_every!r}")
        if grad_error_sketch_dim is not None and (
            isinstance(grad_error_sketch_dim, bool)
            or not isinstance(grad_error_sketch_dim, int)
            or grad_error_sketch_dim < 1
        ):
            raise ValueError(
                f"grad_error_sketch_dim must be None (exact) or a positive integer, got {grad_error_sketch_dim!r}"
            )
        if score_cache_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"score_cache_dtype must be one of {', '.join(map(repr, STORAGE_DTYPES))}; got {score_cache_dtype!r}"
            )
        if score_cache_placement not in ("device", "cpu"):
            raise ValueError(f"score_cache_placement must be 'device' or 'cpu', got {score_cache_placement!r}")
        if not isinstance(checkpoint_score_cache, bool):
            raise ValueError(f"checkpoint_score_cache must be True or False, got {checkpoint_score_cache!r}")
        if grad_error_dtype not in ("float32", "float64"):
            raise ValueError(f"grad_error_dtype must be 'float32' or 'float64', got {grad_error_dtype!r}")
        self.selector = selector
        self.keep = float(keep)
        self.schedule = Schedule(start, end, interrupt)
        self.seed = seed
        self.track_grad_error = track_grad_error
        self.exact_grad_error_every = exact_grad_error_every
        self.stale_epochs = stale_epochs
        self.grad_error_every = grad_error_every
        self.grad_error_sketch_dim = grad_error_sketch_dim
        self.grad_error_dtype = grad_error_dtype
        self.score_cache_dtype = score_cache_dtype
        self.score_cache_placement = score_cache_placement
        self.checkpoint_score_cache = checkpoint_score_cache
        self.scorer = Scorer(score_mode, score_precision, float(score_scale), loss_fn, last_layer, score_fn)
        self.step = SelectionStep(
            selector,
            self.scorer,
            self,
            seed=seed,
            grad_error_every=grad_error_every,
            exact_grad_error_every=exact_grad_error_every,
            sketch_dim=grad_error_sketch_dim,
            grad_error_dtype=getattr(torch, grad_error_dtype),
        )
        self.step_log = StepLog()
        self.last_selection: Selection | None = None
        self._min_k = 1
        self._reported_small_batch = False
        self._largest_batch = 0
        self._total_steps: float = float("inf")
        self._unpatch: list[Callable[[], None]] = []
        self._cache_state: dict[str, Any] | None = None
        self._batch_idx = 0
        self._host_indices: Tensor | None = None

    @property
    def score_cache(self) -> ScoreCache | None:
        """The stale-score cache, once training has started with ``stale_epochs``."""
        return self.step.score_cache

    @property
    def measurement_seconds(self) -> float:
        """Seconds, since the fit started, spent on work done only to measure gradient errors.

        That is the scoring pass a selector that reads no score (``random``) runs only on the steps that
        measure, the full-cost re-score that a cheaper scoring pass needs for them, the logit gradients a
        loss-based selector does not read, and the Gram matrices and metric updates. Read from CUDA events on
        a GPU (reading waits for the last measurement to finish), from the host clock elsewhere. A
        comparison of selectors subtracts it from each run's training time.
        """
        return self.step.measurement.seconds

    @property
    def examples_seen(self) -> int:
        """Examples in all training batches so far."""
        return self.step_log.examples_seen

    @property
    def examples_backpropagated(self) -> int:
        """Examples that went through a backward pass so far."""
        return self.step_log.examples_backpropagated

    @property
    def selective_steps(self) -> int:
        """Steps that selected a subset so far."""
        return self.step_log.selective_steps

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that the module can be served and route its ``training_step`` through the callback."""
        if stage != "fit":
            return
        check_strategy(trainer.strategy)
        check_private_parameters(trainer.strategy, pl_module)
        mixin = isinstance(pl_module, SelectiveBackpropMixin)
        if self.selector.weighted and not mixin:
            raise ValueError(
                f"selector {type(self.selector).__name__} weighs its examples, which {type(pl_module).__name__} "
                "cannot apply: inherit lightning_sbp.SelectiveBackpropMixin and reduce per-example losses with "
                "self.sbp_reduce, or use an unweighted selector (random, topk, loss)"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "SelectiveBackprop hands the subset loss to Lightning's automatic optimisation; "
                f"{type(pl_module).__name__} uses manual optimisation (automatic_optimization=False), "
                "which it does not support"
            )
        self.step.setup(trainer, pl_module, self.track_grad_error)
        self._min_k = 2 if has_batch_norm(pl_module) else 1
        self._patch(pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix the selective window for this run's length."""
        self._total_steps = float(trainer.estimated_stepping_batches)
        self.schedule.window(self._total_steps)
        self.step.to(pl_module.device)
        self._reported_small_batch = False
        self._largest_batch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Size the stale-score cache for the training set, now that the fit loop has set up its data."""
        if self.stale_epochs:
            cache = self._make_score_cache(trainer)
            if self._cache_state is not None:
                cache.load_state_dict(self._cache_state)
            self.step.score_cache = cache

    def _make_score_cache(self, trainer: pl.Trainer) -> ScoreCache:
        fields, dtype = fields_read_by(self.selector), STORAGE_DTYPES[self.score_cache_dtype]
        cache = score_cache_for(
            trainer,
            self.stale_epochs,
            self.example_indices,
            fields=fields,
            dtype=dtype,
            placement=self.score_cache_placement,
        )
        layer = self.scorer.capture.layer if self.scorer.capture is not None else None
        widths = {"losses": 1}
        if "features" in fields and layer is not None:
            widths.update(logit_grads=layer.out_features, features=layer.in_features)
        size = ScoreCache.nbytes_for(cache.size, widths, dtype)
        rank_zero_info(
            f"SelectiveBackprop: the stale-score cache keeps {', '.join(fields)} of {cache.size} examples in "
            f"{self.score_cache_dtype} on the {self.score_cache_placement}: {cache.size} * (4 + "
            f"{torch.finfo(dtype).bits // 8} * {sum(widths.values())}) bytes = {size / 2**20:.1f} MiB per rank"
        )
        return cache

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Remember the batch's index in its epoch: it seeds the step's random draws."""
        self._batch_idx = batch_idx

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the step's timings, and warn, once and without a sync on every step, when losses were not finite."""
        self.step_log.log_timings(pl_module)
        self.step_log.warn_nonfinite(trainer)
        if loggers_write_this_step(trainer):
            self._warn_about_later_targets(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn when losses were not finite, or when later targets contradict the default loss chosen."""
        self.step_log.warn_nonfinite()
        self._warn_about_later_targets(pl_module)

    def _warn_about_later_targets(self, pl_module: pl.LightningModule) -> None:
        for loss in (self.scorer.default_loss, default_loss_of(pl_module)):
            if loss is not None:
                loss.warn_if_contradicted()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module its own ``training_step`` (and batch-transfer hook) back."""
        while self._unpatch:
            self._unpatch.pop()()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Give the module its own ``training_step`` back when the fit raises or is interrupted."""
        self.teardown(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        """Selector state, the count of examples seen and backpropagated, and the score cache.

        Under DDP each rank keeps its own selector state and counts (the loss history of ``loss``):
        they are saved for every rank as ``{"ranks": [...]}``. The score cache holds every rank's
        scores on every rank, so rank 0's is saved.
        """
        state: dict[str, Any] = {
            "selector": self.selector.state_dict(),
            "examples_seen": self.step_log.examples_seen,
            "examples_backpropagated": self.step_log.examples_backpropagated,
            "selective_steps": self.step_log.selective_steps,
        }
        state = gather_rank_states(state)
        saved = self.checkpoint_score_cache and self.score_cache is not None
        state["score_cache"] = self.score_cache.state_dict() if saved and self.score_cache is not None else None
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; under DDP each rank takes its own selector state and counts."""
        self._cache_state = state_dict.get("score_cache")
        if self.score_cache is not None and self._cache_state is not None:
            self.score_cache.load_state_dict(self._cache_state)
        state_dict = own_rank_state(state_dict)
        self.selector.load_state_dict(state_dict.get("selector", {}))
        self.step_log.examples_seen = int(state_dict.get("examples_seen", 0))
        self.step_log.examples_backpropagated = int(state_dict.get("examples_backpropagated", 0))
        self.step_log.selective_steps = int(state_dict.get("selective_steps", 0))

    # ------------------------------------------------------------------ the step

    def is_selective_step(self, step: int) -> bool:
        """Whether optimiser step ``step`` selects: the same answer on every rank."""
        return self.schedule.is_active(step, self._total_steps)

    def _patch(self, pl_module: pl.LightningModule) -> None:
        self._unpatch.append(_wrap_method(pl_module, "training_step", self._training_step))
        if self.stale_epochs:
            self._unpatch.append(_wrap_method(pl_module, "on_before_batch_transfer", self._before_batch_transfer))

    def _before_batch_transfer(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Read the batch's example indices while they are still on the host, for the stale-score cache."""
        batch = original(*args, **kwargs)
        indices = self.example_indices(batch)
        self._host_indices = indices if indices is not None and indices.device.type == "cpu" else None
        return batch

    def _take_host_indices(self, size: int) -> Tensor | None:
        indices, self._host_indices = self._host_indices, None
        return indices if indices is not None and indices.shape[0] == size else None

    def _training_step(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        batch = args[0] if args else kwargs["batch"]
        trainer = pl_module.trainer
        size = self.batch_size(batch)
        host_indices = self._take_host_indices(size)
        k = subset_size(self.keep, size, self._min_k)
        # Under DDP a rank whose batch is too small to select from still scores and trains on all of it, so that
        # every rank runs the same forward passes (and the collectives in them, as in SyncBatchNorm).
        selective = self.is_selective_step(trainer.global_step)
        if selective and k >= size:
            self._report_small_batch(trainer, size, k)
        self._largest_batch = max(self._largest_batch, size)
        if not selective or (k >= size and trainer.world_size == 1):
            output = original(*args, **kwargs)
            self.step_log.full_step(pl_module, size, trained=_returns_a_loss(output))
            return output

        picked = self._select(pl_module, batch, k, host_indices)
        self.last_selection = picked.selection
        subset = self.index_batch(batch, picked.selection.indices)
        rest = args[1:] if args else ()
        call_args = (subset, *rest) if args else ()
        call_kwargs = kwargs if args else {**kwargs, "batch": subset}
        output = self._subset_step(pl_module, original, picked.selection, call_args, call_kwargs)
        self.step_log.selective_step(
            pl_module,
            size,
            picked.selection,
            picked.losses,
            picked.measured,
            picked.marks,
            trained=_returns_a_loss(output),
        )
        return output

    @torch.compiler.disable
    def _select(self, pl_module: pl.LightningModule, batch: Any, k: int, host_indices: Tensor | None) -> SelectedBatch:
        # Kept out of any compiled graph: selection is data-dependent and would recompile or break the graph.
        ordinal = self.step_log.selective_steps
        return self.step.run(pl_module, batch, k, ordinal=ordinal, batch_idx=self._batch_idx, host_indices=host_indices)

    def _report_small_batch(self, trainer: pl.Trainer, size: int, k: int) -> None:
        """Warn, once per fit, that a batch was too small to select from; not for a DDP rank's short last batch."""
        if self._reported_small_batch or (trainer.world_size > 1 and size < self._largest_batch):
            return
        self._reported_small_batch = True
        rank_zero_warn(
            f"SelectiveBackprop cannot select from a batch of {size} examples with keep={self.keep}: k = {k} "
            f"(floor(keep * N), at least {self._min_k}, at most N) keeps every example, so such steps train on the "
            "whole batch. Use larger batches or a smaller keep."
        )

    def _subset_step(
        self,
        pl_module: pl.LightningModule,
        original: Callable[..., Any],
        selection: Selection,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> Any:
        if not isinstance(pl_module, SelectiveBackpropMixin):
            return original(*args, **kwargs)
        with subset_weights(selection.weights) as subset:
            output = original(*args, **kwargs)
        if self.selector.weighted and not subset.applied:
            raise RuntimeError(
                f"{type(pl_module).__name__}.training_step did not reduce its losses with self.sbp_reduce, so the "
                f"weights of selector {type(self.selector).__name__} would be lost; reduce per-example losses with "
                "`loss = self.sbp_reduce(per_example_losses)`"
            )
        return output


def _wrap_method(pl_module: pl.LightningModule, name: str, wrapper: Callable[..., Any]) -> Callable[[], None]:
    """Route ``pl_module.<name>`` through ``wrapper(pl_module, original, *args, **kwargs)``; returns the undo.

    The instance attribute keeps the original's signature (``functools.wraps``), which Lightning inspects.
    """
    original = getattr(pl_module, name)

    @functools.wraps(original)
    def method(*args: Any, **kwargs: Any) -> Any:
        return wrapper(pl_module, original, *args, **kwargs)

    setattr(pl_module, name, method)

    def undo() -> None:
        if pl_module.__dict__.get(name) is method:
            delattr(pl_module, name)

    return undo


def _returns_a_loss(output: Any) -> bool:
    """Whether a ``training_step`` returned a loss: Lightning skips the backward of a step that returns ``None``."""
    return output is not None
