"""Which differences in a comparison are larger than seed noise, over a whole table at once.

Runs of one seed share the initial weights and the data order, so two methods are compared by
the differences of their runs seed by seed (a paired comparison): the mean difference, its 95%
Student-t confidence interval and the paired t-test's p-value. Every method is compared with
``random`` at the same keep fraction and noise level (is the selection better than chance?) and
with ``full`` (does it cost accuracy, does it save time?), in the final validation metric and in
training time. Each of the two tables is one family of comparisons: its p-values are adjusted
together (:mod:`~lightning_sbp.compare.multiplicity`, Holm's by default), and a difference is
*beyond seed noise* when its adjusted p-value is below 0.05. The confidence intervals are those of
each comparison alone.

An A/A row (``random:seed_offset=1``: random selection with other random draws, the same
initial weights and data order) calibrates the test on the user's own setup: it differs from
``random`` by chance alone, so it should never come out beyond seed noise.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_sbp.compare.grid import FULL, is_aa
from lightning_sbp.compare.multiplicity import adjust, correction_name
from lightning_sbp.compare.report import Row, seconds_decimals

__all__ = [
    "RANDOM",
    "Difference",
    "Interval",
    "adjust_families",
    "compare_rows",
    "paired_interval",
    "reading",
    "significance_tables",
    "t_quantile",
    "t_test_p",
]

RANDOM = "random"
"""The selector every other method is compared with: selection by chance."""

QUANTITIES = {"final": "final", "train_seconds": "train time"}
"""Record keys compared seed by seed, with their names in tables and sentences."""


@dataclass(frozen=True)
class Interval:
    """A mean difference over pairs with its two-sided confidence interval.

    Attributes:
        mean: the mean of the paired differences.
        low: the lower end of the interval (``nan`` with fewer than two pairs).
        high: the upper end.
        pairs: how many pairs (seeds) it is computed from.
        confidence: the confidence level of the interval.
        p_value: the two-sided paired t-test's p-value of a zero mean (``nan`` with fewer than two pairs, or
            when every pair differs by the same non-zero amount: see :func:`t_test_p`).
    """

    mean: float
    low: float
    high: float
    pairs: int
    confidence: float = 0.95
    p_value: float = math.nan

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0: the difference exceeds seed noise, as a comparison on its own."""
        return self.pairs > 1 and (self.low > 0.0 or self.high < 0.0)


@dataclass(frozen=True)
class Difference:
    """A method's paired difference from a reference method in one quantity, at one setting.

    Attributes:
        label_noise: the noise level of both rows.
        method: the compared method.
        keep: its keep fraction.
        reference: ``random`` or ``full``.
        quantity: the record key, ``final`` or ``train_seconds``.
        interval: method minus reference, over the seeds both have.
        reference_mean: the reference's mean over the same seeds (for relative statements).
        adjusted_p: the p-value adjusted over the comparison's table (``None`` before
            :func:`adjust_families`, or with a single pair).
    """

    label_noise: float | None
    method: str
    keep: float | None
    reference: str
    quantity: str
    interval: Interval
    reference_mean: float
    adjusted_p: float | None = None

    @property
    def beyond_noise(self) -> bool:
        """Whether the adjusted p-value is below ``1 - confidence``: a finding that survives the whole table."""
        return self.adjusted_p is not None and self.adjusted_p < 1.0 - self.interval.confidence


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t distribution with ``df`` degrees of freedom.

    Uses the closed form of the t distribution function for integer degrees of freedom and
    bisection; exact to about 1e-12.

    Raises:
        ValueError: if ``probability`` is not in (0, 1) or ``df`` is not a positive integer.
    """
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {probability!r}")
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    central = 2.0 * probability - 1.0  # P(|T| <= t)
    low, high = 0.0, 1.0
    while _central_mass(high, df) < central:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _central_mass(middle, df) < central:
            low = middle
        else:
            high = middle
        if high - low < 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


def _central_mass(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with integer ``df`` (Abramowitz and Stegun 26.7.3)."""
    theta = math.atan(t / math.sqrt(df))
    sine, cos2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term = total = 1.0
        for j in range(2, df, 2):
            term *= (j - 1) / j * cos2
            total += term
        return sine * total
    if df == 1:
        return 2.0 * theta / math.pi
    term = total = math.cos(theta)
    for m in range(1, (df - 1) // 2):
        term *= (2 * m) / (2 * m + 1) * cos2
        total += term
    return 2.0 / math.pi * (theta + sine * total)


def t_test_p(mean: float, std: float, count: int) -> float:
    """Two-sided p-value of Student's one-sample t-test that the true mean is 0.

    Args:
        mean: the sample mean.
        std: the sample standard deviation.
        count: the sample size, at least 2.

    Returns:
        ``P(|T| >= |t|)`` with ``t = mean / (std / sqrt(count))`` and ``count - 1`` degrees of freedom.
        Without any spread: 1 for a zero mean, and NaN (no test) for a non-zero one. Equal non-zero
        differences on every seed come from a metric at its resolution (one validation example on
        every seed), not from the absence of seed noise; they give no estimate of it.
    """
    if count < 2:
        raise ValueError(f"a t-test needs at least two values, got {count}")
    if std == 0.0:
        return 1.0 if mean == 0.0 else math.nan
    statistic = abs(mean) / (std / math.sqrt(count))
    return min(1.0, max(0.0, 1.0 - _central_mass(statistic, count - 1)))


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of paired differences with its Student-t confidence interval.

    Args:
        differences: one difference per pair (per seed).
        confidence: the two-sided confidence level.

    Returns:
        The interval; its ends are ``nan`` with a single pair (no estimate of the noise).

    Raises:
        ValueError: without any difference.
    """
    values = [float(value) for value in differences]
    if not values:
        raise ValueError("paired_interval needs at least one difference")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return Interval(mean, math.nan, math.nan, 1, confidence)
    std = statistics.stdev(values)
    half = t_quantile(0.5 + confidence / 2.0, len(values) - 1) * std / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values), confidence, t_test_p(mean, std, len(values)))


def compare_rows(rows: Sequence[Row], records: Iterable[dict[str, Any]], correction: str = "holm") -> list[Difference]:
    """Every row's paired differences from ``random`` (same noise and keep) and ``full`` (same noise).

    Rows are paired by seed through their records; a reference that is missing, the row itself,
    or shares no seed with it gives no difference. The p-values are adjusted over each quantity's
    table by ``correction`` (see :func:`adjust_families`).
    """
    by_id = {record["run_id"]: record for record in records}
    index = {(row.label_noise, row.method, row.keep): row for row in rows}
    differences: list[Difference] = []
    for row in rows:
        references = [index.get((row.label_noise, RANDOM, row.keep)), index.get((row.label_noise, FULL, None))]
        for reference in references:
            if reference is None or reference is row:
                continue
            for quantity in QUANTITIES:
                ours = _by_seed(row, by_id, quantity)
                theirs = _by_seed(reference, by_id, quantity)
                seeds = sorted(set(ours) & set(theirs))
                if not seeds:
                    continue
                interval = paired_interval([ours[seed] - theirs[seed] for seed in seeds])
                differences.append(
                    Difference(
                        label_noise=row.label_noise,
                        method=row.method,
                        keep=row.keep,
                        reference=reference.method,
                        quantity=quantity,
                        interval=interval,
                        reference_mean=statistics.fmean(theirs[seed] for seed in seeds),
                    )
                )
    return adjust_families(differences, correction)


def adjust_families(differences: Sequence[Difference], correction: str) -> list[Difference]:
    """The differences with their p-values adjusted by ``correction``, one family per quantity (one per table).

    Differences without a p-value (a single pair, or no spread) stay outside every family.
    """
    adjusted = list(differences)
    for quantity in {difference.quantity for difference in differences}:
        family = [i for i, d in enumerate(differences) if d.quantity == quantity and math.isfinite(d.interval.p_value)]
        values = adjust([differences[i].interval.p_value for i in family], correction)
        for i, value in zip(family, values, strict=True):
            adjusted[i] = dataclasses.replace(differences[i], adjusted_p=value)
    return adjusted


def _by_seed(row: Row, by_id: dict[str, dict[str, Any]], quantity: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for run_id in row.run_ids:
        record = by_id.get(run_id)
        if record is not None and record.get(quantity) is not None:
            values[int(record["seed"])] = float(record[quantity])
    return values


def significance_tables(rows: Sequence[Row], differences: Sequence[Difference], metric: str) -> str:
    """Two Markdown tables, final metric and training time: each row's difference from random and from full.

    Cells read ``mean [low, high]``; the ``beyond noise`` columns give the adjusted p-value, and the
    differences beyond seed noise are in bold with their direction.
    """
    lookup = {(d.label_noise, d.method, d.keep, d.reference, d.quantity): d for d in differences}
    blocks = []
    seconds = seconds_decimals(rows)
    for quantity, digits, unit in (("final", 4, f"final {metric}"), ("train_seconds", seconds, "train time (s)")):
        header = [
            "noise",
            "method",
            "keep",
            f"Δ {unit} vs random [95% CI]",
            "beyond noise (adj. p)",
            "vs full [95% CI]",
            "beyond noise (adj. p)",
        ]
        lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---|---:|---|"]
        for row in rows:
            method = f"{row.method} (A/A)" if is_aa(row.method) else row.method
            cells = ["base" if row.label_noise is None else f"{row.label_noise:g}", method, _keep(row.keep)]
            for reference in (RANDOM, FULL):
                found = lookup.get((row.label_noise, row.method, row.keep, reference, quantity))
                cells += _cells(found, digits)
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _cells(difference: Difference | None, digits: int) -> list[str]:
    if difference is None:
        return ["–", "–"]
    interval = difference.interval
    text = f"{interval.mean:+.{digits}f}"
    if interval.pairs > 1:
        text += f" [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"
    if interval.pairs < 2:
        return [text, "one seed"]
    if difference.adjusted_p is None:
        return [text, "no spread over seeds"]
    p = f"({_p(difference.adjusted_p)})"
    if difference.beyond_noise:
        return [f"**{text}**", "**yes, " + ("higher" if interval.mean > 0 else "lower") + f"** {p}"]
    return [text, f"no {p}"]


def _p(value: float) -> str:
    return "p < 0.001" if value < 1e-3 else f"p = {value:.3f}"


def reading(
    rows: Sequence[Row], differences: Sequence[Difference], metric: str, mode: str, correction: str = "holm"
) -> list[str]:
    """A few plain sentences that read the significance tables.

    First how the tables decide (the adjustment); per noise level, which methods differ from random
    in ``metric`` beyond seed noise, and in which direction (better or worse, by ``mode``), then
    whether any selective method trained faster than ``full`` beyond seed noise; last, what the A/A
    rows say about the test itself.
    """
    if not differences:
        return ["No method has a reference run (random or full) to be compared with."]
    if all(d.interval.pairs < 2 for d in differences):
        return [
            "With one seed per setting there is no estimate of seed noise: "
            "run two or more seeds to tell which differences are real."
        ]
    sentences = [
        f"Beyond seed noise: adjusted p-value below 0.05, with {correction_name(correction)} over each table "
        f"({_family_sizes(differences)} comparisons)."
    ]
    noises = list(dict.fromkeys(row.label_noise for row in rows))
    for noise in noises:
        where = "With the base configuration's labels" if noise is None else f"At label noise {noise:g}"
        versus_random = [
            d
            for d in differences
            if d.label_noise == noise and d.reference == RANDOM and d.quantity == "final" and not is_aa(d.method)
        ]
        if versus_random:
            sentences.append(f"{where}, " + _against_random(versus_random, metric, mode))
        versus_full = [d for d in differences if d.label_noise == noise and d.reference == FULL and not is_aa(d.method)]
        sentences.append(f"{where}, " + _against_full(versus_full, metric, mode))
    calibration = _calibration([d for d in differences if is_aa(d.method) and d.reference == RANDOM], metric)
    if calibration:
        sentences.append(calibration)
    return sentences


def _family_sizes(differences: Sequence[Difference]) -> str:
    sizes = [
        sum(1 for d in differences if d.quantity == quantity and d.adjusted_p is not None) for quantity in QUANTITIES
    ]
    return " and ".join(str(size) for size in sizes)


def _calibration(checks: Sequence[Difference], metric: str) -> str:
    tested = [d for d in checks if d.adjusted_p is not None]
    if not tested:
        return ""
    flagged = [d for d in tested if d.beyond_noise]
    names = _join(sorted({d.method for d in tested}))
    if not flagged:
        return (
            f"Calibration: the A/A row ({names}: random selection with other random draws) does not differ from "
            f"random beyond seed noise in final {metric} or train time, as it should not."
        )
    what = _join([f"{QUANTITIES[d.quantity]} at {_where(d)}" for d in flagged])
    return (
        f"Calibration failed: the A/A row ({names}) differs from random beyond seed noise in {what}, which only "
        "chance or a drifting machine can cause; read the other findings with care (more seeds, a quieter machine)."
    )


def _where(difference: Difference) -> str:
    noise = "the base labels" if difference.label_noise is None else f"label noise {difference.label_noise:g}"
    return noise


def _against_random(differences: Sequence[Difference], metric: str, mode: str) -> str:
    better, worse, same, constant = [], [], [], []
    for d in differences:
        name = _name(d)
        if d.adjusted_p is None and d.interval.pairs > 1:
            constant.append(f"{name} ({d.interval.mean:+.4f})")
        elif not d.beyond_noise:
            same.append(name)
        elif (d.interval.mean > 0) == (mode == "max"):
            better.append(f"{name} ({d.interval.mean:+.4f})")
        else:
            worse.append(f"{name} ({d.interval.mean:+.4f})")
    parts = []
    if better:
        parts.append(f"{_join(better)} reached a better final {metric} than random beyond seed noise")
    if worse:
        parts.append(f"{_join(worse)} reached a worse final {metric} than random beyond seed noise")
    if same:
        verb = "does" if len(same) == 1 else "do"
        parts.append(f"{_join(same)} {verb} not differ from random beyond seed noise")
    if constant:
        parts.append(
            f"{_join(constant)} differed from random by the same amount on every seed, which gives no estimate of "
            f"seed noise (the {metric} at its resolution): no finding either way"
        )
    return "; ".join(parts) + "."


def _against_full(differences: Sequence[Difference], metric: str, mode: str) -> str:
    times = [d for d in differences if d.quantity == "train_seconds"]
    faster = [d for d in times if d.beyond_noise and d.interval.mean < 0]
    if faster:
        names = [f"{_name(d)} ({_speedup(d):.2f}× full's speed)" for d in faster]
        text = f"{_join(names)} took less train time than full beyond seed noise"
    elif times:
        quickest = min(times, key=lambda d: d.interval.mean)
        text = (
            "no selective method took less train time than full beyond seed noise "
            f"(the quickest, {_name(quickest)}, ran at {_speedup(quickest):.2f}× full's speed)"
        )
    else:
        return "there is no full run to compare training time with."
    finals = [d for d in differences if d.quantity == "final"]
    lost = [d for d in finals if d.beyond_noise and (d.interval.mean < 0) == (mode == "max")]
    if lost:
        text += f"; {_join([_name(d) for d in lost])} lost {metric} against full beyond seed noise"
    elif finals:
        text += f", and none lost {metric} against full beyond seed noise"
    return text + "."


def _speedup(difference: Difference) -> float:
    """Full's mean time over the method's, from the mean difference and full's mean."""
    method_time = difference.reference_mean + difference.interval.mean
    return difference.reference_mean / method_time if method_time > 0 else math.inf


def _name(difference: Difference) -> str:
    return difference.method if difference.keep is None else f"{difference.method} at keep {difference.keep:g}"


def _keep(keep: float | None) -> str:
    return "1" if keep is None else f"{keep:g}"


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]
