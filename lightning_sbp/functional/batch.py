"""Batch arithmetic: how many examples a batch holds, how many to keep, and taking rows of it."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["INDEX_KEYS", "batch_size", "example_indices", "index_batch", "subset_size"]

INDEX_KEYS = ("index", "indices", "idx")


def batch_size(batch: Any) -> int:
    """The number of examples in a batch: dim 0 of its first tensor.

    Args:
        batch: a tensor, or a (nested) tuple, list or mapping holding tensors.

    Raises:
        TypeError: if the batch holds no tensor.
    """
    tensor = _first_tensor(batch)
    if tensor is None or tensor.dim() == 0:
        raise TypeError(
            f"cannot tell the size of a batch of type {type(batch).__name__}: it holds no tensor with a batch "
            "dimension; override `SelectiveBackprop.batch_size` and `SelectiveBackprop.index_batch`"
        )
    return int(tensor.shape[0])


def index_batch(batch: Any, indices: Tensor, size: int | None = None) -> Any:
    """The rows ``indices`` of every tensor in ``batch`` that has ``size`` rows, and of every list of ``size`` values.

    A list or tuple of ``size`` plain values (strings, numbers, ``None``: what ``default_collate`` makes of
    per-example file paths or raw texts) holds one value per example and is indexed too; taking its items
    reads the indices on the host, one copy per call. Lists and tuples of tensors are containers, indexed
    item by item, and keep their type, as named tuples and mappings do; other values (a string, a scalar, a
    tensor of another length) pass through unchanged.

    Args:
        batch: a tensor, or a (nested) tuple, list or mapping holding tensors.
        indices: ``long`` tensor of row indices.
        size: the batch size; inferred with :func:`batch_size` when omitted.
    """
    if size is None:
        size = batch_size(batch)
    return _index(batch, indices, size)


def subset_size(keep: float, size: int, minimum: int = 1) -> int:
    """How many of ``size`` examples a fraction ``keep`` keeps: ``floor(keep * size)``, at least ``minimum``.

    The same pure function of its arguments on every rank, and never more than ``size``.
    """
    # The small tolerance keeps products such as 0.29 * 100 = 28.999999999999996 at 29.
    return min(size, max(minimum, math.floor(keep * size + 1e-6)))


def example_indices(batch: Any) -> Tensor | None:
    """The dataset indices of a batch's examples, when the batch carries them.

    Found as the third element of an ``(inputs, targets, indices, ...)`` tuple or list, or under
    an ``index``, ``indices`` or ``idx`` key of a mapping, as a 1-D integer tensor.
    """
    if isinstance(batch, Mapping):
        candidate = next((batch[key] for key in INDEX_KEYS if key in batch), None)
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes) and len(batch) >= 3:
        candidate = batch[2]
    else:
        candidate = None
    if isinstance(candidate, Tensor) and candidate.dim() == 1 and not candidate.is_floating_point():
        return candidate
    return None


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        values: Any = batch.values()
    elif isinstance(batch, Sequence) and not isinstance(batch, str | bytes):
        values = batch
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None and found.dim() > 0:
            return found
    return None


def _index(value: Any, indices: Tensor, size: int) -> Any:
    if isinstance(value, Tensor):
        return value[indices] if value.dim() > 0 and value.shape[0] == size else value
    if isinstance(value, Mapping):
        items = {key: _index(item, indices, size) for key, item in value.items()}
        mapping_type: Any = type(value)
        try:
            return mapping_type(items)
        except TypeError:
            return items
    if _per_example_values(value, size):
        rows = indices.tolist()
        picked = [value[row] for row in rows]
        return picked if isinstance(value, list) else type(value)(picked)
    if isinstance(value, tuple):
        items_seq = [_index(item, indices, size) for item in value]
        return type(value)(*items_seq) if hasattr(value, "_fields") else type(value)(items_seq)
    if isinstance(value, list):
        return [_index(item, indices, size) for item in value]
    return value


def _per_example_values(value: Any, size: int) -> bool:
    """Whether ``value`` is a list or plain tuple of ``size`` plain values: one per example of the batch."""
    return (
        isinstance(value, list | tuple)
        and not hasattr(value, "_fields")
        and len(value) == size > 0
        and all(map(_is_plain, value))
    )


def _is_plain(value: Any) -> bool:
    """Whether ``value`` is one example's plain value (a string, a number, ``None``), not a container or a tensor."""
    return value is None or isinstance(value, str | bytes | int | float | complex)
