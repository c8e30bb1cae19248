"""``lightning-sbp compare``: parse the grid, check everything, run what is missing, write the summary and plots."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_sbp.compare import time_to_accuracy
from lightning_sbp.compare.grid import (
    GRID_KEYS,
    Grid,
    GridError,
    Run,
    adopt_base_callback,
    available_methods,
    base_fingerprint,
    expand,
    load_grid_file,
    merge,
    nest,
    parse_assignment,
)
from lightning_sbp.compare.launchers import LAUNCHERS, make_launcher
from lightning_sbp.compare.multiplicity import CORRECTIONS, correction_name
from lightning_sbp.compare.plots import plot_all
from lightning_sbp.compare.report import markdown_table, select_best_lr, summarise, write_csv
from lightning_sbp.compare.runner import (
    BaseInfo,
    cell_status,
    check_output,
    check_runs,
    inspect_base,
    one_line,
    prepare_output,
    run_cell,
    run_grid,
    run_record,
)
from lightning_sbp.compare.significance import compare_rows, reading, significance_tables

__all__ = ["build_parser", "grid_from_args", "main", "measurement_sentence", "stale_validation_sentence"]

_EPILOG = """\
Every run is a real Lightning fit built by LightningCLI from the base configuration, the grid's
overrides and the run's settings: 'full' trains on every example with no callback; a selector
method adds SelectiveBackprop(selector, keep, seed=<run seed>) to trainer.callbacks; 'small-batch'
trains with batch size k = floor(keep * N) for as many optimiser steps as the selective runs (so
with as many examples backpropagated), the reference for random selection. All runs of a seed
share seed_everything, hence the initial weights and the data order. 'random:seed_offset=1' is
random selection with other random draws: against random, an A/A row that calibrates the test.
A SelectiveBackprop callback in the base configuration gives its options (scoring, schedule) to
every selective run's callback and leaves the configuration; its selector and keep are not used.

Fairness: each run's train time excludes validation and the gradient-error measurements, which only
the comparison needs (the callback times them apart; they run on every grad_error_every-th selective
step), so random pays no scoring pass. Differences are paired by seed, and each table's p-values are
adjusted together (Holm by default) so that a whole table keeps a 5% error rate.

A grid file holds the same settings as the flags (flags win). Paths in it are relative to the file:

  base: ../configs/digits_full.yaml   # LightningCLI config without a SelectiveBackprop callback
  methods: [full, random, loss, topk, omp, small-batch]
  keep: [0.5]
  label_noise: [0.0, 0.3]             # omit to keep the base config's
  seeds: [0, 1]                       # default [0]
  lr: {full: [0.05, 0.1], omp: [0.05, 0.1]}   # or a list for every method; omit to keep the base's
  overrides: {trainer: {max_epochs: 5}}       # partial LightningCLI config applied to every run
  metric: val/acc                     # validation metric to report; mode: max or min
  threads: 1                          # torch.set_num_threads for the runs
  target_tolerance: 0.01              # time-to-accuracy target: full's final metric minus this
  grad_error_every: 4                 # measure gradient errors on every 4th selective step
  correction: holm                    # p-values adjusted per table: holm, bh or none
  keys: {lr: model.init_args.lr, label_noise: data.init_args.label_noise,
         batch_size: data.init_args.batch_size}

Output: runs/<run_id>/{config.yaml,record.json,logs/<method>/} per run, summary.md, summary.csv
(and summary_all.csv with every learning rate), plots/*.png. A repeated command skips finished
runs and says how many it reused; an output directory of another base configuration is refused.
With a learning-rate grid each method is reported at the learning rate with the best mean final
validation value. Ctrl-C stops the grid; the same command resumes it.

Launchers: --launcher in-process (default) trains one run after another in this process;
--launcher ray trains every run as a Ray task with the resources of the base configuration
(trainer.accelerator, trainer.devices) on the cluster at --ray-address, the one Ray finds, or a
new local one (needs pip install 'lightning-sbp[cluster]'). For any other scheduler (SLURM
arrays, Kubernetes jobs): --list-cells numbers the runs, --cell I trains run I alone, and --report
writes the summary of whatever has finished. On a cluster --output must be a shared filesystem.
A run on several devices (--set trainer.devices=4 --set trainer.strategy=ddp) trains in a command
of its own, whose rank zero writes the record; a failing rank fails the run, not the grid.

Exit status: 0 when every run finished, 1 when some failed (see runs/<run_id>/error.txt) or, for
--report, have no record yet, 2 for bad input (nothing is trained), 130 when interrupted.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-sbp compare``."""
    parser = argparse.ArgumentParser(
        prog="lightning-sbp compare",
        description=textwrap.fill(
            "Compare Selective Backprop selectors with full training and with a smaller batch at equal cost, "
            "on any LightningCLI configuration: a grid of methods, keep fractions, label-noise levels, seeds "
            "and learning rates; a table and plots of validation accuracy, gradient error, time and examples "
            "backpropagated.",
            width=100,
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="GRID.yaml", help="grid file (see below); flags override its keys")
    parser.add_argument("--base", metavar="BASE.yaml", help="base LightningCLI config: model, data, trainer")
    parser.add_argument("--output", metavar="DIR", help="directory for runs, summary and plots")
    parser.add_argument(
        "--methods",
        nargs="*",
        metavar="METHOD",
        help=f"methods to compare: {', '.join(available_methods())}",
    )
    parser.add_argument("--keep", nargs="*", type=float, metavar="F", help="keep fractions in (0, 1]")
    parser.add_argument(
        "--label-noise", dest="label_noise", nargs="*", type=float, metavar="F", help="label-noise levels in [0, 1]"
    )
    parser.add_argument("--seeds", nargs="*", type=int, metavar="S", help="seeds, one run each (default 0)")
    parser.add_argument(
        "--lr",
        nargs="*",
        metavar="[METHOD=]LR[,LR...]",
        help="learning rates: 'LR,LR' for every method (--lr 0.05,0.1), or 'METHOD=LR,LR' per method "
        "(--lr full=0.1 omp=0.02,0.05; methods left out keep the base config's)",
    )
    parser.add_argument(
        "--set",
        dest="assignments",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a base config key in every run, e.g. --set trainer.max_epochs=3 (repeatable)",
    )
    parser.add_argument("--metric", help="validation metric to report (default val/acc)")
    parser.add_argument("--mode", choices=["max", "min"], help="whether a higher metric is better (default max)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads for the runs")
    parser.add_argument(
        "--target-tolerance",
        dest="target_tolerance",
        type=float,
        metavar="D",
        help="time to accuracy: the target is full's mean final metric minus D (plus D with --mode min; default 0.01)",
    )
    parser.add_argument(
        "--grad-error-every",
        dest="grad_error_every",
        type=int,
        metavar="G",
        help="selective runs measure their gradient errors on every G-th selective step (default 4)",
    )
    parser.add_argument(
        "--correction",
        choices=CORRECTIONS,
        help="how each table's p-values are adjusted together: holm (family-wise error, the default), bh "
        "(false-discovery rate) or none",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--launcher",
        metavar="NAME",
        help=f"where the runs train: {', '.join(LAUNCHERS)} (default in-process)",
    )
    parser.add_argument(
        "--ray-address",
        dest="ray_address",
        metavar="ADDRESS",
        help="Ray cluster for --launcher ray (default: the one ray.init(address='auto') finds, else a local one)",
    )
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--dry-run", action="store_true", help="check the grid and list its runs; train nothing")
    modes.add_argument(
        "--list-cells",
        action="store_true",
        help="print one line per run: its index for --cell, its run id, and finished, failed or pending",
    )
    modes.add_argument(
        "--cell",
        type=int,
        metavar="I",
        help="train run I of --list-cells alone, in this process, and write its record (for job arrays)",
    )
    modes.add_argument(
        "--report",
        action="store_true",
        help="train nothing: write the summary and plots of the finished runs and list the missing ones",
    )
    return parser


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The checked grid from parsed arguments: the grid file's values, overridden by the flags.

    Raises:
        GridError: for anything that cannot run.
    """
    values: dict[str, Any] = load_grid_file(Path(args.config)) if args.config else {}
    for key in GRID_KEYS:
        value = None if key == "lr" else getattr(args, key, None)  # learning rates have a syntax of their own
        if value is not None:
            values[key] = value
    if args.lr is not None:
        values["lr"] = _learning_rate_flags(args.lr)
    if args.assignments:
        overrides = values.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise GridError(f"overrides must be a mapping (a partial LightningCLI config), got {overrides!r}")
        values["overrides"] = merge(overrides, nest(dict(parse_assignment(text) for text in args.assignments)))
    return Grid.from_values(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sbp compare``.

    Args:
        argv: the arguments after ``compare``; ``None`` reads ``sys.argv[2:]``.

    Returns:
        0 when every run finished, 1 when some failed (or, with ``--report``, are missing), 130
        when interrupted (finished runs are kept).

    Raises:
        SystemExit: with status 2 and ``error: ...`` on stderr for bad input, before any training.
    """
    args = build_parser().parse_args(sys.argv[2:] if argv is None else list(argv))
    try:
        grid = grid_from_args(args)
        return _compare(grid, args)
    except GridError as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    except _Interrupted:
        sys.stderr.write("interrupted: finished runs are kept; run the same command to resume\n")
        return 130


class _Interrupted(Exception):
    """Ctrl-C during training (Lightning turns it into ``SystemExit`` inside a fit)."""


def _compare(grid: Grid, args: argparse.Namespace) -> int:
    single = "--cell" if args.cell is not None else "--report" if args.report else None
    if single is not None and args.launcher is not None:
        raise GridError(f"--launcher applies to a whole grid; {single} runs in this process: leave out --launcher")
    launcher = make_launcher(args.launcher or "in-process", args.ray_address)
    # The configuration first: a typo in an override is the error to report, even over an output
    # directory whose runs it would not match.
    base = inspect_base(grid)
    grid = adopt_base_callback(grid, base.callbacks)
    fingerprint = base_fingerprint(grid)
    check_output(grid, fingerprint)
    if args.report and not (grid.output / "compare.json").is_file():
        raise GridError(f"nothing to report: {str(grid.output)!r} holds no comparison yet (no compare.json)")
    runs = expand(grid, fingerprint, base.batch_size)
    if args.list_cells or args.dry_run:
        for index, run in enumerate(runs):
            print(f"{index}  {run.run_id}  {cell_status(grid, run)}")
        if args.dry_run:
            print(f"{len(runs)} runs; output {grid.output}")
        return 0
    if args.report:
        found = [record for run in runs if (record := run_record(grid, run)) is not None]
        return _summarise_output(grid, runs, found)
    try:
        if args.cell is not None:
            return _train_cell(grid, fingerprint, base, _cell(runs, args.cell))
        check_runs(grid, runs, here=launcher.in_process)
        prepare_output(grid, fingerprint)
        records = run_grid(grid, runs, base, launcher, progress=not args.no_progress)
    except (KeyboardInterrupt, SystemExit) as stop:
        raise _Interrupted from stop
    return _summarise_output(grid, runs, records)


def _cell(runs: Sequence[Run], index: int) -> Run:
    if not 0 <= index < len(runs):
        raise GridError(
            f"--cell {index} is out of range: this grid has {len(runs)} runs, numbered 0 to {len(runs) - 1} "
            "(see --list-cells)"
        )
    return runs[index]


def _train_cell(grid: Grid, fingerprint: str, base: BaseInfo, run: Run) -> int:
    """``--cell``: train ``run`` here unless it has finished; 0 when it finished, 1 when it failed."""
    if cell_status(grid, run) == "finished":
        print(f"{run.run_id} has finished already; remove its record to train it again")
        return 0
    check_runs(grid, [run])
    prepare_output(grid, fingerprint)
    record = run_cell(run, grid, base)
    print(one_line(record))
    return 0 if record.get("status") == "finished" else 1


def _summarise_output(grid: Grid, runs: Sequence[Run], records: list[dict[str, Any]]) -> int:
    """Write and print the summary and plots of ``records``; the exit status (1 if a run failed or is missing)."""
    rows = summarise(records, grid)
    selected = select_best_lr(rows, grid.mode)
    write_csv(selected, grid.output / "summary.csv")
    tuned = any(len(rates) > 1 for rates in grid.lr.values())
    if tuned:
        write_csv(rows, grid.output / "summary_all.csv")
    else:
        (grid.output / "summary_all.csv").unlink(missing_ok=True)  # from an earlier, tuned grid
    table = markdown_table(selected, grid.metric)
    analysis = _analysis(grid, selected, records)
    failed = [record for record in records if record.get("status") != "finished"]
    recorded = {record["run_id"] for record in records}
    missing = [run.run_id for run in runs if run.run_id not in recorded]
    (grid.output / "summary.md").write_text(
        _summary_document(grid, table, records, failed, missing, tuned) + "\n" + analysis
    )
    plots = plot_all(selected, records, grid.metric, grid.output / "plots", show_lr=tuned) if selected else []

    print(table, end="")
    print(_legend(grid, tuned))
    measured = measurement_sentence(grid, records)
    if measured:
        print(textwrap.fill(measured, width=110))
    print(f"summary: {grid.output / 'summary.md'}, {grid.output / 'summary.csv'}")
    if plots:
        print("plots: " + ", ".join(str(path) for path in plots))
    print("\n" + analysis, end="")
    stale = stale_validation_sentence(grid, records)
    if stale:
        sys.stderr.write(textwrap.fill("warning: " + stale.replace("**", ""), width=110) + "\n")
    if missing:
        sys.stderr.write(f"{len(missing)} of {len(runs)} runs have no record yet: {', '.join(missing)}\n")
    if failed:
        names = ", ".join(record["run_id"] for record in failed)
        sys.stderr.write(f"{len(failed)} of {len(runs)} runs failed ({names}); see runs/<run_id>/error.txt\n")
    return 1 if failed or missing else 0


def _legend(grid: Grid, tuned: bool) -> str:
    text = (
        f"Means ± sample standard deviations over seeds. final/best {grid.metric}: at the last validation / the best "
        "validation of each run. grad error: mean relative error of the selected subset's last-layer gradient "
        "against the full batch's; error² / random's: the mean over measured steps of that error squared over the "
        "closed-form expected squared error of a random subset of the same size, whose expectation is exactly 1 for "
        "random selection (below 1: closer to the batch gradient than random subsets, in mean square). train time: "
        "wall-clock time of the fit without validation and without the gradient-error measurements; speedup: "
        "full's train time divided by the method's. examples backprop: examples that went through a backward pass."
    )
    if tuned:
        text += (
            f" Each method is shown at the learning rate with the best mean final {grid.metric} "
            "(all learning rates: summary_all.csv)."
        )
    return textwrap.fill(text, width=110)


def measurement_sentence(grid: Grid, records: list[dict[str, Any]]) -> str:
    """How the train times treat the gradient-error measurements, and the share of time those took."""
    selective = [r for r in records if r.get("status") == "finished" and r.get("selective_steps")]
    if not selective:
        return ""
    timed = [r for r in selective if r.get("measurement_seconds") is not None]
    if not timed:
        return ""
    sample = grid.grad_error_every
    every = "on every selective step" if sample == 1 else f"on one selective step in {sample}"
    shares: dict[str, list[float]] = {}
    for r in timed:
        total = r["train_seconds"] + r["measurement_seconds"]
        shares.setdefault(r["method"], []).append(r["measurement_seconds"] / total if total > 0 else 0.0)
    means = {method: sum(values) / len(values) for method, values in shares.items()}
    largest = max(means, key=lambda method: means[method])
    return (
        f"The gradient errors were measured {every}, timed apart by the callback and subtracted from the train "
        f"times: they took {sum(means.values()) / len(means):.0%} of a selective run's time on average "
        f"(most: {largest}, {means[largest]:.0%}). Random selection runs a scoring pass only to measure, so its "
        "train time carries none."
    )


def stale_validation_sentence(grid: Grid, records: list[dict[str, Any]]) -> str:
    """A warning when runs trained on after their last validation, or ``""``.

    Their final metric is then that of an earlier model than the one their train time and examples describe:
    a budget in steps (``max_steps``) that does not end on a validation.
    """
    stale = [
        record
        for record in records
        if record.get("status") == "finished"
        and record.get("validation")
        and record["validation"][-1]["step"] < (record.get("optimizer_steps") or 0)
    ]
    if not stale:
        return ""
    first = stale[0]
    last_step, end = first["validation"][-1]["step"], first["optimizer_steps"]
    per_epoch = first.get("batches_per_epoch")
    epoch = f" (an epoch here has {per_epoch} batches)" if per_epoch else ""
    return (
        f"**{len(stale)} of {len(records)} runs trained on after their last validation** ({first['run_id']}: "
        f"validated last at optimiser step {last_step}, trained to step {end}): their final and best "
        f"{grid.metric} are those of an earlier model than their train time and examples describe. End the budget "
        f"on a validation: `max_epochs` instead of `max_steps`, `max_steps` a multiple of the batches of an "
        f"epoch{epoch}, or a `val_check_interval` that divides it."
    )


def _analysis(grid: Grid, rows: list[Any], records: list[dict[str, Any]]) -> str:
    """Time to accuracy, then the paired differences over seeds and the sentences that read them (last)."""
    targets = time_to_accuracy.time_to_target(rows, records, grid.mode, grid.target_tolerance, grid.correction)
    differences = compare_rows(rows, records, grid.correction)
    sections = []
    if targets:
        sections += [
            "## Time to accuracy",
            "",
            time_to_accuracy.markdown_table(targets, grid.metric),
            _wrap(
                f"Training time (validation and measurements excluded) and examples backpropagated until the "
                f"validation {grid.metric} first reached the target: full's mean final value "
                f"{'minus' if grid.mode == 'max' else 'plus'} {grid.target_tolerance:g}. A run that never reached it "
                "is censored (>: its whole training time). Speedup: on each seed, full's time over the method's on "
                "the same seed; the geometric mean over seeds with its 95% confidence interval. With censored runs "
                "it is a bound (≤ or ≥) and is not tested. Beyond noise: adjusted p-value below 0.05, "
                f"{correction_name(grid.correction)} over the table."
            ),
            "",
        ]
    sections += [
        "## Which differences are larger than seed noise",
        "",
        significance_tables(rows, differences, grid.metric),
        _wrap(
            "Each method minus random (same keep and noise) and minus full, seed by seed: mean and 95% Student-t "
            "confidence interval over the seeds (each comparison on its own). Beyond noise: the paired t-test's "
            f"p-value, with {correction_name(grid.correction)} over the table, is below 0.05; those "
            "differences are in bold."
        ),
        "",
        *[_wrap(sentence) for sentence in reading(rows, differences, grid.metric, grid.mode, grid.correction)],
        "",
    ]
    return "\n".join(sections)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=110)


def _summary_document(
    grid: Grid,
    table: str,
    records: list[dict[str, Any]],
    failed: list[dict[str, Any]],
    missing: list[str],
    tuned: bool,
) -> str:
    lines = [
        "# Selective Backprop comparison",
        "",
        f"Base configuration: `{grid.base}`; {len(records)} runs; seeds {', '.join(map(str, grid.seeds))}.",
    ]
    loads = [load for record in records for load in record.get("load_average", []) if load is not None]
    if loads:
        cpus = {int(record["cpus"]) for record in records if record.get("cpus")}
        line = (
            f"1-minute load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
            f"({'/'.join(map(str, sorted(cpus))) or '?'} CPUs); times are comparable only under a steady load."
        )
        if cpus and max(loads) > min(cpus):
            line += (
                " **The machine was busier than its CPUs**: runs competed for them, so the train times and "
                "speedups below are not to be trusted; run the comparison again on a quieter machine, with "
                "`--threads` at most the CPUs left free."
            )
        lines.append(line)
    sizes = sorted({int(record["world_size"]) for record in records if record.get("world_size")})
    if sizes and sizes != [1]:
        lines.append(
            f"Each run trained on {'/'.join(map(str, sizes))} devices: train time is the slowest rank's, "
            "examples are counted over all ranks."
        )
    lines += ["", table, _legend(grid, tuned), ""]
    measured = measurement_sentence(grid, records)
    if measured:
        lines += [textwrap.fill(measured, width=110), ""]
    stale = stale_validation_sentence(grid, records)
    if stale:
        lines += [textwrap.fill(stale, width=110), ""]
    if failed:
        lines += [f"{len(failed)} runs failed and are left out: " + ", ".join(r["run_id"] for r in failed), ""]
    if missing:
        lines += [f"{len(missing)} runs have no record yet and are left out: " + ", ".join(missing), ""]
    return "\n".join(lines)


def _learning_rate_flags(items: Sequence[str]) -> dict[str, list[str]] | list[str]:
    shared: list[str] = []
    per_method: dict[str, list[str]] = {}
    for item in items:
        method, sep, rates = item.rpartition("=")
        values = [rate for rate in rates.split(",") if rate.strip()]
        if sep:
            per_method.setdefault(method, []).extend(values)
        else:
            shared.extend(values)
    if not per_method:
        return shared
    if shared:
        raise GridError("--lr: give either shared learning rates (LR,LR) or per-method ones (METHOD=LR,LR), not both")
    return per_method
