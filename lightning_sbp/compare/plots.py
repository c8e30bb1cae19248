"""PNG plots of a comparison: one line per method, a band over seeds, one panel per label-noise level.

- ``accuracy_vs_time.png``: the validation metric against training wall-clock time (validation excluded).
- ``accuracy_vs_examples.png``: the validation metric against examples backpropagated.
- ``grad_error.png``: per epoch, the mean gradient-approximation error of each selector with the
  closed-form error of a random subset of the same size (dotted), and the mean squared ratio of
  the two, whose expectation is exactly 1 for random selection.

Lines are means over seeds; bands span one standard deviation either side, as the legend beside
the panels says. The y-axis is fitted to the lines, so one diverged seed's wide band does not flatten the
others (its band is cut at the edge). Drawn with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_sbp.compare.report import Row

__all__ = ["plot_all", "series_label"]


def series_label(row: Row, multiple_keep: bool, multiple_lr: bool) -> str:
    """The legend entry of a row: the method, then keep and learning rate where the grid varies them."""
    label = row.method
    if multiple_keep and row.keep is not None:
        label += f" keep={row.keep:g}"
    if multiple_lr and row.lr is not None:
        label += f" lr={row.lr:g}"
    return label


def plot_all(
    rows: Sequence[Row], records: Sequence[dict[str, Any]], metric: str, directory: Path, show_lr: bool = False
) -> list[Path]:
    """Draw the plots of the selected rows into ``directory``; return the files written.

    Args:
        rows: the summary rows to draw (one learning rate per method).
        records: the run records the rows were computed from.
        metric: the name of the validation metric.
        directory: where the PNG files go (created if needed).
        show_lr: name each line's learning rate (when the grid tunes it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    directory.mkdir(parents=True, exist_ok=True)
    by_id = {record["run_id"]: record for record in records}
    noises = list(dict.fromkeys(row.label_noise for row in rows))
    multiple_keep = len({row.keep for row in rows if row.keep is not None}) > 1
    multiple_lr = show_lr
    labels = list(dict.fromkeys(series_label(row, multiple_keep, multiple_lr) for row in rows))
    palette = plt.get_cmap("tab10")
    colours = {label: palette(index % 10) for index, label in enumerate(labels)}

    def runs_of(row: Row) -> list[dict[str, Any]]:
        return [by_id[run_id] for run_id in row.run_ids if run_id in by_id]

    seeds = sorted({len(row.run_ids) for row in rows})
    band = Patch(color="grey", alpha=0.25, label=_band_label(seeds))
    written: list[Path] = []

    def save(figure: Any, name: str) -> None:
        """One legend for every panel, beside them, where it hides no line; then the file."""
        entries: dict[str, Any] = {}
        for axis in figure.axes:
            for handle, label in zip(*axis.get_legend_handles_labels(), strict=True):
                entries.setdefault(label, handle)
        handles = [*entries.values(), band] if max(seeds, default=1) > 1 else list(entries.values())
        figure.tight_layout()
        figure.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
        path = directory / name
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        written.append(path)

    for name, x_key, x_label in (
        ("accuracy_vs_time.png", "train_seconds", "training wall-clock time (s, validation excluded)"),
        ("accuracy_vs_examples.png", "examples_backpropagated", "examples backpropagated"),
    ):
        figure, axes = plt.subplots(1, len(noises), figsize=(5.5 * len(noises), 4.2), squeeze=False)
        for column, noise in enumerate(noises):
            axis = axes[0][column]
            for row in (r for r in rows if r.label_noise == noise):
                curves = [record["validation"] for record in runs_of(row)]
                xs = _aligned(curves, x_key)
                ys = _aligned(curves, "value")
                label = series_label(row, multiple_keep, multiple_lr)
                _line_with_band(axis, xs, ys, label, colours[label])
            axis.set_title(_noise_title(noise))
            axis.set_xlabel(x_label)
            axis.set_ylabel(f"validation {metric}")
            axis.grid(alpha=0.3)
            _fit_to_lines(axis)
        save(figure, name)

    selective = [row for row in rows if row.grad_error is not None]
    (directory / "grad_error.png").unlink(missing_ok=True)  # an earlier grid's would no longer match
    if selective:
        figure, axes = plt.subplots(2, len(noises), figsize=(5.5 * len(noises), 7.0), squeeze=False, sharex="col")
        for column, noise in enumerate(noises):
            top, bottom = axes[0][column], axes[1][column]
            for row in (r for r in selective if r.label_noise == noise):
                epochs = [record["epochs"] for record in runs_of(row)]
                label = series_label(row, multiple_keep, multiple_lr)
                colour = colours[label]
                epoch_axis = [(position + 1.0, 0.0) for position in range(min((len(run) for run in epochs), default=0))]
                _line_with_band(top, epoch_axis, _aligned(epochs, "grad_error"), label, colour)
                random_mean = [mean for mean, _ in _aligned(epochs, "grad_error_random")]
                top.plot([x for x, _ in epoch_axis], random_mean, linestyle=":", color=colour, linewidth=1.2)
                _line_with_band(bottom, epoch_axis, _aligned(epochs, "grad_error_sq_ratio"), label, colour)
            top.set_title(_noise_title(noise))
            top.set_ylabel("relative gradient error (dotted: random, closed form)")
            bottom.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
            bottom.set_ylabel("error² / random's expected error²")
            bottom.set_xlabel("epoch")
            bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
            for axis in (top, bottom):
                axis.grid(alpha=0.3)
                _fit_to_lines(axis)
        save(figure, "grad_error.png")
    return written


def _band_label(seeds: Sequence[int]) -> str:
    counts = "/".join(str(count) for count in seeds) or "1"
    return f"band: ±1 std over {counts} seeds"


def _fit_to_lines(axis: Any) -> None:
    """Y-limits around the plotted lines (means), with a margin; bands beyond them are cut."""
    values = [float(y) for line in axis.get_lines() for y in line.get_ydata() if math.isfinite(float(y))]
    if not values:
        return
    low, high = min(values), max(values)
    margin = max(0.1 * (high - low), 0.02 * max(abs(high), abs(low)), 1e-3)
    axis.set_ylim(low - margin, high + margin)


def _noise_title(noise: float | None) -> str:
    return "label noise as in the base config" if noise is None else f"label noise {noise:g}"


def _aligned(runs: Sequence[Sequence[dict[str, Any]]], key: str) -> list[tuple[float, float]]:
    """Per position (validation or epoch), the mean and standard deviation of ``key`` over runs.

    Runs of one row share their schedule, so positions line up; positions missing in some run or
    holding no value are dropped.
    """
    length = min((len(run) for run in runs), default=0)
    points: list[tuple[float, float]] = []
    for position in range(length):
        values = [float(run[position][key]) for run in runs if run[position].get(key) is not None]
        if not values:
            points.append((float("nan"), 0.0))
            continue
        points.append((statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0))
    return points


def _line_with_band(
    axis: Any, xs: Sequence[tuple[float, float]], ys: Sequence[tuple[float, float]], label: str, colour: Any
) -> None:
    count = min(len(xs), len(ys))
    x = [xs[i][0] for i in range(count)]
    mean = [ys[i][0] for i in range(count)]
    spread = [ys[i][1] for i in range(count)]
    axis.plot(x, mean, marker="o", markersize=3, label=label, color=colour)
    if any(spread):
        lower = [m - s for m, s in zip(mean, spread, strict=True)]
        upper = [m + s for m, s in zip(mean, spread, strict=True)]
        axis.fill_between(x, lower, upper, color=colour, alpha=0.2, linewidth=0)
