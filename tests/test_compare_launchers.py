"""Launchers of ``lightning-sbp compare``: Ray tasks, single cells for job arrays, and ``--report``.

The Ray tests share one local Ray session of 2 CPUs; every grid is two tiny digits runs.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from helpers import compare

from lightning_sbp.compare.command import build_parser, grid_from_args
from lightning_sbp.compare.grid import GridError, Run, base_fingerprint, expand
from lightning_sbp.compare.launchers import RayLauncher, cell_resources
from lightning_sbp.compare.runner import (
    BaseInfo,
    check_output,
    check_runs,
    fit_run,
    inspect_base,
    prepare_output,
    run_grid,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "configs" / "digits_full.yaml"
GRID = [
    "--base",
    str(BASE),
    "--methods",
    "full",
    "random",
    "--keep",
    "0.5",
    "--threads",
    "1",
    "--no-progress",
    "--set",
    "trainer.max_epochs=2",
    "--set",
    "trainer.limit_train_batches=2",
    "--set",
    "trainer.limit_val_batches=1",
    "--set",
    "trainer.num_sanity_val_steps=0",
]
# What a run computes; times and the environment vary from run to run.
COMPUTED = ("final", "best", "validation_values", "optimizer_steps", "examples_backpropagated", "grad_error", "threads")
SUMMARY = ("method", "keep", "run_ids", "final_mean", "best_mean", "grad_error", "examples_backpropagated")


def computed(output: Path) -> dict[str, dict[str, Any]]:
    """What every finished run of ``output`` computed, by run id."""
    found = {}
    for path in sorted((output / "runs").glob("*/record.json")):
        record = json.loads(path.read_text())
        if record["status"] != "finished":
            continue
        record["validation_values"] = [entry["value"] for entry in record["validation"]]
        found[record["run_id"]] = {key: record[key] for key in COMPUTED}
    return found


def summary(output: Path) -> list[dict[str, str]]:
    with (output / "summary.csv").open() as handle:
        return [{key: row[key] for key in SUMMARY} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def ray_session() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    # Functions defined here travel to the workers by value: the tests folder is no package they could import.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("launchers") / "in-process"
    assert compare([*GRID, "--output", str(output)]) == 0
    return output


@pytest.fixture(scope="module")
def on_ray(tmp_path_factory: pytest.TempPathFactory, ray_session: Any) -> Path:
    output = tmp_path_factory.mktemp("launchers") / "ray"
    assert compare([*GRID, "--output", str(output), "--launcher", "ray"]) == 0
    return output


def test_ray_tasks_compute_the_records_and_summary_of_the_in_process_launcher(in_process: Path, on_ray: Path) -> None:
    expected = computed(in_process)
    assert len(expected) == 2 and computed(on_ray) == expected
    assert all(record["threads"] == 1 for record in expected.values())
    assert summary(on_ray) == summary(in_process)
    for run_id in expected:
        assert (on_ray / "runs" / run_id / "config.yaml").is_file()
        assert (on_ray / "runs" / run_id / "logs" / run_id.split("-")[0] / "metrics.csv").is_file()
    assert (on_ray / "summary.md").is_file() and (on_ray / "plots" / "accuracy_vs_time.png").is_file()


def test_a_rerun_on_ray_trains_nothing(on_ray: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stamps = {path: path.stat().st_mtime_ns for path in (on_ray / "runs").glob("*/record.json")}
    assert compare([*GRID, "--output", str(on_ray), "--launcher", "ray"]) == 0
    assert "reused 2 finished runs of 2; 0 to train" in capsys.readouterr().err
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps


def broken_fit(run: Run, grid: Any, base: BaseInfo, run_dir: Path) -> dict[str, Any]:
    """``fit_run``, except that ``random`` gets a trainer setting Lightning refuses."""
    if run.method == "random":
        run = dataclasses.replace(run, args=(*run.args, "--trainer.max_epochs=-5"))
    return fit_run(run, grid, base, run_dir)


def crashing_fit(run: Run, grid: Any, base: BaseInfo, run_dir: Path) -> dict[str, Any]:
    """A task that dies outside the fit for ``random``."""
    if run.method == "random":
        raise RuntimeError("the worker lost its disk")
    return fit_run(run, grid, base, run_dir)


def ray_grid(output: Path) -> tuple[Any, list[Run], BaseInfo]:
    grid = grid_from_args(build_parser().parse_args([*GRID, "--output", str(output)]))
    fingerprint = base_fingerprint(grid)
    check_output(grid, fingerprint)
    base = inspect_base(grid)
    prepare_output(grid, fingerprint)
    return grid, expand(grid, fingerprint, base.batch_size), base


@pytest.mark.parametrize(("fit", "error"), [(broken_fit, "max_epochs"), (crashing_fit, "the worker lost its disk")])
def test_a_failing_cell_is_recorded_and_the_others_finish(
    fit: Any, error: str, ray_session: Any, in_process: Path, tmp_path: Path
) -> None:
    grid, runs, base = ray_grid(tmp_path / "out")
    records = {record["method"]: record for record in run_grid(grid, runs, base, RayLauncher(), False, fit)}
    assert records["full"]["status"] == "finished"
    assert records["random"]["status"] == "failed" and error in records["random"]["error"]
    run_dir = tmp_path / "out" / "runs" / records["random"]["run_id"]
    assert error in (run_dir / "error.txt").read_text()
    assert json.loads((run_dir / "record.json").read_text())["status"] == "failed"
    assert computed(tmp_path / "out")[records["full"]["run_id"]] == computed(in_process)[records["full"]["run_id"]]


def test_ctrl_c_cancels_the_ray_tasks_and_the_same_command_resumes(
    ray_session: Any,
    in_process: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cancelled: list[Any] = []
    cancel = ray_session.cancel

    def interrupted_wait(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    def spying_cancel(ref: Any, **kwargs: Any) -> None:
        cancelled.append(ref)
        cancel(ref, **kwargs)

    output = tmp_path / "out"
    with monkeypatch.context() as patch:
        patch.setattr(ray_session, "wait", interrupted_wait)
        patch.setattr(ray_session, "cancel", spying_cancel)
        assert compare([*GRID, "--output", str(output), "--launcher", "ray"]) == 130
    err = capsys.readouterr().err
    assert "interrupted: finished runs are kept; run the same command to resume" in err and "Traceback" not in err
    assert len(cancelled) == 2

    assert compare([*GRID, "--output", str(output), "--launcher", "ray"]) == 0
    assert computed(output) == computed(in_process)


def test_ctrl_c_in_process_stops_without_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted_fit(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.Trainer, "fit", interrupted_fit)
    assert compare([*GRID, "--output", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "run the same command to resume" in err and "Traceback" not in err
    assert not list((tmp_path / "out" / "runs").glob("*/record.json"))


def test_cells_in_parallel_processes_then_report_give_the_summary_of_a_whole_run(
    in_process: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "out"
    assert compare([*GRID, "--output", str(output), "--list-cells"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["0", "1"] and all(line.endswith("pending") for line in lines)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lightning_sbp", "compare", *GRID, "--output", str(output)]
    cells = [subprocess.Popen([*command, "--cell", str(index)], env=env, cwd=tmp_path) for index in (0, 1)]
    assert [cell.wait(timeout=600) for cell in cells] == [0, 0]

    assert compare([*GRID, "--output", str(output), "--list-cells"]) == 0
    assert all(line.endswith("finished") for line in capsys.readouterr().out.splitlines())
    assert compare([*GRID, "--output", str(output), "--report"]) == 0
    assert summary(output) == summary(in_process) and computed(output) == computed(in_process)


def test_a_finished_cell_is_not_trained_again(
    in_process: Path, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compare([*GRID, "--output", str(in_process), "--cell", "1"]) == 0
    assert "has finished already" in capsys.readouterr().out


def test_report_says_what_is_missing(in_process: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "out"
    for name in ("compare.json", "base.yaml"):
        (output / "runs").mkdir(parents=True, exist_ok=True)
        (output / name).write_bytes((in_process / name).read_bytes())
    finished = next((in_process / "runs").glob("full-*"))
    (output / "runs" / finished.name).mkdir()
    (output / "runs" / finished.name / "record.json").write_bytes((finished / "record.json").read_bytes())
    assert compare([*GRID, "--output", str(output), "--report"]) == 1
    captured = capsys.readouterr()
    missing = next(path.name for path in (in_process / "runs").glob("random-*"))
    assert f"1 of 2 runs have no record yet: {missing}" in captured.err
    assert f"no record yet and are left out: {missing}" in (output / "summary.md").read_text()
    assert [row["method"] for row in summary(output)] == ["full"]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a fit started")

    monkeypatch.setattr(pl.Trainer, "fit", refuse)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cell", "2"], "--cell 2 is out of range: this grid has 2 runs, numbered 0 to 1"),
        (["--cell", "-1"], "--cell -1 is out of range"),
        (["--launcher", "slurm"], "unknown launcher 'slurm'; launchers: in-process, ray"),
        (["--ray-address", "auto"], "--ray-address needs --launcher ray"),
        (["--launcher", "ray", "--cell", "0"], "leave out --launcher"),
        (["--report"], "nothing to report"),
    ],
    ids=["cell-past-the-end", "negative-cell", "unknown-launcher", "address-without-ray", "ray-cell", "empty-report"],
)
def test_bad_input_trains_nothing(
    args: list[str], message: str, tmp_path: Path, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert compare([*GRID, "--output", str(tmp_path / "new"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.endswith("\n") and err.count("\n") == 1
    assert not (tmp_path / "new").exists()


def test_without_ray_the_ray_launcher_is_a_one_line_error_naming_the_extra(
    tmp_path: Path, no_training: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert compare([*GRID, "--output", str(tmp_path / "new"), "--launcher", "ray"]) == 2
    assert capsys.readouterr().err == (
        "error: --launcher ray needs Ray, which is not installed: pip install 'lightning-sbp[cluster]'\n"
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("mode", [["--cell", "0"], ["--report"], ["--list-cells"], ["--launcher", "ray"]])
def test_an_output_directory_of_another_base_configuration_is_refused(
    mode: list[str], in_process: Path, no_training: None, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(path.name for path in (in_process / "runs").iterdir())
    assert compare([*GRID, "--output", str(in_process), "--set", "trainer.max_epochs=3", *mode]) == 2
    assert "holds runs of a different base configuration" in capsys.readouterr().err
    assert sorted(path.name for path in (in_process / "runs").iterdir()) == before


def test_a_directory_being_prepared_by_another_cell_is_accepted(tmp_path: Path) -> None:
    grid = grid_from_args(build_parser().parse_args([*GRID, "--output", str(tmp_path / "out")]))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".compare.json.x1y2.partial").write_text("{")  # another process's write in progress
    check_output(grid, base_fingerprint(grid))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(GridError, match="not a comparison's output"):
        check_output(grid, base_fingerprint(grid))


@pytest.mark.parametrize(
    ("accelerator", "devices", "threads", "gpus_in_cluster", "expected"),
    [
        ("cpu", 1, None, True, {"num_cpus": 1.0, "num_gpus": 0.0}),
        ("cpu", 2, 3, False, {"num_cpus": 6.0, "num_gpus": 0.0}),
        ("gpu", 2, None, False, {"num_cpus": 2.0, "num_gpus": 2.0}),
        ("cuda", [0, 3], 4, True, {"num_cpus": 8.0, "num_gpus": 2.0}),
        ("cuda", "0,1,", None, True, {"num_cpus": 2.0, "num_gpus": 2.0}),
        ("auto", "1", None, True, {"num_cpus": 1.0, "num_gpus": 1.0}),
        ("auto", "auto", 2, False, {"num_cpus": 2.0, "num_gpus": 0.0}),
    ],
)
def test_a_cell_asks_ray_for_the_devices_of_the_base_configuration(
    accelerator: str, devices: Any, threads: int | None, gpus_in_cluster: bool, expected: dict[str, float]
) -> None:
    base = BaseInfo(batch_size=64, lr=None, accelerator=accelerator, devices=devices)
    assert cell_resources(base, threads, gpus_in_cluster) == expected


@pytest.mark.parametrize("devices", ["auto", -1, None])
def test_a_gpu_cell_needs_a_device_count(devices: Any) -> None:
    with pytest.raises(GridError, match=r"needs trainer\.devices as a number of GPUs"):
        cell_resources(BaseInfo(batch_size=64, lr=None, accelerator="gpu", devices=devices), None, True)


def test_runs_for_other_machines_are_checked_without_their_accelerator(tmp_path: Path) -> None:
    args = [*GRID, "--output", str(tmp_path / "out"), "--set", "trainer.accelerator=gpu"]
    grid = grid_from_args(build_parser().parse_args(args))
    runs = expand(grid, base_fingerprint(grid), inspect_base(grid).batch_size)
    check_runs(grid, runs, here=False)  # a CPU driver of a GPU cluster
    with pytest.raises(GridError, match=r"(?i)gpu"):
        check_runs(grid, runs)  # no GPU on this machine


def test_a_run_larger_than_a_local_ray_instance_is_refused() -> None:
    from lightning_sbp.compare.launchers import _check_fits

    request = {"num_cpus": 4.0, "num_gpus": 1.0}
    _check_fits(request, {"CPU": 4.0, "GPU": 2.0}, autoscaled=False)
    with pytest.raises(GridError, match="asks Ray for 1 GPUs, and the Ray cluster has 0"):
        _check_fits(request, {"CPU": 8.0}, autoscaled=False)
    with pytest.warns(UserWarning, match="wait until nodes with enough join"):
        _check_fits(request, {"CPU": 2.0, "GPU": 1.0}, autoscaled=True)
