"""Time to accuracy: how long each method trains until validation first reaches a target.

The headline measure of the Selective Backprop papers. The target of a noise level is ``full``'s
mean final value there minus a tolerance (plus it, for a metric where lower is better); for each
run, the training wall-clock time (validation excluded) and the examples backpropagated at the
first validation that reaches it. A method's speedup is ``full``'s mean time to the target over its
own, computed from the runs that reached it; runs that never reach it are counted, not hidden.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_sbp.compare.grid import FULL
from lightning_sbp.compare.report import Row

__all__ = ["DEFAULT_TOLERANCE", "TimeToTarget", "first_reach", "markdown_table", "time_to_target"]

DEFAULT_TOLERANCE = 0.01
"""How far below ``full``'s final value (for a higher-is-better metric) the default target lies."""


@dataclass(frozen=True)
class TimeToTarget:
    """One row's time to its noise level's target.

    Attributes:
        label_noise: the noise level.
        method: the method.
        keep: its keep fraction (``None`` for ``full``).
        target: the validation value to reach.
        runs: how many runs the row has.
        reached: how many of them reached the target.
        seconds: mean training time to the target over the runs that reached it.
        examples: mean examples backpropagated to the target over those runs.
        speedup: ``full``'s mean ``seconds`` over this row's (``None`` if either never reached it).
    """

    label_noise: float | None
    method: str
    keep: float | None
    target: float
    runs: int
    reached: int
    seconds: float | None
    examples: float | None
    speedup: float | None = None


def first_reach(validation: Sequence[dict[str, Any]], target: float, mode: str) -> dict[str, Any] | None:
    """The first validation entry of a run whose value reaches ``target``; ``None`` if none does."""
    for entry in validation:
        value = entry.get("value")
        if value is not None and (value >= target if mode == "max" else value <= target):
            return entry
    return None


def time_to_target(
    rows: Sequence[Row], records: Iterable[dict[str, Any]], mode: str, tolerance: float = DEFAULT_TOLERANCE
) -> list[TimeToTarget]:
    """Time to the target for every row whose noise level has a ``full`` row (which sets the target)."""
    by_id = {record["run_id"]: record for record in records}
    targets = {
        row.label_noise: row.final_mean + (-tolerance if mode == "max" else tolerance)
        for row in rows
        if row.method == FULL and row.final_mean is not None
    }
    results: list[TimeToTarget] = []
    for row in rows:
        target = targets.get(row.label_noise)
        if target is None:
            continue
        hits = []
        for run_id in row.run_ids:
            record = by_id.get(run_id)
            if record is not None:
                hits.append(first_reach(record.get("validation", []), target, mode))
        reached = [hit for hit in hits if hit is not None]
        results.append(
            TimeToTarget(
                label_noise=row.label_noise,
                method=row.method,
                keep=row.keep,
                target=target,
                runs=len(hits),
                reached=len(reached),
                seconds=statistics.fmean(hit["train_seconds"] for hit in reached) if reached else None,
                examples=statistics.fmean(hit["examples_backpropagated"] for hit in reached) if reached else None,
            )
        )
    reference = {r.label_noise: r.seconds for r in results if r.method == FULL}
    return [_with_speedup(result, reference.get(result.label_noise)) for result in results]


def _with_speedup(result: TimeToTarget, full_seconds: float | None) -> TimeToTarget:
    if full_seconds is None or not result.seconds:
        return result
    return TimeToTarget(**{**result.__dict__, "speedup": full_seconds / result.seconds})


def markdown_table(results: Sequence[TimeToTarget], metric: str) -> str:
    """The time-to-accuracy table in Markdown."""
    lines = [
        f"| noise | method | keep | target {metric} | reached | train time to target (s) | examples backprop "
        "| speedup |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        never = result.reached == 0
        cells = [
            "base" if result.label_noise is None else f"{result.label_noise:g}",
            result.method,
            "1" if result.keep is None else f"{result.keep:g}",
            f"{result.target:.4f}",
            f"{result.reached}/{result.runs}",
            "never" if never or result.seconds is None else f"{result.seconds:.1f}",
            "never" if never or result.examples is None else f"{result.examples:,.0f}",
            "–" if result.speedup is None else f"{result.speedup:.2f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
