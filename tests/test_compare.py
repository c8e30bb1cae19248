from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from helpers import compare

from lightning_sbp.compare import FULL, SMALL_BATCH, Grid, GridError, command, expand
from lightning_sbp.compare.report import Row, format_mean_std, markdown_table, seconds_decimals
from lightning_sbp.compare.runner import RunRecorder

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / "examples" / "configs" / "digits_full.yaml"
TINY = [
    "--base",
    str(BASE),
    "--methods",
    "full",
    "random",
    "small-batch",
    "--keep",
    "0.5",
    "--seeds",
    "0",
    "--set",
    "trainer.max_epochs=2",
    "--set",
    "trainer.limit_train_batches=3",
    "--set",
    "trainer.limit_val_batches=2",
    "--set",
    "trainer.num_sanity_val_steps=0",
]


class Counts:
    """How many fits started (warm-up included) and how many runs were recorded."""

    def __init__(self) -> None:
        self.fits = 0
        self.runs = 0


@pytest.fixture(scope="module")
def counts() -> Iterator[Counts]:
    counted = Counts()
    fit, start = pl.Trainer.fit, RunRecorder.start

    def counting_fit(self: pl.Trainer, *args: Any, **kwargs: Any) -> Any:
        counted.fits += 1
        return fit(self, *args, **kwargs)

    def counting_start(self: RunRecorder) -> None:
        counted.runs += 1
        start(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pl.Trainer, "fit", counting_fit)
        patch.setattr(RunRecorder, "start", counting_start)
        yield counted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, counts: Counts) -> Path:
    output = tmp_path_factory.mktemp("compare") / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(output.parent)  # anything written outside --output would land here
        assert compare([*TINY, "--output", str(output)]) == 0
    assert counts.runs == 3 and counts.fits == 4  # three runs and one warm-up
    return output


def records(output: Path) -> dict[str, dict[str, Any]]:
    found = [json.loads(path.read_text()) for path in sorted((output / "runs").glob("*/record.json"))]
    return {record["method"]: record for record in found}


def test_a_tiny_grid_writes_records_table_csv_and_plots(tiny: Path) -> None:
    import matplotlib.image

    by_method = records(tiny)
    assert set(by_method) == {"full", "random", "small-batch"}
    for record in by_method.values():
        assert record["status"] == "finished"
        assert [entry["epoch"] for entry in record["validation"]] == [0, 1]
        assert record["fit_seconds"] > record["train_seconds"] > 0
        assert (tiny / "runs" / record["run_id"] / "config.yaml").is_file()
        assert (tiny / "runs" / record["run_id"] / "logs" / record["method"] / "metrics.csv").is_file()
    assert [entry["selective_steps"] for entry in by_method["random"]["epochs"]] == [3, 3]
    assert by_method["random"]["grad_error_ratio"] > 0
    # gradient errors on the first selective step and every fourth after it: steps 0 and 4 of the six
    random = by_method["random"]
    assert random["measured_steps"] == 2 and [entry["measured_steps"] for entry in random["epochs"]] == [1, 1]
    assert random["grad_error_sq_ratio"] > 0 and random["grad_error_sq_ratio_se"] is not None
    # the measurements are timed apart and kept out of the train time; full has none. The fit's time ends a
    # little later than the train time, after the fit's teardown: what is left is that teardown, not the measurement.
    assert random["measurement_seconds"] > 0 and by_method["full"]["measurement_seconds"] == 0.0
    remaining = random["fit_seconds"] - random["validation_seconds"] - random["measurement_seconds"]
    assert 0 < random["train_seconds"] <= remaining
    assert by_method["full"]["grad_error"] is None and by_method["full"]["epochs"] == []
    summary = (tiny / "summary.md").read_text()
    table = summary.split("\n## ")[0]
    assert "| noise | method |" in table and table.count("\n| base |") == 3
    assert "measured on one selective step in 4, timed apart by the callback and subtracted" in " ".join(
        summary.split()
    )
    # then time to accuracy and the significance tables, which a single seed cannot fill
    assert "## Time to accuracy" in summary and "## Which differences are larger than seed noise" in summary
    assert " ".join(summary.split()).endswith("run two or more seeds to tell which differences are real.")
    for name in ("accuracy_vs_time.png", "accuracy_vs_examples.png", "grad_error.png"):
        image = matplotlib.image.imread(tiny / "plots" / name)
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    assert not (tiny.parent / "runs").exists() and not (tiny.parent / "lightning_logs").exists()


def test_small_batch_gets_the_budget_of_the_selective_runs(tiny: Path) -> None:
    by_method = records(tiny)
    full, random, small = by_method["full"], by_method["random"], by_method["small-batch"]
    assert small["batch_size"] == 32 and random["batch_size"] == full["batch_size"] == 64
    assert small["optimizer_steps"] == random["optimizer_steps"] == full["optimizer_steps"] == 6
    assert small["examples_backpropagated"] == random["examples_backpropagated"] == 6 * 32
    assert full["examples_backpropagated"] == random["examples_seen"] == 6 * 64
    config = (tiny / "runs" / small["run_id"] / "config.yaml").read_text()
    assert "batch_size: 32" in config and "limit_train_batches: 3" in config


def test_the_table_holds_the_numbers_of_the_records(tiny: Path) -> None:
    by_method = records(tiny)
    with (tiny / "summary.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["full", "random", "small-batch"]
    table = (tiny / "summary.md").read_text()
    for method, row in rows.items():
        record = by_method[method]
        assert row["run_ids"] == record["run_id"]
        assert float(row["final_mean"]) == record["final"] and float(row["best_mean"]) == record["best"]
        assert float(row["train_seconds_mean"]) == record["train_seconds"]
        assert float(row["examples_backpropagated"]) == record["examples_backpropagated"]
        speedup = by_method["full"]["train_seconds"] / record["train_seconds"]
        # The same float64 division, written with all its digits: equal to a few roundings.
        assert float(row["speedup"]) == pytest.approx(speedup, rel=1e-12)
        line = next(line for line in table.splitlines() if f"| {method} |" in line)
        assert format_mean_std(record["final"], None, 4) in line
        assert f"{speedup:.2f}×" in line
    assert float(rows["random"]["grad_error_ratio"]) == by_method["random"]["grad_error_ratio"]
    assert rows["full"]["grad_error"] == ""


def test_a_second_invocation_trains_nothing_and_a_lost_record_is_trained_again(
    tiny: Path, counts: Counts, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (tiny / "summary.csv").read_text()
    fits = counts.fits
    assert compare([*TINY, "--output", str(tiny), "--no-progress"]) == 0
    assert counts.fits == fits
    assert (tiny / "summary.csv").read_text() == before
    captured = capsys.readouterr()
    assert "| base | random | 0.5 |" in captured.out
    assert "reused 3 finished runs of 3; 0 to train" in captured.err
    assert " ".join(captured.out.split()).endswith("run two or more seeds to tell which differences are real.")

    (tiny / "runs" / records(tiny)["small-batch"]["run_id"] / "record.json").unlink()
    runs = counts.runs
    assert compare([*TINY, "--output", str(tiny), "--no-progress"]) == 0
    assert counts.runs == runs + 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "full", "bogus"], "unknown method(s) 'bogus'"),
        (["--methods"], "empty grid: no methods"),
        (["--seeds"], "empty grid: seeds"),
        (["--keep", "0"], "keep values must lie in (0, 1]"),
        (["--lr", "omp=0.1"], "not in the grid's methods"),
        (["--set", "trainer.max_epochs=3"], "holds runs of a different base configuration"),
        (
            [
                "--set",
                'trainer.callbacks=[{"class_path": "lightning_sbp.SelectiveBackprop"}, {"class_path": '
                '"lightning_sbp.SelectiveBackprop"}]',
            ],
            "has 2 SelectiveBackprop callbacks (trainer.callbacks[0, 1])",
        ),
        (["--methods", "full", "random:seed_offset=-1"], "seed_offset must be a non-negative integer"),
        (["--grad-error-every", "0"], "grad_error_every must be a positive integer"),
        (["--set", "model.init_args.lrr=0.1"], "unknown argument 'lrr'; did you mean 'lr'? accepted arguments: "),
        (["--set", "data.init_args.label_noise=2"], "label_noise must be a fraction in [0, 1]"),
    ],
    ids=[
        "unknown-method",
        "no-methods",
        "no-seeds",
        "keep",
        "lr-method",
        "other-base",
        "two-sbp-in-base",
        "seed-offset",
        "grad-error-every",
        "bad-key",
        "refused-value",
    ],
)
def test_bad_input_stops_before_any_training(
    args: list[str], message: str, tiny: Path, tmp_path: Path, counts: Counts, capsys: pytest.CaptureFixture[str]
) -> None:
    # The case about a different base, and a typo in an override, reuse the tiny grid's output: the typo is
    # the error to report there, not the different base it makes.
    output = tiny if "different base" in message or "lrr" in message else tmp_path / "new"
    fits = counts.fits
    assert compare([*TINY, "--output", str(output), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert counts.fits == fits and not (tmp_path / "new").exists()


def test_an_unrelated_output_directory_is_refused(
    tmp_path: Path, counts: Counts, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    fits = counts.fits
    assert compare([*TINY, "--output", str(tmp_path)]) == 2
    assert "not a comparison's output" in capsys.readouterr().err
    assert counts.fits == fits and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_dry_run_lists_the_runs_and_trains_nothing(
    tmp_path: Path, counts: Counts, capsys: pytest.CaptureFixture[str]
) -> None:
    fits = counts.fits
    assert compare([*TINY, "--output", str(tmp_path / "new"), "--seeds", "0", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "6 runs" in out and out.count("pending") == 6
    assert counts.fits == fits and not (tmp_path / "new").exists()


def test_help_documents_the_grid(capsys: pytest.CaptureFixture[str]) -> None:
    assert compare(["--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--methods", "--label-noise", "small-batch", "omp", "label_noise:", "Exit status"):
        assert text in out


def grid(**values: Any) -> Grid:
    return Grid.from_values({"base": str(BASE), "output": "out", **values})


def test_expansion_interleaves_methods_and_gives_stable_distinct_ids() -> None:
    spec = grid(methods=[FULL, "omp", SMALL_BATCH], keep=[0.25, 0.5], label_noise=[0.0, 0.3], seeds=[1, 2])
    runs = expand(spec, "fingerprint", 64)
    assert len(runs) == 2 * 2 * (1 + 2 + 2)  # full does not vary keep
    assert [run.method for run in runs[:5]] == [FULL, "omp", "omp", SMALL_BATCH, SMALL_BATCH]
    assert len({run.run_id for run in runs}) == len(runs)
    assert [run.run_id for run in expand(spec, "fingerprint", 64)] == [run.run_id for run in runs]
    assert {run.run_id for run in expand(spec, "other", 64)}.isdisjoint(run.run_id for run in runs)
    small = next(run for run in runs if run.method == SMALL_BATCH and run.keep == 0.25)
    assert small.batch_size == 16 and "--data.init_args.batch_size=16" in small.args
    omp = next(run for run in runs if run.method == "omp")
    callback = json.loads(next(arg for arg in omp.args if arg.startswith("--trainer.callbacks+=")).split("=", 1)[1])
    assert callback["init_args"] == {
        "selector": "omp",
        "keep": 0.25,
        "seed": 1,
        "track_grad_error": True,
        "grad_error_every": 4,
    }


def _callback(run: Any) -> dict[str, Any]:
    return json.loads(next(arg for arg in run.args if arg.startswith("--trainer.callbacks+=")).split("=", 1)[1])


def test_the_aa_row_draws_other_subsets_from_the_same_start() -> None:
    from lightning_sbp.compare.grid import SEED_STRIDE, is_aa

    spec = grid(methods=["random", "random:seed_offset=1"], keep=[0.5], seeds=[3], grad_error_every=2)
    plain, aa = expand(spec, "f", 64)
    assert is_aa(aa.method) and not is_aa(plain.method) and not is_aa("omp:seed_offset=1")
    assert aa.seed == plain.seed == 3 and "--seed_everything=3" in aa.args  # same weights and data order
    assert _callback(aa)["init_args"]["seed"] == 3 + SEED_STRIDE and _callback(plain)["init_args"]["seed"] == 3
    assert _callback(aa)["init_args"]["selector"] == "random"  # the offset is the grid's, not the selector's
    assert _callback(aa)["init_args"]["grad_error_every"] == 2
    assert aa.run_id != plain.run_id


def test_a_base_callback_lends_its_options_and_leaves_the_configuration() -> None:
    from lightning_sbp.compare.grid import adopt_base_callback

    monitor = {
        "class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
        "init_args": {"logging_interval": "step"},
    }
    sbp = {
        "class_path": "lightning_sbp.SelectiveBackprop",
        "init_args": {"selector": "omp", "keep": 0.3, "score_precision": "bf16", "interrupt": 0, "seed": 9},
    }
    spec = grid(methods=[FULL, "topk"], keep=[0.5], overrides={"trainer": {"max_epochs": 2}})
    assert adopt_base_callback(spec, [monitor]) is spec
    adopted = adopt_base_callback(spec, [monitor, sbp])
    assert adopted.overrides == {"trainer": {"max_epochs": 2, "callbacks": [monitor]}}
    assert spec.overrides == {"trainer": {"max_epochs": 2}}  # the grid it came from is unchanged
    # only options away from their defaults, and none of those the grid sets itself
    assert adopted.callback_options == {"score_precision": "bf16"}
    _, topk = expand(adopted, "f", 64)
    assert _callback(topk)["init_args"] == {
        "score_precision": "bf16",
        "selector": "topk",
        "keep": 0.5,
        "seed": 0,
        "track_grad_error": True,
        "grad_error_every": 4,
    }


def test_learning_rate_grids_per_method_or_shared() -> None:
    per_method = grid(methods=[FULL, "random"], keep=[0.5], lr={"random": [0.1, 0.2]})
    assert [run.lr for run in expand(per_method, "f", 64)] == [None, 0.1, 0.2]
    shared = grid(methods=[FULL, "random"], keep=[0.5], lr=[0.1])
    assert [run.lr for run in expand(shared, "f", 64)] == [0.1, 0.1]
    with pytest.raises(GridError, match="positive"):
        grid(methods=[FULL], lr=[0.0])


def test_each_method_is_reported_at_its_best_learning_rate_and_speedups_use_the_selected_full_row() -> None:
    from lightning_sbp.compare.report import Row, select_best_lr

    rows = [
        Row(0.0, FULL, None, 0.1, final_mean=0.8, train_seconds_mean=10.0),
        Row(0.0, FULL, None, 0.2, final_mean=0.9, train_seconds_mean=8.0),
        Row(0.0, "omp", 0.5, 0.1, final_mean=0.85, train_seconds_mean=4.0),
        Row(0.0, "omp", 0.5, 0.2, final_mean=0.85, train_seconds_mean=2.0),
    ]
    selected = select_best_lr(rows, "max")
    assert [(row.method, row.lr) for row in selected] == [(FULL, 0.2), ("omp", 0.1)]  # ties keep the first
    assert [row.speedup for row in selected] == [1.0, 2.0]
    assert [(row.method, row.lr) for row in select_best_lr(rows, "min")] == [(FULL, 0.1), ("omp", 0.1)]


# --- selector variants ------------------------------------------------------------------------------


def test_selector_variants_are_methods_with_their_own_rows_ids_and_callbacks() -> None:
    spec = grid(
        methods=[
            "omp",
            "omp:weights=raw",
            "omp: nonnegative=True",
            "omp:weights=raw,ridge=1e-1",
            "omp:nonnegative=true",
        ],
        keep=[0.5],
        lr={"omp:ridge=0.1,weights=raw": [0.1], "omp:nonnegative=True": [0.2]},
    )
    assert spec.methods == ["omp", "omp:weights=raw", "omp:nonnegative=true", "omp:ridge=0.1,weights=raw"]
    assert spec.lr == {"omp:ridge=0.1,weights=raw": [0.1], "omp:nonnegative=true": [0.2]}
    runs = expand(spec, "fingerprint", 64)
    assert [run.method for run in runs] == spec.methods
    assert len({run.run_id for run in runs}) == len(runs)
    assert [run.run_id for run in expand(spec, "fingerprint", 64)] == [run.run_id for run in runs]
    assert runs[1].run_id.startswith("omp-weights-raw-keep0.5-seed0-")
    assert all(":" not in run.run_id and "=" not in run.run_id for run in runs)

    def selector(run: Any) -> Any:
        arg = next(arg for arg in run.args if arg.startswith("--trainer.callbacks+="))
        return json.loads(arg.split("=", 1)[1])["init_args"]["selector"]

    assert selector(runs[0]) == "omp"  # plain names keep their arguments, hence their run ids
    assert selector(runs[1]) == {
        "class_path": "lightning_sbp.selectors.omp.OMPSelector",
        "init_args": {"weights": "raw"},
    }
    assert selector(runs[3])["init_args"] == {"ridge": 0.1, "weights": "raw"}
    assert runs[2].lr == 0.2 and runs[3].lr == 0.1


def test_a_variant_builds_the_selector_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_sbp import SelectiveBackprop
    from lightning_sbp.cli import SelectiveBackpropCLI
    from lightning_sbp.compare.runner import base_args
    from lightning_sbp.selectors import OMPSelector

    spec = grid(methods=["omp:nonnegative=true,weights=raw"], keep=[0.25])
    (run,) = expand(spec, "fingerprint", 64)
    args = [*base_args(spec), *run.args, "--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    monkeypatch.setattr("sys.argv", ["lightning-sbp"])  # LightningCLI reads it besides `args`
    cli = SelectiveBackpropCLI(args=args, run=False, save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SelectiveBackprop)]
    assert isinstance(callback.selector, OMPSelector)
    assert callback.selector.weights == "raw" and callback.selector.nonnegative is True


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("omp:weights=sum", "'normalized', 'uniform', 'raw'"),
        ("omp:no_such_option=1", "no_such_option"),
        ("omp:weigths=raw", "OMPSelector has no argument 'weigths'; did you mean 'weights'? its arguments: weights, "),
        ("omp:weights", "KEY=VALUE"),
        ("omp:", "KEY=VALUE"),
        ("omp:weights=raw,weights=raw", "twice"),
        ("full:keep=1", "takes no options"),
        ("bogus:weights=raw", "unknown method"),
    ],
)
def test_bad_variants_are_grid_errors(method: str, message: str) -> None:
    with pytest.raises(GridError, match=re.escape(message)):
        grid(methods=[method], keep=[0.5])


def test_variants_on_the_command_line(tmp_path: Path, counts: Counts, capsys: pytest.CaptureFixture[str]) -> None:
    fits = counts.fits
    output = tmp_path / "new"
    assert compare([*TINY, "--output", str(output), "--methods", "omp", "omp:weights=raw", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 runs" in out and "omp-weights-raw-keep0.5" in out
    assert counts.fits == fits


@pytest.mark.parametrize(("load", "warned"), [(1.5, False), (3.5, True)])
def test_the_summary_warns_when_the_runs_competed_for_the_cpus(load: float, warned: bool) -> None:
    base = str(Path(__file__).resolve().parents[1] / "examples" / "configs" / "digits_full.yaml")
    grid = Grid.from_values({"base": base, "output": "unused", "methods": ["full"], "keep": [0.5]})
    records = [{"load_average": [1.0, load], "cpus": 2}]
    text = command._summary_document(grid, "", records, [], [], tuned=False)
    assert "load average during the runs: 1.0 to " in text
    assert ("busier than its CPUs" in text) == warned


def _stale_records(last_validated: int, trained_to: int) -> list[dict[str, Any]]:
    return [
        {
            "run_id": "random-keep0.5-seed0",
            "status": "finished",
            "validation": [{"step": 3, "value": 0.5}, {"step": last_validated, "value": 0.6}],
            "optimizer_steps": trained_to,
            "batches_per_epoch": 3,
        }
    ]


@pytest.mark.parametrize(("last_validated", "trained_to"), [(6, 6), (6, 8)])
def test_the_summary_warns_when_runs_trained_on_after_their_last_validation(
    last_validated: int, trained_to: int
) -> None:
    grid = Grid.from_values({"base": str(BASE), "output": "unused", "methods": ["full"], "keep": [0.5]})
    records = _stale_records(last_validated, trained_to)
    sentence = command.stale_validation_sentence(grid, records)
    text = command._summary_document(grid, "", records, [], [], tuned=False)
    if trained_to == last_validated:
        assert sentence == "" and "trained on after their last validation" not in text
    else:
        assert f"validated last at optimiser step {last_validated}, trained to step {trained_to}" in sentence
        assert "an epoch here has 3 batches" in sentence and "trained on after their last validation" in text


def test_a_step_budget_off_the_validations_is_said_and_one_before_any_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Three batches an epoch, validated at the end of each: 4 steps end one step after a validation, 2 before any.
    ends = {}
    for steps in (4, 2):
        output = tmp_path / f"steps{steps}"
        args = [*TINY, "--methods", "random", "--set", f"trainer.max_steps={steps}", "--output", str(output)]
        ends[steps] = compare(args), capsys.readouterr().err, records(output)["random"]
    status, err, record = ends[4]
    assert status == 0 and record["validation"][-1]["step"] == 3 and record["optimizer_steps"] == 4
    assert "validated last at optimiser step 3, trained to step 4" in " ".join(err.split())
    status, err, record = ends[2]
    assert status == 1 and record["status"] == "failed"
    assert "no validation ran before the fit ended at optimiser step 2" in record["error"]


@pytest.mark.parametrize(("shortest", "decimals"), [(3.6, 1), (12.0, 1), (0.42, 2), (0.042, 3), (1e-6, 4)])
def test_train_times_keep_two_significant_digits_of_the_shortest(shortest: float, decimals: int) -> None:
    rows = [Row(None, "full", 1.0, None, [0], train_seconds_mean=shortest * 3), Row(None, "random", 0.5, None, [0])]
    rows[1].train_seconds_mean, rows[1].train_seconds_std = shortest, shortest / 7
    assert seconds_decimals(rows) == decimals
    line = markdown_table(rows, "val/acc").splitlines()[-1]
    assert f"{shortest:.{decimals}f} ± {shortest / 7:.{decimals}f}" in line
