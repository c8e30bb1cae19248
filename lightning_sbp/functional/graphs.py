"""Replaying fixed-shape computations as CUDA graphs: captured after a warm-up, never failing the step.

A computation whose kernels and shapes are the same on every call (OMP's greedy loop for one batch
size) can be captured once as a CUDA graph and replayed: one launch instead of one per kernel. The
capture is done with care, because it happens in the middle of training:

* only after a key has run eagerly a few times, so that the caching allocator, library handles and
  workspaces (and ``torch.compile``'s kernels) exist before the capture, which may not create them;
* on a side stream, in ``"thread_local"`` capture mode, so that CUDA calls from other threads (the
  pinned-memory thread of a ``DataLoader`` allocating host memory) do not invalidate it;
* keyed by everything that changes the captured kernels: shapes, dtypes, options, device and the
  autocast state;
* and if the capture fails, the key runs eagerly from then on, after one warning: a graph is an
  optimisation, never a reason for a step to fail.
"""

from __future__ import annotations

import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch

__all__ = ["WARMUP_CALLS", "Capture", "GraphCache", "autocast_state", "capture_cuda_graph"]

WARMUP_CALLS = 2
"""Eager calls of a key before it is captured."""

Capture = Callable[[Callable[[], None], torch.device], Callable[[], None]]
"""Turns a function of static buffers into its replay: :func:`capture_cuda_graph`, or a stand-in in tests."""

R = TypeVar("R")


def capture_cuda_graph(run: Callable[[], None], device: torch.device, cuda: Any = torch.cuda) -> Callable[[], None]:
    """Capture ``run``, which reads and writes only tensors allocated before it, as a CUDA graph.

    ``run`` runs once on a side stream first, so that whatever it allocates on first use exists before
    the capture; then it is captured on that side stream in ``"thread_local"`` mode.

    Args:
        run: the computation, on static buffers.
        device: the CUDA device.
        cuda: the ``torch.cuda`` namespace (a recording stand-in in tests).

    Returns:
        The graph's ``replay``: launches every captured kernel again, on the same memory.
    """
    side = cuda.Stream(device)
    side.wait_stream(cuda.current_stream(device))
    with cuda.stream(side):
        run()
    cuda.current_stream(device).wait_stream(side)
    graph = cuda.CUDAGraph()
    with cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
        run()
    return graph.replay


def autocast_state(device: torch.device) -> tuple[bool, Any]:
    """Whether autocast is on for ``device``'s type, and its dtype: part of every key, since it changes kernels."""
    enabled = torch.is_autocast_enabled(device.type)
    get_dtype = getattr(torch, "get_autocast_dtype", None)
    return enabled, get_dtype(device.type) if enabled and get_dtype is not None else None


class GraphCache(Generic[R]):
    """Runners replayed as CUDA graphs, one per key, at most ``size`` at once (the least recently used goes).

    Args:
        capture: turns a function of static buffers into its replay.
        warmup: eager calls of a key before it is captured.
        size: how many captured runners are kept.
    """

    def __init__(self, capture: Capture = capture_cuda_graph, warmup: int = WARMUP_CALLS, size: int = 8) -> None:
        self.capture = capture
        self.warmup = warmup
        self.size = size
        self._runners: OrderedDict[Hashable, R] = OrderedDict()
        self._calls: Counter[Hashable] = Counter()
        self._failed: set[Hashable] = set()

    def get(self, key: Hashable, build: Callable[[Capture], R]) -> R | None:
        """The captured runner for ``key``, or ``None`` when this call runs eagerly.

        ``build(capture)`` makes the runner, capturing its computation with ``capture``; it is called once
        per key, after ``warmup`` eager calls. A failing build leaves the key eager for good, with one warning.
        """
        runner = self._runners.get(key)
        if runner is not None:
            self._runners.move_to_end(key)
            return runner
        if key in self._failed or self._calls[key] < self.warmup:
            self._calls[key] += 1
            return None
        try:
            runner = build(self.capture)
        except Exception as error:
            self._failed.add(key)
            warnings.warn(
                f"capturing a CUDA graph failed ({type(error).__name__}: {error}); this computation runs eagerly "
                "from now on, which is correct but launches one kernel per operator",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self._runners[key] = runner
        if len(self._runners) > self.size:
            self._runners.popitem(last=False)
        return runner

    def clear(self) -> None:
        """Forget every runner, call count and failure."""
        self._runners.clear()
        self._calls.clear()
        self._failed.clear()
