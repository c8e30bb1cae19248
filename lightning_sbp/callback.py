"""The Selective Backprop callback: score every example, backpropagate a selected subset."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any, Literal, cast

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from lightning_sbp.functional.batch import batch_size, example_indices, index_batch, subset_size
from lightning_sbp.functional.resize import downscale
from lightning_sbp.mixin import SelectiveBackpropMixin, default_forward
from lightning_sbp.schedule import Schedule
from lightning_sbp.score_cache import ScoreCache, gather_scores
from lightning_sbp.scoring import (
    LastLayerCapture,
    cpu_has_fast_kernels,
    find_last_linear,
    has_batch_norm,
    logit_gradients_by_autograd,
    scoring_mode,
)
from lightning_sbp.selectors import Scores, Selection, Selector, available_selectors, get_selector
from lightning_sbp.strategies import check_private_parameters, check_strategy
from lightning_sbp.tracking import Forward, GradientErrorTracker, LossFn, subset_and_full_gradients

__all__ = ["SelectiveBackprop"]

ScoreMode = Literal["train", "eval"]
ScorePrecision = Literal["same", "bf16", "16"]
SCORE_DTYPES: dict[str, torch.dtype | None] = {"same": None, "bf16": torch.bfloat16, "16": torch.float16}


def per_example_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Softmax cross-entropy per example: the default scoring loss of the patch path."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part, the same in every process (no salted ``hash``)."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = ((state ^ (part & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def training_dataset(trainer: pl.Trainer) -> Dataset | None:
    """The dataset behind the trainer's training data, when it can be found before the first step."""
    datamodule = getattr(trainer, "datamodule", None)
    loader: Any = datamodule.train_dataloader() if datamodule is not None else None
    if loader is None:
        source = getattr(trainer.fit_loop, "_data_source", None)
        loader = source.dataloader() if source is not None and source.is_defined() else None
    return getattr(loader, "dataset", None)


class SelectiveBackprop(Callback):
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
            mixin; per-example cross-entropy when omitted.
        last_layer: qualified name of the final ``nn.Linear`` whose gradients selectors and
            metrics read; the last ``nn.Linear`` registered when omitted.
        track_grad_error: measure, on every selective step, how well the subset's last-layer gradient
            approximates the full batch's (``sbp/grad_error_step`` and ``_epoch``), what a random subset
            of the same size would give (``sbp/grad_error_random_*``) and their ratio
            (``sbp/grad_error_ratio_*``).
        exact_grad_error_every: every this many selective steps, also log ``sbp/grad_error_exact_*``,
            the same error over all trainable parameters from two extra backward passes; ``0`` never.
        score_precision: ``"same"`` scores under the trainer's precision; ``"bf16"`` or ``"16"``
            score under autocast to bfloat16 or float16, whatever the training precision.
        score_scale: the scoring pass sees inputs resampled to this fraction of their spatial size,
            ``0 < score_scale <= 1``; the subset pass always sees the full inputs.
        stale_epochs: reuse each example's scores for this many epochs after the one that computed
            them, skipping the scoring pass on batches whose scores are all fresh; ``0`` never.
            Needs batches that carry example indices (see :meth:`example_indices`).

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
        self.selector = selector
        self.keep = float(keep)
        self.score_precision = score_precision
        self.score_scale = float(score_scale)
        self.stale_epochs = stale_epochs
        self.score_cache: ScoreCache | None = None
        self.schedule = Schedule(start, end, interrupt)
        self.score_mode = score_mode
        self.seed = seed
        self.loss_fn = loss_fn
        self.last_layer = last_layer
        self.track_grad_error = track_grad_error
        self.exact_grad_error_every = exact_grad_error_every
        self.examples_seen = 0
        self.selective_steps = 0
        self.examples_backpropagated = 0
        self.last_selection: Selection | None = None
        self._capture: LastLayerCapture | None = None
        self._tracker: GradientErrorTracker | None = None
        self._min_k = 1
        self._total_steps: float = float("inf")
        self._nonfinite: Tensor | None = None
        self._warned_nonfinite = False
        self._unpatch: Callable[[], None] | None = None
        self._cache_state: dict[str, Any] | None = None

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
        self._capture = self._find_last_layer(pl_module)
        self._tracker = GradientErrorTracker() if self.track_grad_error and self._capture is not None else None
        self._min_k = 2 if has_batch_norm(pl_module) else 1
        self.selector.setup(pl_module)
        self._warn_slow_score_precision(trainer)
        if self.stale_epochs:
            self.score_cache = self._make_score_cache(trainer)
        self._patch(pl_module)

    def _warn_slow_score_precision(self, trainer: pl.Trainer) -> None:
        dtype = SCORE_DTYPES[self.score_precision]
        if dtype is None or trainer.strategy.root_device.type != "cpu" or cpu_has_fast_kernels(dtype) is not False:
            return
        rank_zero_warn(
            f"score_precision={self.score_precision!r}: this CPU has no fast {dtype} kernels "
            f"({torch.backends.cpu.get_cpu_capability()}), so the scoring pass will likely be slower than in "
            "float32, not faster; low-precision scoring pays off on GPUs and on CPUs with AVX-512 or AMX"
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix the selective window for this run's length."""
        self._total_steps = float(trainer.estimated_stepping_batches)
        self.schedule.window(self._total_steps)
        if self._tracker is not None:
            self._tracker.to(pl_module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Warn, once and without a sync on every step, when losses were not finite."""
        if self._should_log(trainer):
            self._warn_nonfinite()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Warn when losses were not finite."""
        self._warn_nonfinite()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module its own ``training_step`` back."""
        if self._unpatch is not None:
            self._unpatch()
            self._unpatch = None

    def state_dict(self) -> dict[str, Any]:
        """Selector state, the count of examples seen and backpropagated, and the score cache.

        Under DDP each rank keeps its own selector state and counts (the loss history of ``loss``)
        and Lightning writes rank 0's checkpoint only: they are gathered (a collective, as
        ``Trainer.save_checkpoint`` is called on every rank) and saved as ``{"ranks": [...]}``. The
        score cache holds every rank's scores on every rank, so rank 0's is saved.
        """
        state: dict[str, Any] = {
            "selector": self.selector.state_dict(),
            "examples_seen": self.examples_seen,
            "examples_backpropagated": self.examples_backpropagated,
            "selective_steps": self.selective_steps,
        }
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            ranks: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(ranks, state)
            state = {"ranks": ranks}
        state["score_cache"] = None if self.score_cache is None else self.score_cache.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; under DDP each rank takes its own selector state and counts.

        A run resumed on a different number of ranks gives rank ``r`` the state of saved rank
        ``r`` modulo the saved count.
        """
        self._cache_state = state_dict.get("score_cache")
        if self.score_cache is not None and self._cache_state is not None:
            self.score_cache.load_state_dict(self._cache_state)
        ranks = state_dict.get("ranks")
        if ranks:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            state_dict = ranks[rank % len(ranks)]
        self.selector.load_state_dict(state_dict.get("selector", {}))
        self.examples_seen = int(state_dict.get("examples_seen", 0))
        self.examples_backpropagated = int(state_dict.get("examples_backpropagated", 0))
        self.selective_steps = int(state_dict.get("selective_steps", 0))

    # ------------------------------------------------------------------ batch hooks a subclass can override

    def batch_size(self, batch: Any) -> int:
        """The number of examples in ``batch``; override for batch types other than tensors, tuples and dicts."""
        return batch_size(batch)

    def index_batch(self, batch: Any, indices: Tensor) -> Any:
        """The rows ``indices`` of ``batch``; override for batch types other than tensors, tuples and dicts."""
        return index_batch(batch, indices)

    def example_indices(self, batch: Any) -> Tensor | None:
        """The dataset indices of the batch's examples, for ``stale_epochs``; override for other batch layouts."""
        return example_indices(batch)

    def scale_inputs(self, batch: Any, scale: float) -> Any:
        """The batch the scoring pass sees with ``score_scale < 1``: its inputs downscaled.

        The inputs are the first element of a tuple or list batch, or the first floating-point
        tensor of a mapping. Override for other layouts.

        Raises:
            ValueError: if the inputs have no spatial dimensions to downscale, naming their shape.
        """
        if isinstance(batch, Mapping):
            key = next(
                (key for key, value in batch.items() if isinstance(value, Tensor) and value.is_floating_point()), None
            )
            if key is None:
                raise ValueError("score_scale < 1 found no floating-point inputs in the dict batch to downscale")
            return {**batch, key: downscale(batch[key], scale)}
        if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
            items = [downscale(batch[0], scale), *batch[1:]]
            return items if isinstance(batch, list) else tuple(items)
        return downscale(batch, scale)

    # ------------------------------------------------------------------ the step

    def is_selective_step(self, step: int) -> bool:
        """Whether optimiser step ``step`` selects: the same answer on every rank."""
        return self.schedule.is_active(step, self._total_steps)

    def _make_score_cache(self, trainer: pl.Trainer) -> ScoreCache:
        dataset = training_dataset(trainer)
        example = dataset[0] if dataset is not None else None
        if dataset is None or self.example_indices(default_collate([example])) is None:
            raise ValueError(
                "stale_epochs needs training batches that carry each example's dataset index, as "
                "(inputs, targets, indices) tuples or dicts with an 'index' key, to cache scores by example; "
                f"the training data yields {type(example).__name__} examples without one. The recipes' DataModules "
                "return indices; wrap your dataset to return them, or override SelectiveBackprop.example_indices"
            )
        cache = ScoreCache(len(cast(Sized, dataset)), self.stale_epochs)
        if self._cache_state is not None:
            cache.load_state_dict(self._cache_state)
        return cache

    def _find_last_layer(self, pl_module: pl.LightningModule) -> LastLayerCapture | None:
        if not (self.selector.needs_last_layer or self.track_grad_error):
            return None
        try:
            name, layer = find_last_linear(pl_module, self.last_layer)
        except ValueError as error:
            if self.selector.needs_last_layer or self.last_layer is not None:
                raise
            rank_zero_warn(f"SelectiveBackprop does not track gradient errors: {error}")
            return None
        return LastLayerCapture(layer, name)

    def _patch(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            return self._training_step(pl_module, original, *args, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]

        def unpatch() -> None:
            if pl_module.__dict__.get("training_step") is training_step:
                del pl_module.training_step

        self._unpatch = unpatch

    def _training_step(
        self, pl_module: pl.LightningModule, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        batch = args[0] if args else kwargs["batch"]
        trainer = pl_module.trainer
        size = self.batch_size(batch)
        k = subset_size(self.keep, size, self._min_k)
        # Under DDP a rank whose batch is too small to select from still scores and trains on all of it, so that
        # every rank runs the same forward passes (and the collectives in them, as in SyncBatchNorm).
        if not self.is_selective_step(trainer.global_step) or (k >= size and trainer.world_size == 1):
            self._account(size, size)
            if self._should_log(trainer):
                self._log_step(pl_module, {"sbp/active": 0.0, "sbp/k": float(size)}, size)
            return original(*args, **kwargs)

        started = time.perf_counter()
        scores, cheap = self._cheap_scores(pl_module, batch)
        scored = time.perf_counter()
        selection = self._select(trainer, scores, k)
        selected = time.perf_counter()
        self.last_selection = selection

        subset = self.index_batch(batch, selection.indices)
        values: dict[str, Any] = {}
        if self._tracker is not None:
            # Selection quality is measured against the full batch as the trainer would score it.
            true_scores = self._score(pl_module, batch) if cheap else scores
            every = self.exact_grad_error_every
            exact = None
            if every and self.selective_steps % every == 0:
                forward, loss_fn = self._forward_and_loss(pl_module)
                exact = functools.partial(
                    subset_and_full_gradients, pl_module, forward, loss_fn, batch, subset, selection.weights
                )
            values.update(self._tracker.measure(pl_module, true_scores, selection, exact))
        rest = args[1:] if args else ()
        call_args = (subset, *rest) if args else ()
        call_kwargs = kwargs if args else {**kwargs, "batch": subset}
        output = self._subset_step(pl_module, original, selection, call_args, call_kwargs)

        self._track_nonfinite(scores.losses)
        self._account(size, k)
        self.selective_steps += 1
        if self._should_log(trainer):
            finite = torch.isfinite(scores.losses)
            kept = finite[selection.indices]
            values.update(
                {
                    "sbp/active": 1.0,
                    "sbp/k": float(k),
                    "sbp/full_loss": scores.losses.where(finite, torch.nan).nanmean(),
                    "sbp/selected_loss": scores.losses[selection.indices].where(kept, torch.nan).nanmean(),
                    "sbp/score_ms": 1e3 * (scored - started),
                    "sbp/select_ms": 1e3 * (selected - scored),
                }
            )
            self._log_step(pl_module, values, size)
        return output

    @staticmethod
    def _should_log(trainer: pl.Trainer) -> bool:
        """Whether the loggers write this step: step values logged on other steps would only be overwritten."""
        connector = getattr(trainer, "_logger_connector", None)
        return bool(getattr(connector, "should_update_logs", True))

    def _log_step(self, pl_module: pl.LightningModule, values: dict[str, Any], size: int) -> None:
        values["sbp/backprop_fraction"] = self.examples_backpropagated / self.examples_seen
        pl_module.log_dict(values, on_step=True, on_epoch=False, batch_size=size)

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
        pl_module._sbp_weights = selection.weights
        pl_module._sbp_reduced = False
        try:
            output = original(*args, **kwargs)
        finally:
            pl_module._sbp_weights = None
        if self.selector.weighted and not pl_module._sbp_reduced:
            raise RuntimeError(
                f"{type(pl_module).__name__}.training_step did not reduce its losses with self.sbp_reduce, so the "
                f"weights of selector {type(self.selector).__name__} would be lost; reduce per-example losses with "
                "`loss = self.sbp_reduce(per_example_losses)`"
            )
        return output

    def _forward_and_loss(self, pl_module: pl.LightningModule) -> tuple[Forward, LossFn]:
        if isinstance(pl_module, SelectiveBackpropMixin):
            return pl_module.sbp_forward, pl_module.sbp_loss
        return functools.partial(default_forward, pl_module), self.loss_fn or per_example_cross_entropy

    def _cheap_scores(self, pl_module: pl.LightningModule, batch: Any) -> tuple[Scores, bool]:
        """Scores as the options make them: cached, rescaled or at lower precision; and whether they are."""
        cheap = self.score_precision != "same" or self.score_scale < 1.0
        cache, epoch = self.score_cache, pl_module.current_epoch
        indices = None
        if cache is not None:
            indices = self.example_indices(batch)
            if indices is None:
                raise ValueError("stale_epochs needs batches that carry example indices; this batch has none")
            cached = cache.lookup(indices, epoch)
            # Every rank skips the scoring forward or none does, so collectives inside it (SyncBatchNorm) stay paired.
            if pl_module.trainer.world_size > 1:
                hit = pl_module.trainer.strategy.reduce_boolean_decision(cached is not None, all=True)
                cached = cached if hit else None
            if cached is not None:
                return cached, True
        scaled = self.scale_inputs(batch, self.score_scale) if self.score_scale < 1.0 else batch
        dtype = SCORE_DTYPES[self.score_precision]
        with torch.autocast(pl_module.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            scores = self._score(pl_module, scaled)
        if cache is not None and indices is not None:
            # Every rank caches every rank's scores: each sees other examples in every epoch.
            shared = gather_scores(indices, scores) if pl_module.trainer.world_size > 1 else (indices, scores)
            cache.store(*shared, epoch)
        return scores, cheap

    def _score(self, pl_module: pl.LightningModule, batch: Any) -> Scores:
        forward, loss_fn = self._forward_and_loss(pl_module)
        capture = self._capture
        with scoring_mode(pl_module, self.score_mode), capture.armed() if capture else contextlib.nullcontext():
            logits, targets = forward(batch)
            losses = loss_fn(logits, targets).detach().float()
        if torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu"):
            torch.clear_autocast_cache()
        if capture is None:
            return Scores(losses=losses, logits=logits.detach())
        features = capture.take(logits)
        bias = capture.layer.bias is not None
        logit_grads = logit_gradients_by_autograd(loss_fn, logits, targets)
        return Scores(
            losses=losses, logits=logits.detach(), logit_grads=logit_grads, features=features.float(), bias=bias
        )

    @torch.compiler.disable
    def _select(self, trainer: pl.Trainer, scores: Scores, k: int) -> Selection:
        # Kept out of any compiled graph: selection is data-dependent and would recompile or break the graph.
        if k >= scores.size:
            return Selection.uniform(torch.arange(scores.size, device=scores.losses.device))
        return self.selector.select(scores, k, self._generator(trainer, scores.losses.device))

    def _generator(self, trainer: pl.Trainer, device: torch.device) -> torch.Generator:
        batch_in_epoch = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        seed = mix_seed(self.seed, trainer.global_rank, trainer.global_step, batch_in_epoch)
        return torch.Generator(device=device).manual_seed(seed)

    def _account(self, seen: int, backpropagated: int) -> None:
        self.examples_seen += seen
        self.examples_backpropagated += backpropagated

    def _track_nonfinite(self, losses: Tensor) -> None:
        flag = ~torch.isfinite(losses).all()
        self._nonfinite = flag if self._nonfinite is None else self._nonfinite | flag

    def _warn_nonfinite(self) -> None:
        if self._warned_nonfinite or self._nonfinite is None:
            return
        if bool(self._nonfinite):
            self._warned_nonfinite = True
            rank_zero_warn(
                "SelectiveBackprop saw NaN or inf per-example losses; those examples rank last in selection "
                "and are left out of the logged losses. Check the learning rate, the data and the loss."
            )
        self._nonfinite = None
