"""CUDA-graph replay: when it captures, with which stream and mode, what it keys on, and that it never fails a step.

No GPU is needed: the capture function is driven through a stand-in for ``torch.cuda`` that records what it
was given, and the cache through captures that run eagerly, so every decision is checked on the CPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from lightning_sbp.functional import omp as omp_module
from lightning_sbp.functional import omp_gram
from lightning_sbp.functional.graphs import WARMUP_CALLS, GraphCache, autocast_state, capture_cuda_graph


class FakeStream(str):
    """A named stream that logs waits."""

    log: list[tuple[str, Any]]

    def wait_stream(self, other: str) -> None:
        self.log.append((f"{self} waits for", str(other)))


class FakeCuda:
    """The parts of ``torch.cuda`` a capture uses, recording streams, capture modes and where the work ran."""

    def __init__(self) -> None:
        self.current = self._stream("default stream")
        self.log: list[tuple[str, Any]] = []

    def _stream(self, name: str) -> FakeStream:
        stream = FakeStream(name)
        stream.log = self.log if hasattr(self, "log") else []
        return stream

    def Stream(self, device: torch.device) -> FakeStream:
        self.log.append(("new stream", device))
        return self._stream("side stream")

    def current_stream(self, device: torch.device) -> FakeStream:
        stream = self._stream(str(self.current))
        stream.log = self.log
        return stream

    @contextlib.contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        previous, self.current = self.current, stream
        try:
            yield
        finally:
            self.current = previous

    class CUDAGraph:
        def replay(self) -> None:
            pass

    @contextlib.contextmanager
    def graph(self, graph: Any, stream: FakeStream, capture_error_mode: str) -> Iterator[None]:
        self.log.append(("capture", (str(stream), capture_error_mode)))
        previous, self.current = self.current, self._stream(f"capturing on {stream}")
        try:
            yield
        finally:
            self.current = previous


def test_capture_warms_up_then_captures_on_a_side_stream_in_thread_local_mode() -> None:
    cuda = FakeCuda()
    ran_on: list[str] = []
    replay = capture_cuda_graph(lambda: ran_on.append(str(cuda.current)), torch.device("cuda", 1), cuda=cuda)
    assert ran_on == ["side stream", "capturing on side stream"], "one warm-up run on the side stream, one captured"
    assert cuda.log == [
        ("new stream", torch.device("cuda", 1)),
        ("side stream waits for", "default stream"),
        ("default stream waits for", "side stream"),
        ("capture", ("side stream", "thread_local")),
    ]
    assert callable(replay)


def eager_capture(run: Any, device: torch.device) -> Any:
    """What a CUDA graph computes, on the CPU: the warm-up run, then every replay runs again."""
    run()
    return run


def test_a_key_runs_eagerly_for_its_warm_up_then_is_captured_once_and_replayed() -> None:
    builds: list[str] = []
    cache: GraphCache[str] = GraphCache(capture=eager_capture)
    answers = [cache.get("key", lambda capture: builds.append("built") or "runner") for _ in range(WARMUP_CALLS + 3)]
    assert answers == [None] * WARMUP_CALLS + ["runner"] * 3
    assert builds == ["built"]


def test_a_failing_capture_warns_once_and_leaves_the_key_eager() -> None:
    cache: GraphCache[str] = GraphCache(capture=eager_capture, warmup=0)
    attempts: list[int] = []

    def broken(capture: Any) -> str:
        attempts.append(1)
        raise RuntimeError("operation not permitted when stream is capturing")

    with pytest.warns(RuntimeWarning, match="runs eagerly from now on"):
        assert cache.get("key", broken) is None
    assert [cache.get("key", broken) for _ in range(3)] == [None] * 3
    assert attempts == [1], "never captured again"
    assert cache.get("other", lambda capture: "runner") == "runner", "other keys still capture"


def test_the_least_recently_used_runner_goes_first() -> None:
    cache: GraphCache[str] = GraphCache(capture=eager_capture, warmup=0, size=2)
    builds: list[str] = []

    def build(name: str) -> Any:
        return lambda capture: builds.append(name) or name

    for key in ["a", "b", "a", "c", "a", "b"]:
        assert cache.get(key, build(key)) == key
    assert builds == ["a", "b", "c", "b"], "b was least recent when c came, a never was"


def test_the_autocast_state_is_part_of_the_key() -> None:
    cpu = torch.device("cpu")
    plain = autocast_state(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = autocast_state(cpu)
    with torch.autocast("cpu", dtype=torch.float16):
        fp16 = autocast_state(cpu)
    assert len({plain, bf16, fp16}) == 3


def test_replayed_omp_through_the_cache_matches_the_eager_loop_on_every_call() -> None:
    cache: GraphCache[Any] = GraphCache(capture=eager_capture)
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    for _ in range(WARMUP_CALLS + 3):
        atoms = torch.randn(40, 30, generator=generator, dtype=torch.float64)
        gram = atoms.T @ atoms
        target = gram.mean(dim=1)
        runner = cache.get(
            "omp", lambda capture: omp_module._ReplayedOMP(30, 9, torch.float64, False, False, device, capture)
        )
        expected = omp_gram(gram, target, 9)
        if runner is not None:
            indices, coef = runner(gram, target)
            assert torch.equal(indices, expected[0])
            torch.testing.assert_close(coef, expected[1], rtol=0, atol=0)
