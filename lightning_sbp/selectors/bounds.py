"""Bounds on selection weights: the default, its check, its value in a dtype, and a count of the steps it acts on."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_MAX_WEIGHT", "RunningCount", "bound_in", "check_max_weight"]

DEFAULT_MAX_WEIGHT = 8.0
"""The default bound on ``|w_i|``: one example may count for at most eight of the subset."""


def check_max_weight(max_weight: Any, allow_none: bool = False) -> None:
    """Refuse a bound that is not a finite number of at least 1 (unit weights must satisfy it).

    Raises:
        ValueError: with the allowed values.
    """
    if max_weight is None and allow_none:
        return
    is_number = isinstance(max_weight, int | float) and not isinstance(max_weight, bool)
    if not is_number or not 1.0 <= max_weight < math.inf:
        allowed = "a finite number >= 1 (uniform weights are 1)" + (", or None for no bound" if allow_none else "")
        raise ValueError(f"max_weight must be {allowed}, got {max_weight!r}")


def bound_in(dtype: torch.dtype, max_weight: float) -> float:
    """The largest value of ``dtype`` that is at most ``max_weight`` (a number of at least 1).

    A weight ``w`` of that dtype satisfies ``|w| <= max_weight`` exactly when ``|w|`` is at most this value,
    so the comparison can run in the weights' own dtype. Comparing with ``max_weight`` itself would first round
    it to the nearest value of the dtype, which can be above it: ``7.9999999`` is ``8.0`` in float32. Computed
    on the host from the dtype's precision, without a tensor.
    """
    info = torch.finfo(dtype)
    if max_weight >= info.max:
        return float(info.max)
    mantissa, exponent = math.frexp(max_weight)
    digits = round(-math.log2(info.eps)) + 1  # significant bits: 24 for float32
    return math.ldexp(math.floor(math.ldexp(mantissa, digits)), exponent - digits)


class RunningCount:
    """A count of steps kept on the device: adding a step's 0-dim flag reads nothing on the host.

    The count moves to the device of the first flag added after it was created or restored.
    """

    def __init__(self) -> None:
        self._count: Tensor | None = None

    def add(self, flag: Tensor) -> Tensor:
        """Add one when ``flag`` (a 0-dim ``bool`` tensor) is true; return the count as a 0-dim float tensor."""
        if self._count is None:
            self._count = torch.zeros((), dtype=torch.long, device=flag.device)
        elif self._count.device != flag.device:
            self._count = self._count.to(flag.device)
        self._count.add_(flag)
        return self._count.float()

    def value(self) -> int:
        """The count, read on the host (for checkpoints)."""
        return 0 if self._count is None else int(self._count)

    def restore(self, value: int) -> None:
        """Start again from ``value``."""
        self._count = torch.tensor(int(value), dtype=torch.long)
