"""Reading a training batch: its size, its rows, its example indices, its inputs and its targets."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_sbp.functional.batch import batch_size, example_indices, index_batch
from lightning_sbp.functional.resize import downscale

__all__ = [
    "INPUT_KEYS",
    "LABEL_KEYS",
    "BatchAdapter",
    "default_forward",
    "defines_forward",
    "is_lightning_module_class",
    "unwrap_logits",
]

LABEL_KEYS = ("labels", "label", "targets", "target", "y")
"""Where a dict batch keeps its targets, in the order they are looked for."""

INPUT_KEYS = ("image", "images", "pixel_values", "input", "inputs", "x")
"""Where a dict batch keeps a single input that ``forward`` may take positionally."""


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

        The inputs are the first element of a tuple or list batch, or, in a mapping, the entry under
        the first of :data:`INPUT_KEYS` it has, else its first floating-point tensor. Override for other
        layouts.

        Raises:
            ValueError: if the inputs have no spatial dimensions to downscale, naming their shape.
        """
        if isinstance(batch, Mapping):
            key = next((key for key in INPUT_KEYS if key in batch), None) or next(
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
    """Logits and targets of ``(inputs, targets, ...)`` batches and of dict batches.

    A tuple or list batch calls ``model(inputs)``. A mapping keeps its targets under the first of
    :data:`LABEL_KEYS` it has, and passes the other entries to ``model``:

    * by name, ``model(**others)``, when ``forward`` has a parameter of each entry's name (transformers'
      ``input_ids``, ``attention_mask``, ...);
    * otherwise positionally, ``model(batch[key])``, when exactly one of the entries is under one of
      :data:`INPUT_KEYS` (``image``, ``pixel_values``, ``x``, ...) and ``forward`` can take it as its one
      argument (``forward(x)``, ``forward(*args, **kwargs)``); the other entries (an index, a file name)
      are left out;
    * otherwise by name, which then fails with the error of ``forward`` itself.

    An output with a ``logits`` attribute or key (as transformers models return) is unwrapped.

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
        inputs = {key: value for key, value in batch.items() if key != label_key}
        output = _call_with_entries(model, inputs)
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


def _call_with_entries(model: Callable[..., Any], inputs: dict[str, Any]) -> Any:
    """``model`` called on the entries of a dict batch other than its targets (see :func:`default_forward`)."""
    signature = _forward_signature(model)
    if signature is None or _names_every_entry(signature, inputs):
        return model(**inputs)
    keys = [key for key in INPUT_KEYS if key in inputs]
    if len(keys) == 1 and _takes_one_argument(signature):
        return model(inputs[keys[0]])
    return model(**inputs)


def _forward_signature(model: Callable[..., Any]) -> inspect.Signature | None:
    """The signature calling ``model`` goes through: its ``forward``'s for a module; ``None`` if unreadable."""
    function = model.forward if isinstance(model, nn.Module) else model
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def _names_every_entry(signature: inspect.Signature, inputs: Mapping[str, Any]) -> bool:
    named = {
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return all(key in named for key in inputs)


def _takes_one_argument(signature: inspect.Signature) -> bool:
    """Whether a call with a single positional argument binds to the signature."""
    parameters = list(signature.parameters.values())
    positional = [
        parameter
        for parameter in parameters
        if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    required = [parameter for parameter in positional if parameter.default is inspect.Parameter.empty]
    required_keywords = [
        parameter
        for parameter in parameters
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is inspect.Parameter.empty
    ]
    accepts_one = bool(positional) or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters)
    return accepts_one and len(required) <= 1 and not required_keywords


def is_lightning_module_class(klass: type) -> bool:
    """Whether ``klass`` is Lightning's ``LightningModule`` itself, under either package name."""
    package = klass.__module__.split(".")[0]
    return klass.__qualname__ == "LightningModule" and package in {"lightning", "pytorch_lightning"}


def defines_forward(model: nn.Module) -> bool:
    """Whether ``model``'s class (or a base below ``LightningModule`` and ``nn.Module``) defines ``forward``."""
    for klass in type(model).__mro__:
        if "forward" in vars(klass):
            return klass is not nn.Module and not is_lightning_module_class(klass)
    return False


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
