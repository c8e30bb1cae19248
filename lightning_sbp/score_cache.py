"""Stale scores: per-example scores kept by example index and reused for a number of epochs."""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any, cast

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import default_collate

from lightning_sbp.distributed import SCORE_FIELDS, gather_scores
from lightning_sbp.selectors.base import Scores

__all__ = ["ScoreCache", "gather_scores", "score_cache_for"]

_NEVER = -(2**31)  # the scored epoch of an example not scored yet


class ScoreCache:
    """Scores of every example of a dataset, with the epoch that computed them.

    A score computed in epoch ``t`` is fresh through epoch ``t + stale_epochs``. Tensors are
    allocated on the device of the first scores stored and hold one row per example, so the
    cache never outgrows the dataset.

    Args:
        size: number of examples in the training set; indices are in ``[0, size)``.
        stale_epochs: how many epochs after the one that computed it a score is reused.
    """

    def __init__(self, size: int, stale_epochs: int) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if stale_epochs < 1:
            raise ValueError(f"stale_epochs must be positive, got {stale_epochs}")
        self.size = size
        self.stale_epochs = stale_epochs
        self.tensors: dict[str, Tensor] = {}
        self.bias = True

    def lookup(self, indices: Tensor, epoch: int) -> Scores | None:
        """The cached scores of ``indices`` if every one of them is fresh in ``epoch``, else ``None``.

        Deciding whether the forward pass can be skipped reads one flag on the host: the only
        synchronisation stale scores add, paid on the steps that save a forward pass.
        """
        scored = self.tensors.get("scored_epoch")
        if scored is None:
            return None
        if scored.device != indices.device:
            self.tensors = {name: tensor.to(indices.device) for name, tensor in self.tensors.items()}
            scored = self.tensors["scored_epoch"]
        age = epoch - scored[indices]
        if not bool(((age >= 0) & (age <= self.stale_epochs)).all()):
            return None
        rows = {name: self.tensors[name][indices] for name in SCORE_FIELDS if name in self.tensors}
        return Scores(bias=self.bias, **rows)

    def lookup_on_every_rank(self, indices: Tensor, epoch: int, trainer: pl.Trainer) -> Scores | None:
        """:meth:`lookup`, agreed across ranks: the cached scores only if every rank's batch is fresh.

        Every rank skips the scoring forward or none does, so the collectives inside it
        (SyncBatchNorm) stay paired.
        """
        cached = self.lookup(indices, epoch)
        if trainer.world_size > 1:
            hit = trainer.strategy.reduce_boolean_decision(cached is not None, all=True)
            return cached if hit else None
        return cached

    def store_from_every_rank(self, indices: Tensor, scores: Scores, epoch: int, trainer: pl.Trainer) -> None:
        """:meth:`store` every rank's scores on every rank: a collective under DDP.

        Each rank sees other examples in every epoch; storing all ranks' scores in every rank's
        cache is what lets a later batch find all of its examples fresh.
        """
        if trainer.world_size > 1:
            indices, scores = gather_scores(indices, scores)
        self.store(indices, scores, epoch)

    def store(self, indices: Tensor, scores: Scores, epoch: int) -> None:
        """Remember ``scores`` for the examples ``indices``, computed in ``epoch``."""
        self.bias = scores.bias
        values = {name: getattr(scores, name) for name in SCORE_FIELDS if getattr(scores, name) is not None}
        if "scored_epoch" not in self.tensors or any(name not in self.tensors for name in values):
            self._allocate(values, indices.device)
        for name, value in values.items():
            self.tensors[name][indices] = value.to(self.tensors[name].dtype)
        self.tensors["scored_epoch"][indices] = epoch

    def _allocate(self, values: dict[str, Tensor], device: torch.device) -> None:
        self.tensors = {
            name: torch.zeros((self.size, *value.shape[1:]), dtype=torch.float32, device=device)
            for name, value in values.items()
        }
        self.tensors["scored_epoch"] = torch.full((self.size,), _NEVER, dtype=torch.long, device=device)

    def state_dict(self) -> dict[str, Any]:
        """The rows of the examples scored so far, on the CPU: ``{"bias", "indices", "rows"}``."""
        scored = self.tensors.get("scored_epoch")
        if scored is None:
            return {"bias": self.bias, "indices": torch.empty(0, dtype=torch.long), "rows": {}}
        filled = (scored > _NEVER).nonzero().flatten()
        rows = {name: tensor[filled].cpu() for name, tensor in self.tensors.items()}
        return {"bias": self.bias, "indices": filled.cpu(), "rows": rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; tensors move to the data's device at the next lookup.

        Raises:
            ValueError: if the state holds examples beyond this cache's ``size``.
        """
        self.bias = bool(state.get("bias", True))
        indices = torch.as_tensor(state.get("indices", []), dtype=torch.long)
        rows: dict[str, Tensor] = dict(state.get("rows", {}))
        self.tensors = {}
        if indices.numel() == 0 or "scored_epoch" not in rows:
            return
        if int(indices.max()) >= self.size:
            raise ValueError(
                f"the saved score cache holds example {int(indices.max())}, beyond this training set of "
                f"{self.size} examples: the checkpoint was written for other training data"
            )
        self._allocate({name: row for name, row in rows.items() if name != "scored_epoch"}, torch.device("cpu"))
        for name, row in rows.items():
            self.tensors[name][indices] = row.to(self.tensors[name].dtype)


def score_cache_for(
    trainer: pl.Trainer, stale_epochs: int, example_indices: Callable[[Any], Tensor | None]
) -> ScoreCache:
    """A cache sized for the trainer's training set, once the fit loop has set up its data.

    Args:
        trainer: a trainer whose ``train_dataloader`` is set (from ``on_train_start`` on).
        stale_epochs: how many epochs after the one that computed it a score is reused.
        example_indices: reads the dataset indices of a batch (``SelectiveBackprop.example_indices``).

    Raises:
        ValueError: if the training examples carry no dataset index.
    """
    dataset = getattr(trainer.train_dataloader, "dataset", None)
    example = dataset[0] if dataset is not None else None
    if dataset is None or example_indices(default_collate([example])) is None:
        raise ValueError(
            "stale_epochs needs training batches that carry each example's dataset index, as "
            "(inputs, targets, indices) tuples or dicts with an 'index' key, to cache scores by example; "
            f"the training data yields {type(example).__name__} examples without one. The recipes' DataModules "
            "return indices; wrap your dataset to return them, or override SelectiveBackprop.example_indices"
        )
    return ScoreCache(len(cast(Sized, dataset)), stale_epochs)
