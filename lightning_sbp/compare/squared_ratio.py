"""An unbiased yardstick for "better than random": the squared gradient error over a random subset's expected one.

On every step that measures, the callback gives the relative error ``e`` of the subset's
last-layer gradient against the full batch's, and ``r``, the root of the closed-form *expected*
squared error of a uniformly random subset of the same size on the same batch. Their ratio
``e / r`` averages below 1 even for random selection, since ``E[e] < sqrt(E[e²]) = r`` (Jensen's
inequality): random itself scores about 0.95 to 0.99. The ratio of squares does not: for random
selection ``E[e² | batch] = r²`` exactly, so ``e² / r²`` has expectation exactly 1 on every
batch, and its mean over any number of steps is an unbiased estimate of 1. Below 1, a selector's
subsets match the batch gradient better than random subsets do, in mean square.

:class:`SquaredRatioLog` collects it for a comparison's run: it takes the callback's step log
over and reads the two values the callback hands it on every step that measures, without a
host-device synchronisation; the sums are read once per epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_sbp.tracking import StepLog

__all__ = ["RatioSums", "SquaredRatioLog", "squared_ratio"]

ERROR_KEY = "sbp/grad_error_step"
RANDOM_KEY = "sbp/grad_error_random_step"


def squared_ratio(error: Tensor, random_error: Tensor) -> Tensor:
    """``error² / random_error²``, NaN where it is not defined (a random subset's expected error of 0)."""
    error, random_error = error.double(), random_error.double()
    return torch.where(random_error > 0, error.square() / random_error.square(), torch.nan)


@dataclass
class RatioSums:
    """Sums over measured steps of the squared ratio and of its square, and how many steps.

    Attributes:
        total: the sum of the ratios.
        total_sq: the sum of their squares.
        count: the number of steps with a finite ratio.
    """

    total: float = 0.0
    total_sq: float = 0.0
    count: int = 0

    def __add__(self, other: RatioSums) -> RatioSums:
        return RatioSums(self.total + other.total, self.total_sq + other.total_sq, self.count + other.count)

    @property
    def mean(self) -> float | None:
        """The mean over the steps (``None`` without any)."""
        return self.total / self.count if self.count else None

    @property
    def standard_error(self) -> float | None:
        """The standard error of the mean, from the spread between steps (``None`` with fewer than two).

        For random selection the deviations ``e² / r² - 1`` of successive steps have mean 0 given
        the past (a martingale difference sequence), so this is its standard error although the
        steps of one run are not independent.
        """
        if self.count < 2:
            return None
        mean = self.total / self.count
        variance = max(0.0, (self.total_sq - self.count * mean * mean) / (self.count - 1))
        return math.sqrt(variance / self.count)


class SquaredRatioLog(StepLog):
    """The callback's step log, which also sums ``e² / r²`` over the steps that measure.

    Build it with :meth:`following` from the callback's own log (its counts carry over) and set it
    as the callback's ``step_log`` before the fit starts.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sums: Tensor | None = None

    @classmethod
    def following(cls, log: StepLog) -> SquaredRatioLog:
        """A log that goes on from ``log``: its counts and state, plus the sums."""
        new = cls()
        sums = new._sums
        new.__dict__.update(vars(log))
        new._sums = sums
        return new

    def add_measurement(self, measured: dict[str, Tensor]) -> None:
        """Add this step's squared ratio to the sums, kept on the device."""
        error, random_error = measured.get(ERROR_KEY), measured.get(RANDOM_KEY)
        if isinstance(error, Tensor) and isinstance(random_error, Tensor):
            ratio = squared_ratio(error.detach(), random_error.detach())
            finite = torch.isfinite(ratio)
            ratio = torch.where(finite, ratio, 0.0)
            step = torch.stack([ratio, ratio.square(), finite.double()])
            self._sums = step if self._sums is None else self._sums + step.to(self._sums.device)

    def take(self) -> RatioSums:
        """The sums since the last call, read from the device (one synchronisation); they restart at 0."""
        if self._sums is None:
            return RatioSums()
        total, total_sq, count = self._sums.tolist()
        self._sums = None
        return RatioSums(total, total_sq, round(count))
