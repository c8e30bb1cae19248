"""When Selective Backprop is active: a pure function of the global step."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Schedule"]


@dataclass(frozen=True)
class Schedule:
    """The window of steps that select, and the full steps interleaved in it.

    Attributes:
        start: first selective step, as a fraction of the run's optimiser steps, ``0 <= start < end``.
        end: first step after the window, as a fraction of the run's optimiser steps, ``end <= 1``.
        interrupt: every ``interrupt``-th step inside the window is a full step (``2`` alternates);
            ``0`` never interrupts.
    """

    start: float = 0.0
    end: float = 1.0
    interrupt: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"need 0 <= start < end <= 1, got start={self.start!r}, end={self.end!r}")
        if isinstance(self.interrupt, bool) or not isinstance(self.interrupt, int) or self.interrupt < 0:
            raise ValueError(f"interrupt must be 0 (never) or an integer >= 2, got {self.interrupt!r}")
        if self.interrupt == 1:
            raise ValueError("interrupt=1 would make every step a full step; use 0 (never) or an integer >= 2")

    def window(self, total_steps: float) -> tuple[int, float]:
        """The first selective step and the first step after the window, for a run of ``total_steps``.

        Raises:
            ValueError: for an unbounded run with a window narrower than the whole run.
        """
        if math.isinf(total_steps):
            if self.start == 0.0 and self.end == 1.0:
                return 0, math.inf
            raise ValueError(
                "start/end are fractions of the run's length, but the trainer's run is unbounded "
                "(trainer.estimated_stepping_batches is inf); set max_steps or max_epochs, or use start=0, end=1"
            )
        return math.floor(self.start * total_steps), math.floor(self.end * total_steps)

    def is_active(self, step: int, total_steps: float) -> bool:
        """Whether optimiser step ``step`` of a run of ``total_steps`` selects a subset."""
        first, stop = self.window(total_steps)
        if not first <= step < stop:
            return False
        return self.interrupt == 0 or (step - first + 1) % self.interrupt != 0
