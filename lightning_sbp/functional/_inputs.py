"""Shape, dtype and precision rules shared by the functions of this package."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Elements (16 Mi, 64 MiB in float32) that one intermediate block of a Gram or sketch computation may hold."""


def row_blocks(rows: int, elements_per_row: int, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[slice]:
    """Slices of whole rows, each holding at most ``chunk_elements`` elements (at least one row)."""
    step = max(1, chunk_elements // max(1, elements_per_row))
    return [slice(start, start + step) for start in range(0, rows, step)]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The common floating dtype of ``tensors``, at least ``float32``."""
    dtype = torch.float32
    for tensor in tensors:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def as_sequences(features: Tensor, logit_grads: Tensor) -> tuple[Tensor, Tensor]:
    """``[N, D]``/``[N, C]`` or ``[N, T, D]``/``[N, T, C]`` inputs as ``[N, T, D]``/``[N, T, C]`` views.

    Raises:
        ValueError: on shapes that do not match or non-floating inputs.
    """
    if features.ndim not in (2, 3) or logit_grads.ndim != features.ndim:
        raise ValueError(
            "features must have shape [N, D] and logit_grads [N, C], or [N, T, D] and [N, T, C] for a head "
            f"applied per position; got {tuple(features.shape)} and {tuple(logit_grads.shape)}"
        )
    if features.shape[0] != logit_grads.shape[0]:
        raise ValueError(
            f"features and logit_grads must have the same number of rows, "
            f"got {features.shape[0]} and {logit_grads.shape[0]}"
        )
    if features.shape[:-1] != logit_grads.shape[:-1]:
        raise ValueError(
            f"features and logit_grads must have the same number of positions, "
            f"got {tuple(features.shape)} and {tuple(logit_grads.shape)}"
        )
    if not (features.is_floating_point() and logit_grads.is_floating_point()):
        raise ValueError(
            f"features and logit_grads must be floating point, got {features.dtype} and {logit_grads.dtype}"
        )
    if features.ndim == 2:
        return features.unsqueeze(1), logit_grads.unsqueeze(1)
    return features, logit_grads


def _autocast_available(device_type: str) -> bool:
    probe = getattr(torch.amp, "is_autocast_available", None)
    return bool(probe(device_type)) if probe is not None else device_type in ("cpu", "cuda")


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """A context in which autocast is off on ``device``'s type: its matrix products run in their inputs' dtype.

    Lightning runs ``training_step`` under the autocast of its precision setting, and everything called from
    it inherits that: a float32 matrix product inside would run in bfloat16 or float16. The Gram matrices,
    OMP, gradient norms and gradient errors are exact computations, so they leave autocast.
    """
    if not _autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, enabled=False)


def outside_autocast(function: F) -> F:
    """Run ``function`` with autocast off on the device of its first tensor argument (see :func:`autocast_off`)."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tensor = next((value for value in (*args, *kwargs.values()) if isinstance(value, Tensor)), None)
        if tensor is None:
            return function(*args, **kwargs)
        with autocast_off(tensor.device):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
