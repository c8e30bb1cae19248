"""Wall-clock intervals inside the training step, read without stalling it.

On the CPU a point in time is the host clock. On a GPU the host only enqueues work, so the host clock
would time the launches, not the kernels: a point is a CUDA event recorded on the current stream, and
an interval between two events is read, by waiting for the later one, only when somebody asks for it
(at logging time, or when a fit reports its totals). Other accelerators get host times, which time
the enqueueing.
"""

from __future__ import annotations

import time
from typing import Any

import torch

__all__ = ["Mark", "Stopwatch", "elapsed_seconds", "mark"]

Mark = Any
"""A point in time: a ``float`` from :func:`time.perf_counter`, or a recorded ``torch.cuda.Event``."""


def mark(device: torch.device) -> Mark:
    """The current point in the work of ``device``: a CUDA event recorded on its stream, else the host clock."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


def elapsed_seconds(start: Mark, end: Mark) -> float:
    """Seconds from ``start`` to ``end``; for CUDA events, waits until ``end`` has happened on the device."""
    if isinstance(start, float) and isinstance(end, float):
        return end - start
    end.synchronize()
    return float(start.elapsed_time(end)) / 1e3


class Stopwatch:
    """Adds up intervals of the step on one device, reading them only when :attr:`seconds` is asked for.

    Args:
        device: the device whose work is timed.
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cpu")
        self._seconds = 0.0
        self._pending: list[tuple[Mark, Mark]] = []
        self._started: Mark | None = None

    def start(self) -> None:
        """Begin an interval."""
        self._started = mark(self.device)

    def stop(self) -> None:
        """End the interval begun by :meth:`start`; it is read later."""
        if self._started is None:
            raise RuntimeError("Stopwatch.stop() without a start()")
        self._pending.append((self._started, mark(self.device)))
        self._started = None

    @property
    def seconds(self) -> float:
        """The sum of every finished interval so far (on a GPU, waits for the last one to happen)."""
        for start, end in self._pending:
            self._seconds += elapsed_seconds(start, end)
        self._pending.clear()
        return self._seconds

    def reset(self) -> None:
        """Forget every interval."""
        self._seconds = 0.0
        self._pending.clear()
        self._started = None
