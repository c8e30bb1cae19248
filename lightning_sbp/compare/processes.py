"""Cells whose fit starts processes of its own (DDP on several devices) train in a command of their own.

Lightning starts the ranks of a ``ddp`` fit by running the command line of the calling process
again, one copy per device, and those of ``ddp_spawn`` by pickling the trainer into new
processes; when a rank fails, it kills every process of the fit, the one that called ``fit``
included. A comparison's process is no such command: its command line is ``compare``'s, and it
has other cells to train. So a cell whose trainer starts processes runs as
``python -m lightning_sbp.compare.ranks JOB``: a real command line, which Lightning runs again for
every rank, in a session of its own, so that whatever happens to its ranks ends the cell, never
the comparison.

The command imports what this process imports (this process's ``sys.path`` becomes its
``PYTHONPATH``), picks its own rendezvous port (the ``MASTER_ADDR``, ``MASTER_PORT`` and rank
variables of this process are not passed on, so cells side by side on one machine do not meet),
writes everything its processes print to a log file, and dies with the process that started it.
Each of its processes that fails writes its rank and error into the job's folder, and
:func:`run_in_processes` reports the first of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

__all__ = [
    "ENTRY_MODULE",
    "ProcessJob",
    "RankFailure",
    "die_with_parent",
    "record_failure",
    "run_in_processes",
    "starts_processes",
]

ENTRY_MODULE = "lightning_sbp.compare.ranks"
"""The module the cell's command runs (``python -m``): :func:`lightning_sbp.compare.ranks.main`."""

_RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE")
"""Variables that would make the cell's processes join this process's distributed job, if it is in one."""

_PR_SET_PDEATHSIG = 1
"""``prctl`` option of Linux: the signal a process gets when the thread that started it ends."""

_FAILURE_PREFIX = "failure-"

_PARENT = "LIGHTNING_SBP_CELL_PARENT"
"""The process id of the process that started this one, for :func:`die_with_parent`."""


def starts_processes(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` trains on several processes, which its strategy starts when ``fit`` is called.

    Raises:
        ValueError: when something other than Lightning would start them (SLURM's ``srun``,
            ``torchrun``): every one of them would then be a comparison of its own.
    """
    if trainer.world_size == 1:
        return False
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if environment is not None and environment.creates_processes_externally:
        raise ValueError(
            f"this run's {trainer.world_size} processes would be started outside Lightning "
            f"({type(environment).__name__}), but the comparison starts them itself: run it as one task that holds "
            "all of the run's devices, with --set trainer.plugins=lightning.pytorch.plugins.environments."
            "LightningEnvironment"
        )
    return True


@dataclass(frozen=True)
class ProcessJob:
    """What the cell's command runs in each of its processes: ``target(*args)``.

    Attributes:
        target: a function importable by name (it travels pickled).
        args: its arguments (picklable).
    """

    target: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass(frozen=True)
class RankFailure:
    """Why a cell's processes failed.

    Attributes:
        rank: the global rank of the process that failed first; ``None`` when none said why.
        error: the error in one line, ``"rank R: Type: message"``.
        details: the traceback, or what is known.
        time: when it was recorded (seconds since the epoch).
    """

    rank: int | None
    error: str
    details: str
    time: float


def run_in_processes(job: ProcessJob, log: Path, threads: int | None, world_size: int) -> RankFailure | None:
    """Run ``job`` as the cell's own command and wait for it; return its first failure, or ``None``.

    Args:
        job: what each process of the command runs.
        log: the file that receives everything the command's processes print.
        threads: ``OMP_NUM_THREADS`` (and so torch's thread count) of each process; ``None``
            shares this process's setting, when it has one, among the ``world_size`` processes.
        world_size: the number of processes the fit starts.

    Raises:
        KeyboardInterrupt: after the command and every process it started were killed.
    """
    with tempfile.TemporaryDirectory(prefix="sbp-cell-") as folder:
        job_file = Path(folder) / "job.pkl"
        job_file.write_bytes(pickle.dumps(job))
        command = [sys.executable, "-m", ENTRY_MODULE, str(job_file)]
        started = time.time()
        with log.open("ab") as output, _own_session(command, output, _environment(threads, world_size)) as process:
            status = process.wait()
        failures = sorted(_read_failures(Path(folder)), key=lambda failure: failure.time)
    if failures:
        return failures[0]
    if status == 0:
        return None
    how = f"signal {-status}" if status < 0 else f"exit status {status}"
    return RankFailure(
        rank=None,
        error=f"the cell's processes ended with {how} without saying why (killed for memory?); see {log}",
        details=f"The command {' '.join(command)} ended with {how} after {time.time() - started:.0f} s.\n",
        time=time.time(),
    )


def record_failure(folder: Path, err: BaseException) -> RankFailure:
    """Write, into the job's ``folder``, which rank failed with ``err`` and why (run by every process that fails).

    A fit that ``ddp_spawn`` started reports its ranks' errors to the process that called ``fit``
    (as ``torch.multiprocessing.ProcessRaisedException`` or ``ProcessExitedException``), which
    writes them here on their behalf.
    """
    failure = _describe(err)
    handle, path = tempfile.mkstemp(prefix=f".{_FAILURE_PREFIX}", dir=folder)
    with os.fdopen(handle, "w") as file:
        json.dump(vars(failure), file)
    os.replace(path, folder / f"{_FAILURE_PREFIX}{os.getpid()}.json")
    return failure


def die_with_parent() -> None:
    """Have Linux kill this process when the process that started it ends (elsewhere: nothing).

    A cell's processes must not outlive the comparison that started them: after a Ctrl-C or a
    cancelled Ray task, they would go on training (holding their devices) and write a record
    nobody waits for. Each process of the command asks for it, and the ranks it starts (which run
    the same command) learn its process id, so that a parent that ended before the request (while
    this process imported torch) is noticed too.

    Raises:
        SystemExit: when the process that started this one has ended already.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    parent = os.environ.get(_PARENT)
    if parent is not None and os.getppid() != int(parent):
        raise SystemExit(1)
    os.environ[_PARENT] = str(os.getpid())


def _describe(err: BaseException) -> RankFailure:
    """This process's failure: ``err``, raised by its own rank or reported for a ``ddp_spawn`` rank it started."""
    # A ddp_spawn rank, whose index is its rank on this one machine.
    if isinstance(err, ProcessRaisedException | ProcessExitedException):
        rank = err.error_index
        summary = err.msg.strip() if isinstance(err, ProcessExitedException) else _last_error(err.msg)
        details = err.msg.strip() + "\n"
    else:
        rank = int(getattr(rank_zero_only, "rank", 0))  # Lightning sets it from the environment, then the strategy
        message = " ".join(str(err).split())
        summary = f"{type(err).__name__}: {message}" if message else type(err).__name__
        details = "".join(traceback.format_exception(err))
    return RankFailure(rank=rank, error=f"rank {rank}: {summary}", details=details, time=time.time())


def _last_error(trace: str) -> str:
    """The exception line(s) at the end of a formatted traceback, as one line."""
    lines = trace.rstrip().splitlines()
    last_frame = max((index for index, line in enumerate(lines) if line.startswith(" ")), default=-1)
    return " ".join(" ".join(lines[last_frame + 1 :]).split()) or "an error without a message"


def _read_failures(folder: Path) -> Iterator[RankFailure]:
    for path in folder.glob(f"{_FAILURE_PREFIX}*.json"):
        with contextlib.suppress(OSError, ValueError, TypeError):
            yield RankFailure(**json.loads(path.read_text()))


def _environment(threads: int | None, world_size: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in _RENDEZVOUS}
    env[_PARENT] = str(os.getpid())
    env["PYTHONPATH"] = os.pathsep.join(str(entry) or os.getcwd() for entry in sys.path)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    elif env.get("OMP_NUM_THREADS", "").isdigit():  # e.g. Ray's, for the whole task
        env["OMP_NUM_THREADS"] = str(max(1, int(env["OMP_NUM_THREADS"]) // world_size))
    return env


@contextlib.contextmanager
def _own_session(command: Sequence[str], output: Any, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``command`` in a new session; on the way out, kill whatever of it is still running.

    The session keeps a terminal's Ctrl-C for this process, which then ends the whole command: its
    ranks may be blocked in a collective that would never return.
    """
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    try:
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if hasattr(os, "killpg"):
                os.killpg(process.pid, signal.SIGKILL)
            else:  # no sessions (Windows): the command alone
                process.kill()
        process.wait()
