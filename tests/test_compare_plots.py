"""The comparison's plots: one legend per figure, beside the panels, over no line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from lightning_sbp.compare.plots import plot_all
from lightning_sbp.compare.report import Row


def _record(run_id: str, level: float) -> dict[str, Any]:
    validation = [
        {"train_seconds": float(step), "examples_backpropagated": 64.0 * step, "value": level + 0.1 * step}
        for step in range(1, 5)
    ]
    epochs = [{"grad_error": level, "grad_error_random": 1.0, "grad_error_ratio": level} for _ in range(4)]
    return {"run_id": run_id, "validation": validation, "epochs": epochs}


def test_one_legend_per_figure_outside_every_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows, records = [], []
    for noise in (0.0, 0.3):
        for position, method in enumerate(("full", "random", "omp")):
            ids = [f"{method}-{noise}-{seed}" for seed in range(2)]
            records += [_record(run_id, 0.2 * position + 0.01 * seed) for seed, run_id in enumerate(ids)]
            selective = method != "full"
            rows.append(
                Row(
                    noise, method, 0.25 if selective else None, None, [0, 1], ids, grad_error=0.5 if selective else None
                )
            )
    figures: list[Any] = []
    closing = plt.close
    monkeypatch.setattr(plt, "close", lambda figure=None: figures.append(figure) or closing(figure))

    written = plot_all(rows, records, "val/acc", tmp_path)

    assert [path.name for path in written] == ["accuracy_vs_time.png", "accuracy_vs_examples.png", "grad_error.png"]
    assert len(figures) == 3
    for figure in figures:
        assert all(axis.get_legend() is None for axis in figure.axes)
        (legend,) = figure.legends
        labels = [text.get_text() for text in legend.get_texts()]
        expected = ["full", "random", "omp"] if len(figure.axes) == 2 else ["random", "omp"]
        assert labels == [*expected, "band: ±1 std over 2 seeds"]
        renderer = FigureCanvasAgg(figure).get_renderer()
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(axis.get_window_extent(renderer)) for axis in figure.axes)
