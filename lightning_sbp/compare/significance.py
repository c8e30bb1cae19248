"""Which differences in a comparison are larger than seed noise.

Runs of one seed share the initial weights and the data order, so two methods are compared by
the differences of their runs seed by seed (a paired comparison): the mean difference and its 95%
Student-t confidence interval. A difference *exceeds seed noise* when its interval excludes 0.
Every method is compared with ``random`` at the same keep fraction and noise level (is the
selection better than chance?) and with ``full`` (does it cost accuracy, does it save time?), in
the final validation metric and in training time.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_sbp.compare.grid import FULL
from lightning_sbp.compare.report import Row

__all__ = [
    "RANDOM",
    "Difference",
    "Interval",
    "compare_rows",
    "paired_interval",
    "reading",
    "significance_tables",
    "t_quantile",
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
    """

    mean: float
    low: float
    high: float
    pairs: int
    confidence: float = 0.95

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0: the difference is larger than seed noise."""
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
    """

    label_noise: float | None
    method: str
    keep: float | None
    reference: str
    quantity: str
    interval: Interval
    reference_mean: float


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
    half = t_quantile(0.5 + confidence / 2.0, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half, len(values), confidence)


def compare_rows(rows: Sequence[Row], records: Iterable[dict[str, Any]]) -> list[Difference]:
    """Every row's paired differences from ``random`` (same noise and keep) and ``full`` (same noise).

    Rows are paired by seed through their records; a reference that is missing, the row itself,
    or shares no seed with it gives no difference.
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
    return differences


def _by_seed(row: Row, by_id: dict[str, dict[str, Any]], quantity: str) -> dict[int, float]:
    values: dict[int, float] = {}
    for run_id in row.run_ids:
        record = by_id.get(run_id)
        if record is not None and record.get(quantity) is not None:
            values[int(record["seed"])] = float(record[quantity])
    return values


def significance_tables(rows: Sequence[Row], differences: Sequence[Difference], metric: str) -> str:
    """Two Markdown tables, final metric and training time: each row's difference from random and from full.

    Cells read ``mean [low, high]``; differences that exceed seed noise are in bold, and their
    ``beyond noise`` column says in which direction.
    """
    lookup = {(d.label_noise, d.method, d.keep, d.reference, d.quantity): d for d in differences}
    blocks = []
    for quantity, digits, unit in (("final", 4, f"final {metric}"), ("train_seconds", 1, "train time (s)")):
        header = [
            "noise",
            "method",
            "keep",
            f"Δ {unit} vs random [95% CI]",
            "beyond noise",
            "vs full [95% CI]",
            "beyond noise",
        ]
        lines = ["| " + " | ".join(header) + " |", "|---|---|---:|---:|---|---:|---|"]
        for row in rows:
            cells = ["base" if row.label_noise is None else f"{row.label_noise:g}", row.method, _keep(row.keep)]
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
    if interval.significant:
        return [f"**{text}**", "**yes, " + ("higher" if interval.mean > 0 else "lower") + "**"]
    return [text, "no"]


def reading(rows: Sequence[Row], differences: Sequence[Difference], metric: str, mode: str) -> list[str]:
    """A few plain sentences that read the significance tables.

    Per noise level: which methods differ from random in ``metric`` beyond seed noise, and in which
    direction (better or worse, by ``mode``); then whether any selective method trained faster than
    ``full`` beyond seed noise.
    """
    if not differences:
        return ["No method has a reference run (random or full) to be compared with."]
    if all(d.interval.pairs < 2 for d in differences):
        return [
            "With one seed per setting there is no estimate of seed noise: "
            "run two or more seeds to tell which differences are real."
        ]
    sentences: list[str] = []
    noises = list(dict.fromkeys(row.label_noise for row in rows))
    for noise in noises:
        where = "With the base configuration's labels" if noise is None else f"At label noise {noise:g}"
        versus_random = [
            d for d in differences if d.label_noise == noise and d.reference == RANDOM and d.quantity == "final"
        ]
        if versus_random:
            sentences.append(f"{where}, " + _against_random(versus_random, metric, mode))
        versus_full = [d for d in differences if d.label_noise == noise and d.reference == FULL]
        sentences.append(f"{where}, " + _against_full(versus_full, metric, mode))
    return sentences


def _against_random(differences: Sequence[Difference], metric: str, mode: str) -> str:
    better, worse, same = [], [], []
    for d in differences:
        name = _name(d)
        if not d.interval.significant:
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
    return "; ".join(parts) + "."


def _against_full(differences: Sequence[Difference], metric: str, mode: str) -> str:
    times = [d for d in differences if d.quantity == "train_seconds"]
    faster = [d for d in times if d.interval.significant and d.interval.mean < 0]
    if faster:
        names = [f"{_name(d)} ({_speedup(d):.2f}× full's speed)" for d in faster]
        text = f"{_join(names)} trained faster than full beyond seed noise"
    elif times:
        quickest = min(times, key=lambda d: d.interval.mean)
        text = (
            "no selective method trained faster than full beyond seed noise "
            f"(the quickest, {_name(quickest)}, ran at {_speedup(quickest):.2f}× full's speed)"
        )
    else:
        return "there is no full run to compare training time with."
    finals = [d for d in differences if d.quantity == "final"]
    lost = [d for d in finals if d.interval.significant and (d.interval.mean < 0) == (mode == "max")]
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
