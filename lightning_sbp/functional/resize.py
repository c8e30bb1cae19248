"""Downscaled inputs for a cheaper scoring pass."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

__all__ = ["downscale"]

_MODES = {3: "linear", 4: "bilinear", 5: "trilinear"}


def downscale(inputs: Tensor, scale: float) -> Tensor:
    """``inputs`` resampled to ``scale`` times their spatial size (at least one element per dimension).

    Args:
        inputs: ``[N, C, L]``, ``[N, C, H, W]`` or ``[N, C, D, H, W]`` floating-point inputs,
            resampled linearly, bilinearly or trilinearly (without corner alignment).
        scale: the factor, ``0 < scale <= 1``; ``1`` returns ``inputs`` itself.

    Raises:
        ValueError: for a scale outside ``(0, 1]`` or inputs without one to three spatial dimensions.
    """
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"scale must be in (0, 1], got {scale!r}")
    if scale == 1.0:
        return inputs
    mode = _MODES.get(inputs.dim())
    if mode is None or not inputs.is_floating_point():
        raise ValueError(
            f"cannot downscale inputs of shape {tuple(inputs.shape)} and dtype {inputs.dtype}: score_scale < 1 needs "
            "floating-point inputs with 1 to 3 spatial dimensions ([N, C, L], [N, C, H, W] or [N, C, D, H, W])"
        )
    size = [max(1, math.floor(extent * scale)) for extent in inputs.shape[2:]]
    return F.interpolate(inputs, size=size, mode=mode, align_corners=False)
