"""The summary of a comparison: one row per method, keep fraction and label-noise level, as Markdown and CSV.

Every number is computed from the run records: means and sample standard deviations over seeds.
With a learning-rate grid, each method keeps the learning rate with the best mean final
validation value; every learning rate's row is in ``summary_all.csv``.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning_sbp.compare.grid import FULL, Grid

__all__ = [
    "CSV_COLUMNS",
    "Row",
    "format_mean_std",
    "markdown_table",
    "seconds_decimals",
    "select_best_lr",
    "summarise",
    "write_csv",
]


@dataclass
class Row:
    """One line of the summary: the runs of one method, keep fraction, noise level and learning rate.

    Attributes:
        label_noise: the label-noise level (``None``: the base configuration's).
        method: ``full``, ``small-batch`` or a selector.
        keep: the keep fraction (``None`` for ``full``).
        lr: the learning rate (``None`` when the base configuration has none at the grid's key).
        seeds: the seeds of the finished runs.
        run_ids: their run ids.
        final_mean: mean over seeds of the metric at the last validation.
        final_std: its sample standard deviation (``None`` with one seed).
        best_mean: mean over seeds of the best validation value of each run.
        best_std: its sample standard deviation.
        grad_error: mean ``sbp/grad_error`` over selective steps and seeds (``None`` without selection).
        grad_error_random: mean closed-form error of a random subset of the same size, same steps.
        grad_error_ratio: mean of the per-step ratio of the two (below 1 even for random selection).
        grad_error_sq_ratio: mean over seeds of each run's mean squared ratio ``e² / r²``, whose
            expectation is exactly 1 for random selection (see :mod:`~lightning_sbp.compare.squared_ratio`).
        grad_error_sq_ratio_std: its sample standard deviation over seeds.
        fit_seconds: mean wall-clock time of ``trainer.fit``.
        measurement_seconds: mean time the callback spent measuring gradient errors, excluded from
            the training time (``None`` when not timed).
        train_seconds_mean: mean wall-clock time of the fit without validation and measurements.
        train_seconds_std: its sample standard deviation.
        speedup: ``full``'s mean training time at the same noise level divided by this row's.
        examples_backpropagated: mean number of examples that went through a backward pass.
        optimizer_steps: mean number of optimiser steps.
    """

    label_noise: float | None
    method: str
    keep: float | None
    lr: float | None
    seeds: list[int] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    final_mean: float | None = None
    final_std: float | None = None
    best_mean: float | None = None
    best_std: float | None = None
    grad_error: float | None = None
    grad_error_random: float | None = None
    grad_error_ratio: float | None = None
    grad_error_sq_ratio: float | None = None
    grad_error_sq_ratio_std: float | None = None
    fit_seconds: float | None = None
    measurement_seconds: float | None = None
    train_seconds_mean: float | None = None
    train_seconds_std: float | None = None
    speedup: float | None = None
    examples_backpropagated: float | None = None
    optimizer_steps: float | None = None

    @property
    def cell(self) -> tuple[float | None, str, float | None]:
        """``(label_noise, method, keep)``: what the learning rate is chosen for."""
        return (self.label_noise, self.method, self.keep)


CSV_COLUMNS = [name for name in Row.__dataclass_fields__]
"""The columns of ``summary.csv`` and ``summary_all.csv``, in order."""


def summarise(records: Iterable[dict[str, Any]], grid: Grid) -> list[Row]:
    """One row per label noise, method, keep fraction and learning rate, over the finished records.

    Rows follow the grid's order of noise levels, methods, keep fractions and learning rates.
    Speedups are left to :func:`select_best_lr`, which knows which ``full`` row is the reference.
    """
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for record in records:
        if record.get("status") != "finished":
            continue
        key = (record["label_noise"], record["method"], record["keep"], record["lr"])
        groups.setdefault(key, []).append(record)
    rows = [_row(key, sorted(group, key=lambda r: r["seed"])) for key, group in groups.items()]

    def order(row: Row) -> tuple[int, int, int, float]:
        keeps = [None, *grid.keep]
        return (
            _position(grid.label_noise, row.label_noise),
            _position(grid.methods, row.method),
            _position(keeps, row.keep),
            row.lr if row.lr is not None else 0.0,
        )

    return sorted(rows, key=order)


def select_best_lr(rows: Sequence[Row], mode: str) -> list[Row]:
    """For each noise level, method and keep fraction, the row whose learning rate has the best mean final value.

    Also fills in the speedups against the selected ``full`` row of the same noise level. Ties go
    to the first learning rate in the grid's order.
    """
    best: dict[tuple[float | None, str, float | None], Row] = {}
    for row in rows:
        current = best.get(row.cell)
        if current is None or _better(row.final_mean, current.final_mean, mode):
            best[row.cell] = row
    selected = [row for row in rows if best[row.cell] is row]
    for row in rows:
        reference = best.get((row.label_noise, FULL, None))
        row.speedup = (
            reference.train_seconds_mean / row.train_seconds_mean
            if reference is not None and reference.train_seconds_mean and row.train_seconds_mean
            else None
        )
    return selected


def format_mean_std(mean: float | None, std: float | None, digits: int) -> str:
    """``mean ± std`` with ``digits`` decimals; just the mean without a deviation; ``–`` without a mean."""
    if mean is None:
        return "–"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def seconds_decimals(rows: Sequence[Row]) -> int:
    """Decimals that give the shortest mean train time of ``rows`` two significant digits (1 at least, 4 at most)."""
    times = [row.train_seconds_mean for row in rows if row.train_seconds_mean]
    if not times:
        return 1
    return min(4, max(1, 1 - math.floor(math.log10(min(times)))))


def markdown_table(rows: Sequence[Row], metric: str) -> str:
    """The summary table in Markdown (one line per row, numbers rounded for reading)."""
    header = [
        "noise",
        "method",
        "keep",
        "lr",
        "seeds",
        f"final {metric}",
        f"best {metric}",
        "grad error",
        "error² / random's",
        "train time (s)",
        "speedup",
        "examples backprop",
    ]
    seconds = seconds_decimals(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        cells = [
            _number(row.label_noise, "g", "base"),
            row.method,
            _number(row.keep, "g", "1"),
            _number(row.lr, "g"),
            str(len(row.seeds)),
            format_mean_std(row.final_mean, row.final_std, 4),
            format_mean_std(row.best_mean, row.best_std, 4),
            _number(row.grad_error, ".3f"),
            format_mean_std(row.grad_error_sq_ratio, row.grad_error_sq_ratio_std, 3),
            format_mean_std(row.train_seconds_mean, row.train_seconds_std, seconds),
            "–" if row.speedup is None else f"{row.speedup:.2f}×",
            _number(row.examples_backpropagated, ",.0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """Write the rows with every column at full precision; lists are joined with ``;``, ``None`` is empty."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            values = asdict(row)
            writer.writerow({name: _csv_value(values[name]) for name in CSV_COLUMNS})


def _row(key: tuple[Any, ...], records: list[dict[str, Any]]) -> Row:
    noise, method, keep, lr = key
    final_mean, final_std = _mean_std([r["final"] for r in records])
    best_mean, best_std = _mean_std([r["best"] for r in records])
    train_mean, train_std = _mean_std([r["train_seconds"] for r in records])
    squared_mean, squared_std = _mean_std([r.get("grad_error_sq_ratio") for r in records])
    return Row(
        label_noise=noise,
        method=method,
        keep=keep,
        lr=lr,
        seeds=[r["seed"] for r in records],
        run_ids=[r["run_id"] for r in records],
        final_mean=final_mean,
        final_std=final_std,
        best_mean=best_mean,
        best_std=best_std,
        grad_error=_mean_std([r.get("grad_error") for r in records])[0],
        grad_error_random=_mean_std([r.get("grad_error_random") for r in records])[0],
        grad_error_ratio=_mean_std([r.get("grad_error_ratio") for r in records])[0],
        grad_error_sq_ratio=squared_mean,
        grad_error_sq_ratio_std=squared_std,
        fit_seconds=_mean_std([r["fit_seconds"] for r in records])[0],
        measurement_seconds=_mean_std([r.get("measurement_seconds") for r in records])[0],
        train_seconds_mean=train_mean,
        train_seconds_std=train_std,
        examples_backpropagated=_mean_std([r["examples_backpropagated"] for r in records])[0],
        optimizer_steps=_mean_std([r["optimizer_steps"] for r in records])[0],
    )


def _mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    numbers = [float(value) for value in values if value is not None]
    if not numbers:
        return None, None
    mean = statistics.fmean(numbers)
    return mean, (statistics.stdev(numbers) if len(numbers) > 1 else None)


def _better(candidate: float | None, current: float | None, mode: str) -> bool:
    if candidate is None or (isinstance(candidate, float) and math.isnan(candidate)):
        return False
    if current is None:
        return True
    return candidate > current if mode == "max" else candidate < current


def _position(values: Sequence[Any], value: Any) -> int:
    return values.index(value) if value in values else len(values)


def _number(value: float | None, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list):
        return ";".join(str(item) for item in value)
    return value
