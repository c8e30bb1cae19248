"""Run the grid: one real Lightning fit per cell, each recorded on disk by the process that trains it.

Where the cells train is up to a launcher (:mod:`lightning_sbp.compare.launchers`): in this
process one after another, as Ray tasks, or one cell per command for an outside scheduler. Every
cell goes through :func:`run_cell` wherever it trains, so it computes the same thing everywhere.
Every run is built by LightningCLI from the base configuration, the grid's overrides and the
cell's arguments, so it trains what ``lightning-sbp fit --config runs/<run_id>/config.yaml`` would
train; the comparison only adds callbacks that measure (and, for ``small-batch``, the epoch
length, which the saved configuration records). Runs log to CSV in their own directory, with
Lightning's progress bar off. A record is written when a fit ends; a run whose record says
``finished`` is not trained again. Records are written atomically (a temporary file, then a
rename), so processes that train different cells can share one output directory.

A run whose trainer starts processes (DDP on several devices) trains in a command of its own
(:mod:`lightning_sbp.compare.processes`): its rank zero writes the record, which holds the world
size, the slowest rank's training time and the examples of every rank; when a rank fails, the
process that started the command records the failure.

Layout of the output directory::

    compare.json                 fingerprint of the base configuration, overrides and keys
    base.yaml                    the base configuration as given
    runs/<run_id>/config.yaml    the run's resolved configuration
    runs/<run_id>/record.json    the run's record
    runs/<run_id>/logs/<method>/ the run's step-level CSV log
    runs/<run_id>/error.txt      the traceback of a failed run
    runs/<run_id>/output.log     what the processes of a run on several devices printed
    summary.md, summary.csv      the summary (see lightning_sbp.compare.report)
    plots/*.png                  the plots (see lightning_sbp.compare.plots)
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import Callback

import lightning_sbp
from lightning_sbp.callback import SelectiveBackprop
from lightning_sbp.cli import (
    SelectiveBackpropCLI,
    rejected_class_summary,
    unknown_argument_summary,
    wrong_type_summary,
)
from lightning_sbp.compare.grid import FULL, SMALL_BATCH, Grid, GridError, Run, override_args
from lightning_sbp.compare.processes import ProcessJob, run_in_processes, starts_processes
from lightning_sbp.compare.squared_ratio import RatioSums, SquaredRatioLog
from lightning_sbp.functional.batch import batch_size
from lightning_sbp.tool_cli import ToolCLI

__all__ = [
    "RECORD_VERSION",
    "BaseInfo",
    "CellJob",
    "EqualStepBudget",
    "Fit",
    "Launcher",
    "RunRecorder",
    "base_args",
    "cell_status",
    "check_output",
    "check_runs",
    "fit_run",
    "inspect_base",
    "load_record",
    "one_line",
    "prepare_output",
    "record_failure",
    "run_cell",
    "run_grid",
    "run_record",
    "warm_up",
]

RECORD_VERSION = 1
"""Version of the layout of ``record.json`` and ``compare.json``."""

_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*The number of training batches.*",
    ".*LeafSpec.*",
    ".*functional.all_gather is deprecated.*",  # Lightning's all_gather, on recent torch
)
_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")


@dataclass(frozen=True)
class BaseInfo:
    """What the comparison reads from the base configuration before any run.

    Attributes:
        batch_size: the batch size ``N``.
        lr: the learning rate, when the configuration has one at the grid's ``lr`` key.
        accelerator: ``trainer.accelerator`` when it is a name (``cpu``, ``gpu``, ``auto``...), else ``None``.
        devices: ``trainer.devices`` as given (a count, a list of indices, ``"auto"``...).
        callbacks: ``trainer.callbacks`` as ``{class_path, init_args}`` mappings.
    """

    batch_size: int
    lr: float | None
    accelerator: str | None = None
    devices: Any = None
    callbacks: tuple[dict[str, Any], ...] = ()


class _ParseOnlyCLI(SelectiveBackpropCLI):
    """The command's LightningCLI up to the parsed configuration: nothing is built."""

    def instantiate_classes(self) -> None:
        """Build nothing."""


def base_args(grid: Grid) -> list[str]:
    """The LightningCLI arguments every run starts from: the base configuration and the overrides."""
    return ["--config", str(grid.base), *override_args(grid.overrides)]


def inspect_base(grid: Grid) -> BaseInfo:
    """Parse the base configuration with the grid's overrides through LightningCLI; build nothing.

    Raises:
        GridError: if the configuration does not parse or has no integer batch size at the grid's
            ``batch_size`` key.
    """
    with _quiet(), _command_line_hidden():
        try:
            cli = _ParseOnlyCLI(args=base_args(grid), run=False, parser_kwargs={"exit_on_error": False})
        except (ArgumentError, ValueError, TypeError) as err:
            raise GridError(f"base configuration {str(grid.base)!r}: {_message(err)}") from None
    config = cli.config
    entries = _as_list(config.get("trainer.callbacks"))
    callbacks = tuple(entry.as_dict() for entry in entries if isinstance(entry, Namespace))
    size = config.get(grid.keys.batch_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise GridError(
            f"base configuration {str(grid.base)!r} has no batch size at {grid.keys.batch_size!r} (got {size!r}); "
            "set `keys: {batch_size: ...}` in the grid file"
        )
    lr = config.get(grid.keys.lr)
    lr = float(lr) if isinstance(lr, int | float) and not isinstance(lr, bool) else None
    accelerator = config.get("trainer.accelerator")
    return BaseInfo(
        batch_size=size,
        lr=lr,
        accelerator=accelerator if isinstance(accelerator, str) else None,
        devices=config.get("trainer.devices"),
        callbacks=callbacks,
    )


def check_runs(grid: Grid, runs: Sequence[Run], here: bool = True) -> None:
    """Build (without training) the model, data and trainer of the first run of every method.

    A wrong key or a value a constructor refuses then fails before any training, not in the
    middle of the grid.

    Args:
        grid: the checked grid.
        runs: the runs of the grid.
        here: whether the runs will train on this machine; if not (Ray tasks on other nodes),
            the trainers are built on one CPU, since this machine may lack the runs' accelerator.

    Raises:
        GridError: naming the run that cannot be built.
    """
    firsts = {run.method: run for run in reversed(runs)}
    elsewhere = [] if here else ["--trainer.accelerator=cpu", "--trainer.devices=1"]
    with tempfile.TemporaryDirectory(prefix="sbp-check-") as scratch, _quiet():
        for run in sorted(firsts.values(), key=runs.index):
            args = [*base_args(grid), *run.args, *elsewhere, *_scratch_args(scratch)]
            try:
                _build_cli(args)
            except (ArgumentError, ValueError, TypeError) as err:
                raise GridError(f"run {run.run_id}: {_message(err)}") from None
            finally:
                gc.collect()


def check_output(grid: Grid, fingerprint: str) -> None:
    """Check that the output directory is new, empty, or holds runs of the same base configuration.

    Raises:
        GridError: if the directory holds runs of another base configuration, or anything that is
            not a comparison.
    """
    output = grid.output
    marker = output / "compare.json"
    if marker.is_file():
        try:
            stored = json.loads(marker.read_text()).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            stored = None
        if stored != fingerprint:
            raise GridError(
                f"output directory {str(output)!r} holds runs of a different base configuration "
                f"(fingerprint {str(stored)[:12]}, this grid's {fingerprint[:12]}: the base file's contents, the "
                "overrides or the keys differ); choose another --output or remove that directory"
            )
    elif output.exists() and (not output.is_dir() or any(not _is_partial(path) for path in output.iterdir())):
        raise GridError(
            f"output directory {str(output)!r} exists and is not a comparison's output (no compare.json); "
            "choose another --output"
        )


def prepare_output(grid: Grid, fingerprint: str) -> None:
    """Create the output directory and mark it with the fingerprint (after :func:`check_output`).

    Safe when several processes prepare the same directory at once: the marker is written first
    and atomically, so another process never sees a directory with files but without a marker.
    """
    output = grid.output
    if (output / "compare.json").is_file():
        return
    output.mkdir(parents=True, exist_ok=True)
    _write_json(
        output / "compare.json",
        {
            "version": RECORD_VERSION,
            "fingerprint": fingerprint,
            "base": str(grid.base),
            "overrides": grid.overrides,
            "keys": vars(grid.keys),
            "created": _now(),
        },
    )
    _write_text(output / "base.yaml", grid.base.read_text())


def load_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path``, or ``None`` if it is missing or unreadable."""
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


class RunRecorder(Callback):
    """Collects what a comparison reports about a fit: validation values, gradient errors, time and examples.

    Validation: at the end of every validation (not the sanity check), the value of ``metric`` with
    the training time, optimiser step and examples backpropagated so far. Training time starts
    with the fit loop (starting processes and setting up data and model are not training) and
    excludes the time spent validating and the time the :class:`~lightning_sbp.SelectiveBackprop`
    callback spent measuring gradient errors (its ``measurement_seconds``), which only the comparison
    needs. Gradient errors: at the end of every training epoch, the epoch means the callback logged
    and the mean squared ratio to random (:mod:`~lightning_sbp.compare.squared_ratio`), for epochs
    that had selective steps. On several devices, times are the slowest rank's and examples the sum
    over ranks, gathered from every rank at each validation and at the end of the fit.

    Args:
        metric: the validation metric to record.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.validations: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.examples_seen = 0
        self.batches_per_epoch: int | None = None
        self.validation_seconds = 0.0
        self.rank_train_seconds: list[float] = []
        self.rank_measurement_seconds: list[float] = []
        self.rank_examples: list[tuple[int, int]] = []
        self._started = time.perf_counter()
        self._validation_started: float | None = None
        self._selective_at_epoch_start = 0
        self._sbp: SelectiveBackprop | None = None
        self._ratios: SquaredRatioLog | None = None
        self.squared_ratios = RatioSums()

    def start(self) -> None:
        """Mark the start of the fit (call right before ``trainer.fit``)."""
        self._started = time.perf_counter()
        self.validation_seconds = 0.0

    def elapsed(self) -> float:
        """Seconds since :meth:`start`."""
        return time.perf_counter() - self._started

    def examples_backpropagated(self) -> int:
        """Examples that went through a backward pass so far."""
        return self._sbp.examples_backpropagated if self._sbp is not None else self.examples_seen

    def measurement_seconds(self) -> float:
        """Seconds the callback spent so far on measurements only the comparison needs (0 without a callback)."""
        return self._sbp.measurement_seconds if self._sbp is not None else 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the clock; find the run's SelectiveBackprop callback, if any, and sum its squared ratios."""
        self._started = time.perf_counter()  # ddp_spawn would otherwise charge starting its processes to training
        self._sbp = next((cb for cb in trainer.callbacks if isinstance(cb, SelectiveBackprop)), None)  # type: ignore[attr-defined]
        if self._sbp is not None:
            self._ratios = SquaredRatioLog.following(self._sbp.step_log)
            self._sbp.step_log = self._ratios

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Note how many batches an epoch has."""
        batches = trainer.num_training_batches
        self.batches_per_epoch = int(batches) if math.isfinite(batches) else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the callback's count of selective steps."""
        self._selective_at_epoch_start = self._sbp.selective_steps if self._sbp is not None else 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the examples of the batch the loader served."""
        self.examples_seen += batch_size(batch)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Record the epoch's mean gradient errors, if the epoch had selective steps."""
        if self._sbp is None:
            return
        steps = self._sbp.selective_steps - self._selective_at_epoch_start
        entry: dict[str, Any] = {"epoch": trainer.current_epoch, "selective_steps": steps}
        for name in ("grad_error", "grad_error_random", "grad_error_ratio"):
            # callback_metrics keeps a key's last value, so an epoch without selective steps would repeat the last one.
            value = trainer.callback_metrics.get(f"sbp/{name}_epoch") if steps > 0 else None
            entry[name] = _float(value)
        ratios = self._ratios.take() if self._ratios is not None else RatioSums()
        self.squared_ratios += ratios
        entry["grad_error_sq_ratio"] = ratios.mean
        entry["measured_steps"] = ratios.count
        self.epochs.append(entry)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start the validation clock."""
        self._validation_started = time.perf_counter()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Stop the validation clock; record the metric unless this was the sanity check."""
        started = self._validation_started if self._validation_started is not None else time.perf_counter()
        train_seconds = started - self._started - self.validation_seconds - self.measurement_seconds()
        self.validation_seconds += time.perf_counter() - started
        self._validation_started = None
        if trainer.sanity_checking:
            return
        slowest, examples = _each_rank(pl_module, [train_seconds, self.examples_backpropagated()])
        self.validations.append(
            {
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "train_seconds": max(slowest),
                "examples_backpropagated": int(sum(examples)),
                "value": _float(trainer.callback_metrics.get(self.metric)),
            }
        )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Gather every rank's training time, measurement time and examples."""
        measured = self.measurement_seconds()
        seconds, measurements, seen, backpropagated = _each_rank(
            pl_module,
            [
                self.elapsed() - self.validation_seconds - measured,
                measured,
                self.examples_seen,
                self.examples_backpropagated(),
            ],
        )
        self.rank_train_seconds = seconds
        self.rank_measurement_seconds = measurements
        self.rank_examples = [(int(a), int(b)) for a, b in zip(seen, backpropagated, strict=True)]


class EqualStepBudget(Callback):
    """Give a ``small-batch`` run as many batches per epoch as the selective runs, whose batches are larger.

    Selective runs take ``ceil(n / N)`` batches of ``N`` per epoch (fewer with ``drop_last`` or a
    base ``limit_train_batches``); a ``small-batch`` run trains on batches of ``k`` and stops each
    epoch after the same number of batches, so it takes the same optimiser steps under the same
    learning-rate schedule and backpropagates the same number of examples. Set in ``setup``,
    before Lightning sizes the epoch and the schedule. On several devices the count is per rank:
    the distributed sampler gives each rank ``ceil(n / ranks)`` examples.

    Args:
        reference_batch_size: the batch size ``N`` of the selective runs.
    """

    def __init__(self, reference_batch_size: int) -> None:
        self.reference_batch_size = reference_batch_size
        self.batches_per_epoch: int | float | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Limit the epoch to the reference run's number of batches."""
        if stage != "fit":
            return
        source = trainer.datamodule if trainer.datamodule is not None else pl_module  # type: ignore[attr-defined]
        loader = source.train_dataloader()
        try:
            examples = len(loader.dataset)
        except TypeError:
            raise ValueError(
                "small-batch needs a training set of known length to match the selective runs' steps per epoch"
            ) from None
        examples = math.ceil(examples / trainer.world_size)
        size = self.reference_batch_size
        full = examples // size if getattr(loader, "drop_last", False) else math.ceil(examples / size)
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches: int = min(full, limit)
        else:
            batches = int(full * (1.0 if limit is None else limit))
        self.batches_per_epoch = batches
        trainer.limit_train_batches = batches


def fit_run(run: Run, grid: Grid, base: BaseInfo, run_dir: Path) -> dict[str, Any]:
    """Train one run and return its record.

    Failures of the fit are recorded (``status: failed`` and the error) rather than raised, so a
    grid goes on with its other runs; ``KeyboardInterrupt`` stops it. A run whose trainer starts
    processes trains in a command of its own, whose rank zero writes ``record.json`` itself; the
    record of any other run is left for the caller to write.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    record = _new_record(run, grid, base)
    started = time.perf_counter()
    try:
        with _quiet():
            cli = _build_cli(_fit_args(run, grid, run_dir))
            record["world_size"] = cli.trainer.world_size
            (run_dir / "config.yaml").write_text(cli.parser.dump(cli.config))
            if starts_processes(cli.trainer):
                del cli
                return _fit_in_own_processes(run, grid, base, run_dir, record)
            _fit(cli, run, grid, base, run_dir, record, write=False)
            interrupted = cli.trainer.interrupted
        if interrupted:
            raise KeyboardInterrupt
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        record["status"] = "failed"
        record["error"] = f"{type(err).__name__}: {_message(err)}"
        (run_dir / "error.txt").write_text(traceback.format_exc())
        record.setdefault("fit_seconds", time.perf_counter() - started)
    finally:
        gc.collect()
    return record


def _fit_args(run: Run, grid: Grid, run_dir: Path) -> list[str]:
    """The LightningCLI arguments of ``run``: its configuration, logging to CSV in ``run_dir``, no progress bar."""
    logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(run_dir / "logs"), "name": run.method, "version": ""},
    }
    return [
        *base_args(grid),
        *run.args,
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run_dir}",
        f"--trainer.logger={json.dumps(logger)}",
    ]


def _fit(
    cli: SelectiveBackpropCLI, run: Run, grid: Grid, base: BaseInfo, run_dir: Path, record: dict[str, Any], write: bool
) -> None:
    """Fit ``cli``'s model with the comparison's callbacks; ``record`` is complete when the fit ends."""
    recorder = RunRecorder(grid.metric)
    budget = EqualStepBudget(base.batch_size) if run.method == SMALL_BATCH else None
    finish = _FinishRecord(record, recorder, budget, grid, run_dir, cli, write)
    trainer = cli.trainer
    trainer.callbacks.extend(callback for callback in (recorder, budget, finish) if callback is not None)  # type: ignore[attr-defined]
    recorder.start()
    trainer.fit(cli.model, datamodule=cli.datamodule)


def _fit_ranks(run: Run, grid: Grid, base: BaseInfo, run_dir: Path, record: dict[str, Any]) -> None:
    """What every process of a run on several devices runs (see :mod:`lightning_sbp.compare.ranks`)."""
    with _quiet():
        _fit(_build_cli(_fit_args(run, grid, run_dir)), run, grid, base, run_dir, record, write=True)


def _fit_in_own_processes(
    run: Run, grid: Grid, base: BaseInfo, run_dir: Path, record: dict[str, Any]
) -> dict[str, Any]:
    """Train ``run`` in a command of its own: its record as rank zero wrote it, or failed as its first failed rank."""
    started = time.perf_counter()
    job = ProcessJob(_fit_ranks, (run, grid, base, run_dir, record))
    failure = run_in_processes(job, run_dir / "output.log", grid.threads, record["world_size"])
    written = load_record(run_dir / "record.json")
    if written is not None:
        return written
    if failure is None:
        record["error"] = f"the fit ended without a record; see {run_dir / 'output.log'}"
        details = ""
    else:
        record["error"], details = failure.error, failure.details
    _write_text(run_dir / "error.txt", details)
    record["fit_seconds"] = time.perf_counter() - started
    return record


class _FinishRecord(Callback):
    """Complete a run's record when its fit ends; on rank zero, save what the run leaves on disk.

    Runs after the run's :class:`RunRecorder` (it comes later in the trainer's callbacks), whose
    numbers it reads once they are gathered from every rank. On global rank zero it writes the
    ``small-batch`` run's epoch length into ``config.yaml``, refuses a run whose metric was never
    logged, and, with ``write``, writes ``record.json``: the process that started the ranks of a run
    on several devices sees none of their callbacks.
    """

    def __init__(
        self,
        record: dict[str, Any],
        recorder: RunRecorder,
        budget: EqualStepBudget | None,
        grid: Grid,
        run_dir: Path,
        cli: SelectiveBackpropCLI,
        write: bool,
    ) -> None:
        self.record = record
        self.recorder = recorder
        self.budget = budget
        self.mode = grid.mode
        self.metric = grid.metric
        self.run_dir = run_dir
        self.parser = cli.parser
        self.config = cli.config
        self.write = write

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Summarise the fit into the record; on rank zero, check it and save it."""
        record = self.record
        record.update(_summarise(self.recorder, self.mode, self.recorder.elapsed(), trainer.global_step))
        record["threads"] = torch.get_num_threads()
        if not trainer.is_global_zero:
            return
        record["load_average"].append(_load_average())
        if self.budget is not None:
            self.config["trainer.limit_train_batches"] = self.budget.batches_per_epoch
            (self.run_dir / "config.yaml").write_text(self.parser.dump(self.config))
        if not record["validation"]:
            raise ValueError(
                f"no validation ran before the fit ended at optimiser step {trainer.global_step} (validation runs "
                f"after every {trainer.check_val_every_n_epoch} epoch(s) unless val_check_interval says otherwise), "
                f"so the run has no {self.metric!r}: give it a budget that reaches a validation (max_epochs, or "
                "max_steps of at least an epoch), or a val_check_interval within it"
            )
        if all(entry["value"] is None for entry in record["validation"]):
            logged = sorted(key for key in trainer.callback_metrics if not key.startswith(("sbp/", "train")))
            raise ValueError(
                f"the metric {self.metric!r} was never logged at a validation end (logged: "
                f"{', '.join(logged) or 'nothing'}); set `metric:` in the grid file to a key the model logs during "
                "validation"
            )
        record["status"] = "finished"
        if self.write:
            _write_json(self.run_dir / "record.json", record)


def _new_record(run: Run, grid: Grid, base: BaseInfo) -> dict[str, Any]:
    """The record of ``run`` before its fit: settings, environment, and ``status: failed`` until it finishes."""
    return {
        "version": RECORD_VERSION,
        "run_id": run.run_id,
        **run.spec(),
        "lr": run.lr if run.lr is not None else base.lr,
        "metric": grid.metric,
        "mode": grid.mode,
        "status": "failed",
        "error": None,
        "world_size": None,
        "started": _now(),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average": [_load_average()],
        "versions": {
            "torch": torch.__version__,
            "lightning": pl.__version__,
            "lightning_sbp": lightning_sbp.__version__,
        },
    }


def record_failure(run: Run, grid: Grid, base: BaseInfo, error: str, details: str) -> dict[str, Any]:
    """Record ``run`` as failed for a reason outside its fit (its worker died, its task could not start).

    Writes ``record.json`` and ``error.txt`` (``details``) in the run's directory and returns the record.
    """
    run_dir = grid.output / "runs" / run.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {**_new_record(run, grid, base), "error": error}
    _write_text(run_dir / "error.txt", details)
    _write_json(run_dir / "record.json", record)
    return record


def warm_up(run: Run, grid: Grid) -> None:
    """Two training steps and one validation step of ``run``, thrown away.

    The first fit in a process pays one-time costs (lazy initialisation in torch and Lightning,
    first calls of every kernel); without a warm-up they would be charged to whichever run comes
    first and bias its time. Failures are left for the real run to record.
    """
    global _warmed_up
    with tempfile.TemporaryDirectory(prefix="sbp-warmup-") as scratch, _quiet():
        args = [
            *base_args(grid),
            *run.args,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            *_scratch_args(scratch),
        ]
        try:
            cli = _build_cli(args)
            if not starts_processes(cli.trainer):  # those runs train in processes of their own, each cold alike
                cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        except Exception:  # the real run records what went wrong
            pass
        finally:
            gc.collect()
    _warmed_up = True


_warmed_up = False
"""Whether this process has run :func:`warm_up` (a Ray worker trains many cells, and warms up once)."""

Fit = Callable[[Run, Grid, BaseInfo, Path], dict[str, Any]]
"""Trains one run in the given directory and returns its record (:func:`fit_run`)."""


def run_cell(run: Run, grid: Grid, base: BaseInfo, fit: Fit = fit_run, warmup: bool = True) -> dict[str, Any]:
    """Train one cell in this process and write its record: what every launcher runs for every cell.

    Sets the grid's thread count, warms the process up once (on this cell) unless ``warmup`` is
    false, removes what an interrupted or failed attempt left, trains, and writes
    ``runs/<run_id>/record.json`` atomically, unless rank zero of a run on several devices did.

    Returns:
        The record, ``finished`` or ``failed``.
    """
    if grid.threads is not None:
        torch.set_num_threads(grid.threads)
    if warmup and not _warmed_up:
        warm_up(run, grid)
    run_dir = grid.output / "runs" / run.run_id
    if run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted or failed attempt starts over
    record = fit(run, grid, base, run_dir)
    if not (run_dir / "record.json").is_file():  # rank zero of a run on several devices wrote it
        _write_json(run_dir / "record.json", record)
    return record


@dataclass(frozen=True)
class CellJob:
    """What a launcher needs to train any cell of the grid; picklable, so it can travel to other processes.

    Attributes:
        grid: the checked grid.
        base: what :func:`inspect_base` read.
        fit: trains one run (:func:`fit_run`).
        warmup: warm each process up once before its first cell.
    """

    grid: Grid
    base: BaseInfo
    fit: Fit = fit_run
    warmup: bool = True

    def __call__(self, run: Run) -> dict[str, Any]:
        """Train ``run`` and write its record (:func:`run_cell`)."""
        return run_cell(run, self.grid, self.base, self.fit, self.warmup)

    def failed(self, run: Run, error: BaseException, details: str) -> dict[str, Any]:
        """Record ``run`` as failed for ``error``, raised outside its fit (:func:`record_failure`)."""
        return record_failure(run, self.grid, self.base, f"{type(error).__name__}: {_message(error)}", details)


class Launcher(Protocol):
    """Where the cells of a grid train (implementations: :mod:`lightning_sbp.compare.launchers`)."""

    in_process: bool
    """Whether cells train in this process (the grid then warms this process up before the first cell)."""

    def run(
        self,
        runs: Sequence[Run],
        job: CellJob,
        finished: Callable[[Run, dict[str, Any]], None],
        status: Callable[[str], None],
    ) -> None:
        """Train every run with ``job``, calling ``finished(run, record)`` as each one ends.

        ``status(text)`` shows what is training on the progress bar. A run that
        fails is reported through ``finished`` with a failed record; on ``KeyboardInterrupt`` the
        launcher stops its runs and re-raises.
        """


def run_grid(
    grid: Grid,
    runs: Sequence[Run],
    base: BaseInfo,
    launcher: Launcher,
    progress: bool = True,
    fit: Fit = fit_run,
    warmup: bool = True,
) -> list[dict[str, Any]]:
    """Train every run that has no finished record; return the records of all runs, in grid order.

    Args:
        grid: the checked grid.
        runs: the runs to do, from :func:`~lightning_sbp.compare.grid.expand`.
        base: what :func:`inspect_base` read.
        launcher: where the cells train.
        progress: show one progress bar over the runs (on stderr), counting finished and reused ones.
        fit: trains one run and returns its record.
        warmup: warm every process that trains cells up once; in this process, on a selective run.

    Raises:
        KeyboardInterrupt: on Ctrl-C, after the launcher stopped its cells; records written so far are kept.
    """
    reused = {run.run_id: record for run in runs if (record := _finished_record(grid, run)) is not None}
    todo = [run for run in runs if run.run_id not in reused]
    if launcher.in_process and warmup and todo:
        if grid.threads is not None:
            torch.set_num_threads(grid.threads)
        warm_up(next((run for run in todo if run.method not in (FULL, SMALL_BATCH)), todo[0]), grid)
    records = dict(reused)
    with _progress(len(runs), progress) as bar:
        if reused:
            bar.write(f"reused {len(reused)} finished runs of {len(runs)}; {len(todo)} to train", file=sys.stderr)
            bar.update(len(reused))

        def finished(run: Run, record: dict[str, Any]) -> None:
            records[run.run_id] = record
            bar.write(one_line(record), file=sys.stderr)
            bar.update(1)

        if todo:
            launcher.run(todo, CellJob(grid, base, fit, warmup), finished, bar.set_postfix_str)
    return [records[run.run_id] for run in runs if run.run_id in records]


def run_record(grid: Grid, run: Run) -> dict[str, Any] | None:
    """The record of ``run`` in the grid's output directory, finished or failed; ``None`` if it has none."""
    record = load_record(grid.output / "runs" / run.run_id / "record.json")
    return record if record is not None and record.get("run_id") == run.run_id else None


def cell_status(grid: Grid, run: Run) -> str:
    """``finished``, ``failed`` or ``pending`` (no record yet: never started, running, or interrupted)."""
    record = run_record(grid, run)
    if record is None:
        return "pending"
    return "finished" if record.get("status") == "finished" else "failed"


def _finished_record(grid: Grid, run: Run) -> dict[str, Any] | None:
    record = run_record(grid, run)
    return record if record is not None and record.get("status") == "finished" else None


def _scratch_args(directory: str) -> list[str]:
    """Arguments of a throw-away fit: nothing saved or shown, its log (for callbacks that need one) in ``directory``."""
    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": directory}}
    return [
        f"--trainer.logger={json.dumps(logger)}",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={directory}",
    ]


def _build_cli(args: list[str]) -> SelectiveBackpropCLI:
    with _command_line_hidden():
        return ToolCLI(args=args, run=False, save_config_callback=None, parser_kwargs={"exit_on_error": False})


class _NoBar:
    def update(self, count: int) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def write(self, text: str, file: Any = None) -> None:
        (file or sys.stderr).write(text + "\n")


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield _NoBar()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield _NoBar()
        return
    bar = tqdm(total=total, desc="compare", unit="run", file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


@contextlib.contextmanager
def _command_line_hidden() -> Iterator[None]:
    """``sys.argv`` out of LightningCLI's sight: it warns when it gets both ``args`` and command-line arguments.

    Only while a CLI is built: Lightning starts the ranks of a ``ddp`` fit from ``sys.argv``.
    """
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        yield
    finally:
        sys.argv = argv


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's info messages off, and known harmless warnings off."""
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    try:
        for name in _LIGHTNING_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        with warnings.catch_warnings():
            for pattern in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def _summarise(recorder: RunRecorder, mode: str, fit_seconds: float, optimizer_steps: int) -> dict[str, Any]:
    values = [entry["value"] for entry in recorder.validations if entry["value"] is not None]
    selective = sum(entry["selective_steps"] for entry in recorder.epochs)
    means: dict[str, float | None] = {}
    for name in ("grad_error", "grad_error_random", "grad_error_ratio"):
        weighted = [(e[name], e["selective_steps"]) for e in recorder.epochs if e[name] is not None]
        total = sum(steps for _, steps in weighted)
        means[name] = sum(value * steps for value, steps in weighted) / total if total else None
    # The run's time is its slowest rank's, and so is the measurement time reported beside it.
    slowest = max(range(len(recorder.rank_train_seconds)), key=recorder.rank_train_seconds.__getitem__)
    return {
        "validation": recorder.validations,
        "epochs": recorder.epochs,
        "final": values[-1] if values else None,
        "best": (max(values) if mode == "max" else min(values)) if values else None,
        **means,
        "grad_error_sq_ratio": recorder.squared_ratios.mean,
        "grad_error_sq_ratio_se": recorder.squared_ratios.standard_error,
        "measured_steps": recorder.squared_ratios.count,
        "selective_steps": selective,
        "fit_seconds": fit_seconds,
        "validation_seconds": recorder.validation_seconds,
        "measurement_seconds": recorder.rank_measurement_seconds[slowest],
        "train_seconds": recorder.rank_train_seconds[slowest],
        "rank_train_seconds": recorder.rank_train_seconds,
        "examples_seen": sum(seen for seen, _ in recorder.rank_examples),
        "examples_backpropagated": sum(backpropagated for _, backpropagated in recorder.rank_examples),
        "optimizer_steps": optimizer_steps,
        "batches_per_epoch": recorder.batches_per_epoch,
    }


def _each_rank(pl_module: pl.LightningModule, values: Sequence[float]) -> list[list[float]]:
    """Each of ``values`` as it is on every rank, in rank order.

    A collective when the fit has several ranks: every rank must call it at the same point.
    """
    if pl_module.trainer.world_size == 1:
        return [[float(value)] for value in values]
    gathered = pl_module.all_gather(torch.tensor(values, dtype=torch.float64))
    assert isinstance(gathered, torch.Tensor)  # [ranks, values]
    return gathered.T.cpu().tolist()


def one_line(record: dict[str, Any]) -> str:
    """A record in one line: the metric, time and examples of a finished run, the error of a failed one."""
    if record.get("status") != "finished":
        return f"{record['run_id']}: failed: {record.get('error')}"
    return (
        f"{record['run_id']}: {record['metric']} {record['final']:.4f} (best {record['best']:.4f}), "
        f"{record['train_seconds']:.1f} s training, {record['examples_backpropagated']} examples backpropagated"
    )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _float(value: Any) -> float | None:
    if value is None:
        return None
    number = float(value.item() if isinstance(value, torch.Tensor) else value)
    return number if math.isfinite(number) else None


def _message(err: BaseException) -> str:
    """The error in one line: for an unknown argument of a class, the key, its closest match and the accepted ones."""
    summary = unknown_argument_summary(str(err)) or wrong_type_summary(str(err)) or rejected_class_summary(str(err))
    if summary is not None:
        return summary
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _load_average() -> float | None:
    """The 1-minute load average of the machine (``None`` where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_PARTIAL_SUFFIX = ".partial"


def _write_json(path: Path, value: Any) -> None:
    _write_text(path, json.dumps(value, indent=2) + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically: readers and concurrent writers see a whole file or none."""
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_PARTIAL_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def _is_partial(path: Path) -> bool:
    """Whether ``path`` is the temporary file of a write in progress."""
    return path.name.startswith(".") and path.name.endswith(_PARTIAL_SUFFIX)
