from __future__ import annotations

from pathlib import Path

import pytest

import lightning_sbp.demo as demo
from lightning_sbp.compare import command
from lightning_sbp.compare.grid import Grid, is_aa, load_grid_file
from lightning_sbp.compare.runner import inspect_base


def test_the_demo_grid_holds_the_comparison_the_paper_is_about(tmp_path: Path) -> None:
    values = load_grid_file(demo.GRID)
    grid = Grid.from_values({**values, "output": str(tmp_path / "out")})
    assert grid.base == demo.BASE
    assert grid.methods[0] == "full" and {"random", "loss", "topk", "omp"} <= set(grid.methods)
    assert any(is_aa(method) for method in grid.methods)  # the calibration row
    assert grid.keep == [0.25] and min(grid.label_noise) >= 0.2  # where loss-based selectors and random part
    assert len(grid.seeds) >= 3 and grid.correction == "holm"
    base = inspect_base(grid)
    assert base.batch_size == 64 and base.callbacks == ()


def test_the_demo_runs_compare_on_its_grid_into_the_working_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[list[str]] = []
    monkeypatch.setattr(command, "main", lambda argv: received.append(list(argv)) or 0)
    assert demo.main(["--seeds", "0"]) == 0
    assert demo.main(["--output=elsewhere"]) == 0
    assert received == [
        ["--config", str(demo.GRID), "--seeds", "0", "--output", "sbp-demo"],
        ["--config", str(demo.GRID), "--output=elsewhere"],
    ]


def test_the_demo_help_names_its_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-sbp demo") and str(demo.GRID) in out and str(demo.BASE) in out
