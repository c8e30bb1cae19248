"""Time to accuracy: how long each method trains until validation first reaches a target, against full, seed by seed.

The headline measure of the Selective Backprop papers. The target of a noise level is ``full``'s
mean final value there minus a tolerance (plus it, for a metric where lower is better). Each run's
time to the target is the training wall-clock time (validation and the comparison's measurements
excluded) at its first validation that reaches it.

A run that never reaches the target is *censored*: its time to the target is only known to exceed
its whole training time. It is counted at that time, never dropped. The speedup is paired: on each
seed, ``full``'s time over the method's on the same seed (same initial weights and data order),
and the row's speedup is the geometric mean over seeds, with the Student-t confidence interval and
p-value of the mean log speedup. When some of the method's runs are censored, each such seed's
speedup is an upper bound, and so is the row's (shown ``≤``); when ``full``'s are, a lower bound
(``≥``). A bound is not tested: only rows whose every pair reached the target take part in the
table's family of tests.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_sbp.compare.grid import FULL, is_aa
from lightning_sbp.compare.multiplicity import adjust
from lightning_sbp.compare.report import Row
from lightning_sbp.compare.significance import Interval, paired_interval

__all__ = [
    "DEFAULT_TOLERANCE",
    "SeedTime",
    "TimeToTarget",
    "first_reach",
    "markdown_table",
    "seed_time",
    "time_to_target",
]

DEFAULT_TOLERANCE = 0.01
"""How far below ``full``'s final value (for a higher-is-better metric) the default target lies."""


@dataclass(frozen=True)
class SeedTime:
    """One run's time to the target.

    Attributes:
        seed: the run's seed.
        seconds: training time at the first validation that reached the target; for a censored run,
            its whole training time (a lower bound of the time it would need).
        examples: examples backpropagated by then (the whole run's, when censored).
        censored: the run never reached the target.
    """

    seed: int
    seconds: float
    examples: float
    censored: bool


@dataclass(frozen=True)
class TimeToTarget:
    """One row's time to its noise level's target, and its speedup against ``full`` on the same seeds.

    Attributes:
        label_noise: the noise level.
        method: the method.
        keep: its keep fraction (``None`` for ``full``).
        target: the validation value to reach.
        times: one entry per run, in seed order.
        speedup: the geometric mean over the seeds shared with ``full`` of ``full``'s time over the
            method's (``None`` for ``full`` itself or without shared seeds).
        log_interval: the mean log speedup with its confidence interval and p-value.
        bound: ``"upper"`` when some of the method's runs are censored (the true speedup is at most
            ``speedup``), ``"lower"`` when only ``full``'s are, ``"none"`` when both are; ``None``
            when every pair reached the target.
        adjusted_p: the p-value adjusted over the table (``None`` for bounds and single seeds).
    """

    label_noise: float | None
    method: str
    keep: float | None
    target: float
    times: tuple[SeedTime, ...]
    speedup: float | None = None
    log_interval: Interval | None = None
    bound: str | None = None
    adjusted_p: float | None = None

    @property
    def runs(self) -> int:
        """How many runs the row has."""
        return len(self.times)

    @property
    def reached(self) -> int:
        """How many of them reached the target."""
        return sum(1 for time in self.times if not time.censored)

    @property
    def beyond_noise(self) -> bool:
        """Whether the speedup differs from 1 beyond seed noise, after the table's adjustment."""
        confidence = self.log_interval.confidence if self.log_interval is not None else 0.95
        return self.adjusted_p is not None and self.adjusted_p < 1.0 - confidence


def first_reach(validation: Sequence[dict[str, Any]], target: float, mode: str) -> dict[str, Any] | None:
    """The first validation entry of a run whose value reaches ``target``; ``None`` if none does."""
    for entry in validation:
        value = entry.get("value")
        if value is not None and (value >= target if mode == "max" else value <= target):
            return entry
    return None


def seed_time(record: dict[str, Any], target: float, mode: str) -> SeedTime:
    """A run's time to ``target``, censored at its whole training time if it never got there."""
    hit = first_reach(record.get("validation", []), target, mode)
    if hit is not None:
        return SeedTime(int(record["seed"]), float(hit["train_seconds"]), float(hit["examples_backpropagated"]), False)
    return SeedTime(int(record["seed"]), float(record["train_seconds"]), float(record["examples_backpropagated"]), True)


def time_to_target(
    rows: Sequence[Row],
    records: Iterable[dict[str, Any]],
    mode: str,
    tolerance: float = DEFAULT_TOLERANCE,
    correction: str = "holm",
) -> list[TimeToTarget]:
    """Time to the target for every row whose noise level has a ``full`` row (which sets the target).

    The p-values of the rows whose every pair reached the target are adjusted together by ``correction``.
    """
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
        runs = [by_id[run_id] for run_id in row.run_ids if run_id in by_id]
        times = tuple(sorted((seed_time(record, target, mode) for record in runs), key=lambda time: time.seed))
        results.append(TimeToTarget(row.label_noise, row.method, row.keep, target, times))
    fulls = {result.label_noise: result for result in results if result.method == FULL}
    paired = [_paired(result, fulls.get(result.label_noise)) for result in results]
    tested = [i for i, result in enumerate(paired) if result.bound is None and _p(result) is not None]
    for i, value in zip(tested, adjust([_p(paired[i]) or 0.0 for i in tested], correction), strict=True):
        paired[i] = dataclasses.replace(paired[i], adjusted_p=value)
    return paired


def _p(result: TimeToTarget) -> float | None:
    interval = result.log_interval
    return None if interval is None or not math.isfinite(interval.p_value) else interval.p_value


def _paired(result: TimeToTarget, full: TimeToTarget | None) -> TimeToTarget:
    """``result`` with its speedup against ``full`` on the seeds both have."""
    if full is None or result.method == FULL:
        return result
    reference = {time.seed: time for time in full.times}
    pairs = [(reference[time.seed], time) for time in result.times if time.seed in reference]
    if not pairs:
        return result
    interval = paired_interval([math.log(theirs.seconds / ours.seconds) for theirs, ours in pairs])
    ours_censored = any(ours.censored for _, ours in pairs)
    theirs_censored = any(theirs.censored for theirs, _ in pairs)
    bound = {(False, False): None, (True, False): "upper", (False, True): "lower", (True, True): "none"}
    return dataclasses.replace(
        result,
        speedup=math.exp(interval.mean),
        log_interval=interval,
        bound=bound[(ours_censored, theirs_censored)],
    )


def markdown_table(results: Sequence[TimeToTarget], metric: str) -> str:
    """The time-to-accuracy table in Markdown.

    Per row: the target, how many runs reached it, each seed's time (``>t`` for a censored run), the
    mean examples backpropagated to it (``≥`` when some runs are censored), and the paired speedup
    against full with its 95% interval and whether it differs from 1 beyond seed noise.
    """
    lines = [
        f"| noise | method | keep | target {metric} | reached | train time to target per seed (s) "
        "| examples backprop | speedup vs full [95% CI] | beyond noise (adj. p) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for result in results:
        examples = statistics.fmean(time.examples for time in result.times) if result.times else None
        censored = result.reached < result.runs
        cells = [
            "base" if result.label_noise is None else f"{result.label_noise:g}",
            f"{result.method} (A/A)" if is_aa(result.method) else result.method,
            "1" if result.keep is None else f"{result.keep:g}",
            f"{result.target:.4f}",
            f"{result.reached}/{result.runs}",
            ", ".join(f"{'>' if time.censored else ''}{time.seconds:.1f}" for time in result.times) or "–",
            "–" if examples is None else f"{'≥ ' if censored else ''}{examples:,.0f}",
            _speedup_cell(result),
            _noise_cell(result),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _speedup_cell(result: TimeToTarget) -> str:
    interval = result.log_interval
    if result.speedup is None or interval is None:
        return "–"
    if result.bound == "none":
        return "? (both censored)"
    prefix = {"upper": "≤ ", "lower": "≥ "}.get(result.bound or "", "")
    text = f"{prefix}{result.speedup:.2f}×"
    if interval.pairs > 1 and result.bound is None:
        text += f" [{math.exp(interval.low):.2f}, {math.exp(interval.high):.2f}]"
    return text


def _noise_cell(result: TimeToTarget) -> str:
    if result.method == FULL or result.log_interval is None:
        return "–"
    if result.bound is not None:
        never = sum(1 for time in result.times if time.censored)
        why = [f"{never} of {result.runs} never reached it"] if never else []
        why += ["full did not reach it on every seed"] if result.bound in ("lower", "none") else []
        return "not tested: " + "; ".join(why)
    if result.adjusted_p is None:
        return "one seed" if result.log_interval.pairs < 2 else "no spread over seeds"
    p = "p < 0.001" if result.adjusted_p < 1e-3 else f"p = {result.adjusted_p:.3f}"
    if result.beyond_noise:
        return f"**yes, {'faster' if result.speedup and result.speedup > 1 else 'slower'}** ({p})"
    return f"no ({p})"
