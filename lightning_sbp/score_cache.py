"""Stale scores: per-example scores kept by example index and reused for a number of epochs."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_sbp.selectors.base import Scores

__all__ = ["ScoreCache", "gather_scores"]

_FIELDS = ("losses", "logits", "logit_grads", "features")
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
        rows = {name: self.tensors[name][indices] for name in _FIELDS if name in self.tensors}
        return Scores(bias=self.bias, **rows)

    def store(self, indices: Tensor, scores: Scores, epoch: int) -> None:
        """Remember ``scores`` for the examples ``indices``, computed in ``epoch``."""
        self.bias = scores.bias
        values = {name: getattr(scores, name) for name in _FIELDS if getattr(scores, name) is not None}
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


def gather_scores(indices: Tensor, scores: Scores) -> tuple[Tensor, Scores]:
    """The example indices and scores of every rank's batch, in rank order: a collective.

    Under DDP each rank sees other examples in every epoch; storing every rank's scores in every
    rank's cache is what lets a batch find all of its examples fresh. Ranks may score batches of
    different sizes: the sizes are gathered first and read on the host, then the rows, padded to
    the largest batch, in one gather for the indices and one for all score columns.

    Args:
        indices: this rank's example indices, shape ``[N]``.
        scores: this rank's scores of those examples.

    Returns:
        The indices ``[M]`` and scores of all ranks' examples, ``M`` the sum of the batch sizes;
        the score fields are float32 and those this rank's scores hold.
    """
    fields = {name: getattr(scores, name) for name in _FIELDS if getattr(scores, name) is not None}
    widths = [math.prod(value.shape[1:]) for value in fields.values()]
    columns = torch.cat([value.float().reshape(len(value), -1) for value in fields.values()], dim=1)
    size = torch.tensor([len(indices)], device=indices.device)
    sizes = [torch.empty_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    counts = torch.cat(sizes).tolist()
    all_indices = _gather_rows(indices, counts)
    parts = _gather_rows(columns, counts).split(widths, dim=1)
    values = {
        name: part.reshape(-1, *value.shape[1:]) for (name, value), part in zip(fields.items(), parts, strict=True)
    }
    return all_indices, Scores(bias=scores.bias, **values)


def _gather_rows(rows: Tensor, counts: list[int]) -> Tensor:
    """Every rank's ``rows``, ``counts[r]`` of them on rank ``r``, concatenated in rank order."""
    most = max(counts)
    padded = F.pad(rows, (0, 0) * (rows.dim() - 1) + (0, most - len(rows)))
    every = [padded.new_empty(padded.shape) for _ in counts]
    dist.all_gather(every, padded)
    return torch.cat([ranked[:count] for ranked, count in zip(every, counts, strict=True)])
