"""Reading a training batch: its size, its rows, its example indices, its inputs and its targets."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_sbp.functional.batch import batch_size, example_indices, index_batch
from lightning_sbp.functional.resize import downscale

__all__ = ["LABEL_KEYS", "BatchAdapter", "default_forward", "unwrap_logits"]

LABEL_KEYS = ("labels", "label", "targets", "target", "y")


class BatchAdapter:
    """The batch hooks of :class:`~lightning_sbp.SelectiveBackprop`: override them for other batch layouts.

    The defaults read tensors, (nested) tuples and lists, named tuples and mappings, indexing
    every tensor whose first dimension is the batch size.
    """

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


def default_forward(model: Callable[..., Any], batch: Any) -> tuple[Tensor, Tensor]:
    """Logits and targets of ``(inputs, targets, ...)`` or ``{..., "labels": targets}`` batches.

    A tuple or list batch calls ``model(inputs)``; a mapping calls ``model(**others)`` with every
    entry but the label key (``labels``, ``label``, ``targets``, ``target`` or ``y``). An output
    with a ``logits`` attribute or key (as transformers models return) is unwrapped.

    Raises:
        ValueError: for a mapping without a label key.
        TypeError: for a batch that is neither a mapping nor a sequence of at least two items.
    """
    if isinstance(batch, Mapping):
        label_key = next((key for key in LABEL_KEYS if key in batch), None)
        if label_key is None:
            raise ValueError(
                f"dict batch has no label key (looked for {', '.join(LABEL_KEYS)}; found {', '.join(batch)}); "
                "override `sbp_forward` to say where the targets are"
            )
        output = model(**{key: value for key, value in batch.items() if key != label_key})
        targets = batch[label_key]
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        output = model(batch[0])
        targets = batch[1]
    else:
        raise TypeError(
            f"cannot split a batch of type {type(batch).__name__} into inputs and targets; "
            "override `sbp_forward(batch) -> (logits, targets)`"
        )
    return unwrap_logits(output), targets


def unwrap_logits(output: Any) -> Tensor:
    """The logits tensor of a model output: a tensor, or an object or dict holding ``logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find logits in a model output of type {type(output).__name__}")
