"""Stale scores: per-example scores kept by example index and reused for a number of epochs."""

from __future__ import annotations

from collections.abc import Callable, Sized
from typing import Any, Literal, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from lightning_sbp.distributed import SCORE_FIELDS, gather_scores
from lightning_sbp.selectors.base import Scores, Selector

__all__ = [
    "STORAGE_DTYPES",
    "Placement",
    "ScoreCache",
    "StorageDtype",
    "fields_read_by",
    "gather_scores",
    "score_cache_for",
]

_NEVER = -(2**31)  # the scored epoch of an example not scored yet


Placement = Literal["device", "cpu"]
StorageDtype = Literal["float32", "bfloat16", "float16"]
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_STAMP_BYTES = 4  # the int32 epoch stamp of every example, kept on the host


def fields_read_by(selector: Selector) -> tuple[str, ...]:
    """The score fields a selector reads: losses, and the last layer's inputs and logit gradients if it needs them."""
    return ("losses", "logit_grads", "features") if selector.needs_last_layer else ("losses",)


class ScoreCache:
    """Scores of every example of a dataset, with the epoch that computed them.

    A score computed in epoch ``t`` is fresh through epoch ``t + stale_epochs``. Only ``fields``
    are kept, one row per example, so the cache never outgrows the dataset. Its size in bytes is

    ``size * (4 + itemsize(dtype) * sum(width of each field))``

    with width 1 for ``losses``, ``C`` (classes) for ``logit_grads`` and ``D`` (inputs of the final
    linear layer) for ``features``: the 4 bytes are each example's epoch stamp, kept on the host so
    that the skip-or-score decision reads no device memory when the batch's example indices are on
    the host. With ``losses`` alone in float32, that is 8 bytes per example, 8 MB per million.

    Args:
        size: number of examples in the training set; indices are in ``[0, size)``.
        stale_epochs: how many epochs after the one that computed it a score is reused.
        fields: the score fields to keep (see :func:`fields_read_by`).
        dtype: storage dtype of the scores; they are handed back in float32.
        placement: ``"device"`` keeps the scores on the device of the first scores stored;
            ``"cpu"`` keeps them in host memory (pinned when CUDA is available), which frees device
            memory at the price of a copy to the host on every scored step.
    """

    def __init__(
        self,
        size: int,
        stale_epochs: int,
        fields: tuple[str, ...] = SCORE_FIELDS,
        dtype: torch.dtype = torch.float32,
        placement: Placement = "device",
    ) -> None:
        if size < 1:
            raise ValueError(f"size must be positive, got {size}")
        if stale_epochs < 1:
            raise ValueError(f"stale_epochs must be positive, got {stale_epochs}")
        unknown = set(fields) - set(SCORE_FIELDS)
        if unknown or not fields:
            raise ValueError(f"fields must be some of {', '.join(SCORE_FIELDS)}; got {fields!r}")
        if placement not in ("device", "cpu"):
            raise ValueError(f"placement must be 'device' or 'cpu', got {placement!r}")
        self.size = size
        self.stale_epochs = stale_epochs
        self.fields = tuple(fields)
        self.dtype = dtype
        self.placement = placement
        self.tensors: dict[str, Tensor] = {}
        self.bias = True
        self._scored = np.full(size, _NEVER, dtype=np.int32)
        self._rows: tuple[Tensor, np.ndarray] | None = None

    @staticmethod
    def nbytes_for(size: int, widths: dict[str, int], dtype: torch.dtype) -> int:
        """The cache's size in bytes for ``size`` examples and the ``widths`` of the kept fields."""
        return size * (_STAMP_BYTES + torch.finfo(dtype).bits // 8 * sum(widths.values()))

    @property
    def scored_epochs(self) -> Tensor:
        """The epoch that scored each example, ``-2**31`` for examples not scored yet: a view of the host stamps."""
        return torch.from_numpy(self._scored)

    @property
    def nbytes(self) -> int:
        """Bytes held now: the epoch stamps and the score tensors allocated so far."""
        return self._scored.nbytes + sum(tensor.nbytes for tensor in self.tensors.values())

    def _host_rows(self, indices: Tensor, host: Tensor | None = None) -> np.ndarray:
        """The batch's example indices as a host array, without a copy when they are known on the host.

        ``host`` is the same indices read before the batch moved to the device. Without it, host ``indices``
        are free and device ``indices`` cost one copy to the host (a synchronisation), kept so that
        :meth:`store` after a :meth:`lookup` miss of the same batch does not pay it again.
        """
        if host is not None:
            return self._checked(host.numpy())
        if self._rows is not None and self._rows[0] is indices:
            return self._rows[1]
        rows = self._checked((indices if indices.device.type == "cpu" else indices.cpu()).numpy())
        self._rows = (indices, rows)
        return rows

    def _checked(self, rows: np.ndarray) -> np.ndarray:
        """``rows``, once they are known to be positions in the training set (negative ones mark padding).

        Raises:
            ValueError: for an index at or beyond the training set's length, which would read or write
                another example's scores, or fail deep inside indexing.
        """
        if rows.size and rows.max() >= self.size:
            raise ValueError(
                f"stale_epochs caches scores by each example's dataset index, a position in [0, {self.size}) for "
                f"this training set of {self.size} examples, but a batch carries index {int(rows.max())}: return "
                "the example's position in the dataset as its index (the recipes' DataModules do), or override "
                "SelectiveBackprop.example_indices to read it"
            )
        return rows

    def lookup(self, indices: Tensor, epoch: int, host: Tensor | None = None) -> Scores | None:
        """The cached scores of ``indices`` if every one of them is fresh in ``epoch``, else ``None``.

        The decision reads the epoch stamps on the host: nothing is read from the device when the indices
        are known on the host (``host``, or ``indices`` themselves on the CPU). Device-placed scores are
        gathered on the device; host-placed ones into pinned memory, then copied without blocking. The
        scores come back in float32 on the device of ``indices``.
        """
        if not self.tensors:
            return None
        self._place(indices.device)
        rows = self._host_rows(indices, host)
        if rows.size and rows.min() < 0:  # only the padding of a gather across ranks is negative, never a batch's
            raise ValueError(
                f"stale_epochs caches scores by each example's dataset index, a position in [0, {self.size}), but "
                f"a batch carries index {int(rows.min())}: return the example's position in the dataset as its index"
            )
        age = epoch - self._scored[rows]
        if not ((age >= 0) & (age <= self.stale_epochs)).all():
            return None
        found = {}
        for name, tensor in self.tensors.items():
            if self.placement == "cpu":
                staged = torch.empty((len(rows), *tensor.shape[1:]), dtype=tensor.dtype, pin_memory=tensor.is_pinned())
                torch.index_select(tensor, 0, torch.from_numpy(rows), out=staged)
                picked = staged.to(indices.device, non_blocking=True)
            else:
                picked = tensor.index_select(0, indices)
            found[name] = picked.float()
        return Scores(bias=self.bias, **found)

    def store(self, indices: Tensor, scores: Scores, epoch: int, host: Tensor | None = None) -> None:
        """Remember the kept fields of ``scores`` for the examples ``indices``, computed in ``epoch``.

        Rows whose index is negative (the padding of a gather across ranks) are left out. ``host`` is the
        same indices known on the host (see :meth:`lookup`).
        """
        self.bias = scores.bias
        values = {name: getattr(scores, name) for name in self.fields if getattr(scores, name) is not None}
        if any(name not in self.tensors for name in values):
            self._allocate(values, indices.device)
        self._place(indices.device)
        rows = self._host_rows(indices, host)
        if (rows < 0).any():
            kept = np.flatnonzero(rows >= 0)
            positions = torch.from_numpy(kept).to(indices.device, non_blocking=True)
            indices, rows = indices.index_select(0, positions), rows[kept]
            values = {name: value.index_select(0, positions.to(value.device)) for name, value in values.items()}
        for name, value in values.items():
            tensor = self.tensors[name]
            where = torch.from_numpy(rows) if self.placement == "cpu" else indices
            tensor[where] = value.to(tensor.device, self.dtype)
        self._scored[rows] = epoch

    def _place(self, device: torch.device) -> None:
        """Move device-placed scores to ``device`` (once, after a checkpoint restored them on the CPU)."""
        if self.placement == "device":
            for name, tensor in self.tensors.items():
                if tensor.device != device:
                    self.tensors[name] = tensor.to(device)

    def _allocate(self, values: dict[str, Tensor], device: torch.device) -> None:
        if self.placement == "cpu":
            device = torch.device("cpu")
        pin = self.placement == "cpu" and torch.cuda.is_available()
        self.tensors = {
            name: torch.zeros((self.size, *value.shape[1:]), dtype=self.dtype, device=device, pin_memory=pin)
            for name, value in values.items()
        }

    def state_dict(self) -> dict[str, Any]:
        """The rows of the examples scored so far, on the CPU: ``{"bias", "indices", "rows"}``."""
        if not self.tensors:
            return {"bias": self.bias, "indices": torch.empty(0, dtype=torch.long), "rows": {}}
        filled = torch.from_numpy(np.flatnonzero(self._scored > _NEVER))
        rows = {name: tensor[filled.to(tensor.device)].cpu() for name, tensor in self.tensors.items()}
        rows["scored_epoch"] = torch.from_numpy(self._scored[filled.numpy()]).long()
        return {"bias": self.bias, "indices": filled, "rows": rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; tensors move to the data's device at the next lookup.

        Raises:
            ValueError: if the state holds examples beyond this cache's ``size``.
        """
        self.bias = bool(state.get("bias", True))
        indices = torch.as_tensor(state.get("indices", []), dtype=torch.long)
        rows: dict[str, Tensor] = dict(state.get("rows", {}))
        self.tensors = {}
        self._scored[:] = _NEVER
        if indices.numel() == 0 or "scored_epoch" not in rows:
            return
        if int(indices.max()) >= self.size:
            raise ValueError(
                f"the saved score cache holds example {int(indices.max())}, beyond this training set of "
                f"{self.size} examples: the checkpoint was written for other training data"
            )
        kept = {name: row for name, row in rows.items() if name in self.fields}
        self._allocate(kept, torch.device("cpu"))
        for name, row in kept.items():
            self.tensors[name][indices] = row.to(self.dtype)
        self._scored[indices.numpy()] = rows["scored_epoch"].numpy()

    def lookup_on_every_rank(
        self, indices: Tensor, epoch: int, trainer: pl.Trainer, host: Tensor | None = None
    ) -> Scores | None:
        """:meth:`lookup`, agreed across ranks: the cached scores only if every rank's batch is fresh.

        Every rank skips the scoring forward or none does, so the collectives inside it
        (SyncBatchNorm) stay paired. Agreeing is a collective whose answer the host reads: the one
        synchronisation of a step with stale scores under DDP.
        """
        cached = self.lookup(indices, epoch, host)
        if trainer.world_size > 1:
            hit = trainer.strategy.reduce_boolean_decision(cached is not None, all=True)
            return cached if hit else None
        return cached

    def store_from_every_rank(
        self, indices: Tensor, scores: Scores, epoch: int, trainer: pl.Trainer, host: Tensor | None = None
    ) -> None:
        """:meth:`store` every rank's scores on every rank: a collective under DDP.

        Each rank sees other examples in every epoch; storing all ranks' scores in every rank's
        cache is what lets a later batch find all of its examples fresh. Only the fields the cache keeps
        travel, in its storage dtype. When the loader's batch size bounds every rank's batch, that is one
        gather and one copy of all ranks' indices to the host.
        """
        if trainer.world_size > 1:
            capacity = getattr(trainer.train_dataloader, "batch_size", None)
            indices, scores = gather_scores(
                indices, scores, capacity if isinstance(capacity, int) else None, fields=self.fields, dtype=self.dtype
            )
            host = None
        self.store(indices, scores, epoch, host)


def score_cache_for(
    trainer: pl.Trainer,
    stale_epochs: int,
    example_indices: Callable[[Any], Tensor | None],
    **options: Any,
) -> ScoreCache:
    """A cache sized for the trainer's training set, once the fit loop has set up its data.

    Args:
        trainer: a trainer whose ``train_dataloader`` is set (from ``on_train_start`` on).
        stale_epochs: how many epochs after the one that computed it a score is reused.
        example_indices: reads the dataset indices of a batch (``SelectiveBackprop.example_indices``).
        options: ``fields``, ``dtype`` and ``placement`` of :class:`ScoreCache`.

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
    return ScoreCache(len(cast(Sized, dataset)), stale_epochs, **options)
