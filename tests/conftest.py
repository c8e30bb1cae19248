"""Test-wide settings: the intra-op thread count, and the seed of the random test order.

``SBP_TEST_THREADS`` sets the number of intra-op threads of the test process (default 1: the tests run
many tiny models side by side). A different count changes the order of floating-point reductions, so
the suite must pass at 1 and at 2 threads. With pytest-randomly installed (the ``dev`` extra) the tests
run in a random order; its seed is printed at the end of the run, so that an order-dependent failure
can be replayed with ``--randomly-seed``.
"""

import os
from collections.abc import Iterator

import pytest

THREADS_VARIABLE = "SBP_TEST_THREADS"


def _thread_count() -> int:
    value = os.environ.get(THREADS_VARIABLE, "1")
    if not value.isdigit() or int(value) < 1:
        raise pytest.UsageError(f"{THREADS_VARIABLE} must be a positive integer, got {value!r}")
    return int(value)


THREADS = _thread_count()
# Before torch is imported, so that OpenMP starts with this many threads in this process and in the
# processes it spawns.
os.environ["OMP_NUM_THREADS"] = str(THREADS)

import torch  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _intra_op_threads() -> Iterator[None]:
    """Start every test at ``THREADS`` threads: the profile and compare commands set their own count in-process."""
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
    yield


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """Print the thread count and, when the order was random, the seed that replays it."""
    line = f"intra-op threads: {THREADS} ({THREADS_VARIABLE})"
    if config.pluginmanager.hasplugin("randomly"):
        line += f"; random order, replay it with --randomly-seed={config.getoption('randomly_seed')}"
    terminalreporter.write_line(line)
