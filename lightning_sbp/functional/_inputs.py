"""Shape and dtype checks shared by the last-layer Gram matrix and its sketch."""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""Elements (16 Mi, 64 MiB in float32) that one intermediate block of a Gram or sketch computation may hold."""


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
