"""``lightning-sbp profile``: will Selective Backprop save time on this model, this data and this machine?

A selective step costs a scoring pass over all ``N`` examples plus a training step on ``k`` of
them, against one training step on ``N``::

    predicted speedup = T_full(N) / (T_score(N) + T_full(k))

The command measures each term with the user's own configuration through the real ``Trainer``,
then real selective steps (``SelectiveBackprop(selector="topk")`` at each keep fraction, a selector
that reads the scores), and sets the prediction next to the measurement. ``random`` selection with
gradient tracking off skips the scoring pass and costs ``T_full(k)`` alone. All four kinds of fit
load the same batches of ``N``; they differ only in what the training step does:

- ``full``: the configured training step on the whole batch;
- ``score``: the scoring pass alone, timed inside the step (the step returns nothing, so no
  backward or optimiser step runs);
- ``subset k``: the configured training step on the first ``k`` rows of the batch;
- ``selective keep``: the real callback.

A step's time is the wall-clock time between the ends of consecutive training batches, so it
includes data loading, the optimiser and every hook. Fits are repeated in rounds, in alternating
order, and every ratio is taken within a round (paired) before the median over rounds.

The fixed overhead is the intercept of a straight line through the step times on ``N`` and on
each ``k``: the part of a step that does not grow with the examples trained on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BatchSizeFinder, Callback, EarlyStopping, LearningRateFinder

from lightning_sbp.callback import SelectiveBackprop
from lightning_sbp.functional.batch import batch_size, index_batch, subset_size
from lightning_sbp.recipes.data import DatasetNotFoundError
from lightning_sbp.scoring import ScoringError, has_batch_norm

__all__ = [
    "DEFAULT_KEEPS",
    "KeepResult",
    "Profile",
    "RoundTimes",
    "analyse",
    "build_parser",
    "format_report",
    "main",
    "verdict",
]

DEFAULT_KEEPS = (0.1, 0.25, 0.5)
"""Keep fractions profiled when ``--keep`` is not given."""

PAYS_OFF = 1.1
"""A speedup below this is not worth the change of method (it is within what a busy machine varies)."""

_QUIET_WARNINGS = (
    ".*does not have many workers.*",
    ".*The number of training batches.*",
    ".*training_step.*returned.*None.*",
    ".*LeafSpec.*",
    ".*max_epochs.*",
    ".*but have no `val_dataloader`.*",
)


@dataclass(frozen=True)
class RoundTimes:
    """Median step times of one round of fits, in seconds.

    Attributes:
        full: a training step on the whole batch of ``N``.
        score: the scoring pass over ``N`` examples alone (timed inside the step).
        subset: per keep fraction, a training step on ``k`` of the ``N`` examples loaded.
        selective: per keep fraction, a real selective step.
    """

    full: float
    score: float
    subset: dict[float, float]
    selective: dict[float, float]


@dataclass(frozen=True)
class KeepResult:
    """One line of the profile.

    Attributes:
        keep: the keep fraction.
        k: examples trained on per batch of ``N``.
        predicted_speedup: ``T_full(N) / (T_score(N) + T_full(k))``, median over rounds.
        measured_speedup: ``T_full(N) / T_selective``, median over rounds.
        agreement: measured over predicted (1: the cost model is exact).
        subset_step_ms: median time of a training step on ``k`` examples.
        selective_step_ms: median time of a real selective step.
    """

    keep: float
    k: int
    predicted_speedup: float
    measured_speedup: float
    agreement: float
    subset_step_ms: float
    selective_step_ms: float


@dataclass(frozen=True)
class Profile:
    """What ``profile`` found.

    Attributes:
        batch_size: ``N``.
        full_step_ms: median time of a training step on ``N`` examples.
        scoring_pass_ms: median time of the scoring pass over ``N`` examples.
        full_over_score: how many scoring passes a full step costs (median over rounds of each round's ratio).
        overhead_ms: the fixed overhead of a step (intercept of step time against examples trained on).
        overhead_share: ``overhead_ms`` over the full step.
        break_even_keep: the keep fraction at which the predicted speedup is 1 (``None``: none in (0, 1]).
        ceiling_speedup: the predicted speedup as ``keep`` goes to 0, scoring and overhead only (median over
            rounds of each round's value).
        rounds: rounds of fits the medians are taken over.
        keeps: one result per keep fraction.
        load_average: the machine's 1-minute load average before and after the fits, lowest first
            (``None`` where the system has none).
        cpus: the machine's CPU count.
        threads: the intra-op threads the fits ran with (``None`` where not recorded).
    """

    batch_size: int
    full_step_ms: float
    scoring_pass_ms: float
    full_over_score: float
    overhead_ms: float
    overhead_share: float
    break_even_keep: float | None
    ceiling_speedup: float
    rounds: int
    keeps: list[KeepResult]
    load_average: tuple[float, float] | None = None
    cpus: int | None = None
    threads: int | None = None


def analyse(rounds: Sequence[RoundTimes], batch: int, ks: dict[float, int]) -> Profile:
    """The cost model applied to measured step times.

    Args:
        rounds: the step times of each round.
        batch: the batch size ``N``.
        ks: per keep fraction, the number ``k`` of examples trained on.

    Raises:
        ValueError: without rounds or keep fractions.
    """
    if not rounds or not ks:
        raise ValueError("analyse needs at least one round of measurements and one keep fraction")
    full = statistics.median(r.full for r in rounds)
    score = statistics.median(r.score for r in rounds)
    subset = {keep: statistics.median(r.subset[keep] for r in rounds) for keep in ks}
    # Step time against examples trained on: a + c * examples (least squares over N and every k).
    points = [(float(batch), full), *((float(ks[keep]), subset[keep]) for keep in ks)]
    slope, intercept = _line(points)
    overhead = min(max(intercept, 0.0), full)
    if slope > 0:
        # score + a + c*k = a + c*N  <=>  k = N - score/c
        break_even = 1.0 - score / (slope * batch)
        break_even_keep: float | None = min(break_even, 1.0) if break_even > 0 else None
    else:
        break_even_keep = None
    results = []
    for keep, k in ks.items():
        predicted = statistics.median(r.full / (r.score + r.subset[keep]) for r in rounds)
        measured = statistics.median(r.full / r.selective[keep] for r in rounds)
        results.append(
            KeepResult(
                keep=keep,
                k=k,
                predicted_speedup=predicted,
                measured_speedup=measured,
                agreement=measured / predicted,
                subset_step_ms=1e3 * subset[keep],
                selective_step_ms=1e3 * statistics.median(r.selective[keep] for r in rounds),
            )
        )
    return Profile(
        batch_size=batch,
        full_step_ms=1e3 * full,
        scoring_pass_ms=1e3 * score,
        full_over_score=statistics.median(r.full / r.score if r.score > 0 else math.inf for r in rounds),
        overhead_ms=1e3 * overhead,
        overhead_share=overhead / full if full > 0 else 0.0,
        break_even_keep=break_even_keep,
        ceiling_speedup=statistics.median(
            r.full / (r.score + overhead) if r.score + overhead > 0 else math.inf for r in rounds
        ),
        rounds=len(rounds),
        keeps=sorted(results, key=lambda result: result.keep),
    )


def _line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares slope and intercept through ``(x, y)`` points (slope 0 when every x is equal)."""
    xs, ys = [x for x, _ in points], [y for _, y in points]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - x_mean) ** 2 for x in xs)
    if spread == 0:
        return 0.0, y_mean
    slope = sum((x - x_mean) * (y - y_mean) for x, y in points) / spread
    return slope, y_mean - slope * x_mean


def verdict(profile: Profile) -> str:
    """One sentence: whether Selective Backprop can save time here, and why."""
    best = max(profile.keeps, key=lambda result: result.measured_speedup)
    if best.measured_speedup >= PAYS_OFF:
        where = (
            f"; it breaks even at keep ≈ {profile.break_even_keep:.2f}" if profile.break_even_keep is not None else ""
        )
        return (
            f"Selective Backprop can save time on this model: at keep {best.keep:g} a step is "
            f"{best.measured_speedup:.2f}× faster than a full step{where}."
        )
    if profile.ceiling_speedup < PAYS_OFF or profile.break_even_keep is None:
        return (
            f"Selective Backprop cannot pay off on this model: a full step costs only {profile.full_over_score:.1f}× "
            f"the scoring pass and {profile.overhead_share:.0%} of it is fixed overhead, so even a tiny keep "
            f"would be at most {profile.ceiling_speedup:.2f}× faster."
        )
    if best.measured_speedup < 1.0:
        return (
            f"Selective Backprop did not save time in these fits: at best {best.measured_speedup:.2f}× (keep "
            f"{best.keep:g}), slower than a full step, although the cost model puts break-even at keep ≈ "
            f"{profile.break_even_keep:.2f}; a step's fixed overhead or a busy machine (see the load line) can "
            "explain the gap: profile again before deciding."
        )
    return (
        f"Selective Backprop barely pays off on this model: at best {best.measured_speedup:.2f}× "
        f"(keep {best.keep:g}); it breaks even only below keep ≈ {profile.break_even_keep:.2f}."
    )


def format_report(profile: Profile) -> str:
    """The table, the cost-model inputs, the break-even keep, the overhead share and the verdict."""
    lines = [
        "| keep | k | predicted speedup | measured speedup | agreement | subset step (ms) | selective step (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in profile.keeps:
        lines.append(
            f"| {r.keep:g} | {r.k} | {r.predicted_speedup:.2f}× | {r.measured_speedup:.2f}× | {r.agreement:.2f} "
            f"| {r.subset_step_ms:.1f} | {r.selective_step_ms:.1f} |"
        )
    break_even = (
        "none: the scoring pass alone costs as much as the saving"
        if profile.break_even_keep is None
        else f"{profile.break_even_keep:.2f} (selective steps are faster below it)"
    )
    lines += [
        "",
        f"batch N = {profile.batch_size}; medians over {profile.rounds} rounds.",
        f"full step {profile.full_step_ms:.1f} ms = {profile.full_over_score:.1f}× the scoring pass "
        f"({profile.scoring_pass_ms:.1f} ms).",
        f"fixed overhead {profile.overhead_ms:.1f} ms = {profile.overhead_share:.0%} of a full step "
        "(data loading, optimiser, hooks: the part that does not shrink with k).",
        f"break-even keep: {break_even}.",
        f"best case (keep → 0): {profile.ceiling_speedup:.2f}×.",
        "predicted = T_full(N) / (T_score(N) + T_full(k)); agreement = measured / predicted.",
        *_load_line(profile),
        "",
        verdict(profile),
    ]
    return "\n".join(lines) + "\n"


def _load_line(profile: Profile) -> list[str]:
    """The load the fits ran under, and a warning when the machine was busier than its CPUs."""
    if profile.load_average is None:
        return []
    low, high = profile.load_average
    line = f"1-minute load average during the fits: {low:.1f} to {high:.1f} on {profile.cpus or '?'} CPUs"
    if profile.cpus and high > profile.cpus:
        line += (
            "; the machine was busier than its CPUs, so step times are noisy and the ratios may be off: profile "
            "again on a quieter machine"
        )
        if profile.threads is not None and profile.threads > 1:
            line += ", or with --threads 1"
    return [line + "."]


def json_rows(profile: Profile) -> list[dict[str, Any]]:
    """One object per keep fraction: its line of the table and the shared cost-model inputs."""
    shared = {key: value for key, value in asdict(profile).items() if key != "keeps"}
    shared["verdict"] = verdict(profile)
    return [{**asdict(result), **shared} for result in profile.keeps]


# ---------------------------------------------------------------------------------------------- measuring


class _StepClock(Callback):
    """Times the loop: the wall-clock time between the ends of consecutive training batches.

    Stops the fit after ``warmup + steps`` batches; the first ``warmup`` intervals are dropped.
    """

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup = warmup
        self.steps = steps
        self.ends: list[float] = []
        self.batch_size: int | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        """Note the batch size of the first batch."""
        if self.batch_size is None:
            self.batch_size = batch_size(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        """Stamp the end of the batch; stop when enough are timed."""
        _synchronize(pl_module.device)
        self.ends.append(time.perf_counter())
        if len(self.ends) > self.warmup + self.steps:
            trainer.should_stop = True

    def step_times(self) -> list[float]:
        """The timed intervals."""
        return [later - earlier for earlier, later in zip(self.ends, self.ends[1:], strict=False)][self.warmup :]


class _StepVariant(Callback):
    """Replaces the module's ``training_step`` for one fit: the scoring pass alone, or the step on ``k`` rows.

    Args:
        mode: ``"score"`` or ``"subset"``.
        options: the scoring options (mode, precision, scale) of the scoring pass.
        k: rows trained on in ``"subset"`` mode.
    """

    def __init__(self, mode: str, options: SelectiveBackprop, k: int = 0) -> None:
        self.mode = mode
        self.options = options
        self.k = k
        self.score_times: list[float] = []
        self._original: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Wrap the module's ``training_step``."""
        original = pl_module.training_step
        self._original = original
        if self.mode == "score":
            self.options.scorer.setup(trainer, pl_module, needs_last_layer=False, track=False)

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            batch, rest = (args[0], args[1:]) if args else (kwargs.pop("batch"), ())
            if self.mode == "score":
                _synchronize(pl_module.device)
                started = time.perf_counter()
                _scoring_pass(pl_module, batch, self.options)
                _synchronize(pl_module.device)
                self.score_times.append(time.perf_counter() - started)
                return None
            indices = torch.arange(min(self.k, batch_size(batch)), device=pl_module.device)
            subset = index_batch(batch, indices)
            return original(subset, *rest, **kwargs) if args else original(batch=subset, **kwargs)

        pl_module.training_step = training_step  # type: ignore[method-assign]

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the module its own ``training_step`` back."""
        if self._original is not None:
            del pl_module.training_step
            self._original = None


def _scoring_pass(module: pl.LightningModule, batch: Any, options: SelectiveBackprop) -> None:
    """The scoring forward the callback runs on a step that does not measure, with its mode, precision and scale."""
    options.scorer.score_cheaply(module, batch, options, options.selector.needs_last_layer)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _Setup:
    """The user's configuration, built once: model, data, and a way to make a trainer per fit."""

    model: pl.LightningModule
    datamodule: pl.LightningDataModule | None
    make_trainer: Callable[[list[Callback]], pl.Trainer]
    options: SelectiveBackprop


def _build(configs: Sequence[str], extra: Sequence[str], warmup: int, steps: int) -> _Setup:
    from lightning_sbp.tool_cli import DiscardingLogger, ToolCLI

    args = [item for config in configs for item in ("--config", config)] + list(extra)
    # Early stopping needs validation, which is off; tuners would search inside every timed fit.
    timing_breakers = (SelectiveBackprop, EarlyStopping, BatchSizeFinder, LearningRateFinder)
    cli = ToolCLI(
        args=args,
        run=False,
        leave_out=timing_breakers,
        save_config_callback=None,
        parser_kwargs={"exit_on_error": False},
    )
    sbp = next((cb for cb in cli.configured_callbacks() if isinstance(cb, SelectiveBackprop)), None)

    def make_trainer(callbacks: list[Callback]) -> pl.Trainer:
        return cli.instantiate_trainer(
            callbacks=callbacks,
            max_epochs=None,
            max_steps=warmup + steps + 2,
            max_time=None,
            fast_dev_run=False,
            overfit_batches=0.0,
            limit_train_batches=1.0,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            val_check_interval=None,
            check_val_every_n_epoch=None,
            logger=DiscardingLogger(),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )

    options = sbp if sbp is not None else SelectiveBackprop("random")
    return _Setup(cli.model, cli.datamodule, make_trainer, options)


def _fit(setup: _Setup, callbacks: list[Callback], clock: _StepClock) -> None:
    trainer = setup.make_trainer([*callbacks, clock])
    trainer.fit(setup.model, datamodule=setup.datamodule)


def measure(
    setup: _Setup, keeps: Sequence[float], rounds: int, warmup: int, steps: int, progress: Callable[[str], None]
) -> tuple[list[RoundTimes], int, dict[float, int]]:
    """Run the fits round by round; return each round's median step times, ``N`` and each keep's ``k``."""
    probe = _StepClock(warmup, steps)
    _fit(setup, [], probe)  # warm-up: first calls of every kernel, allocator, caches
    batch = probe.batch_size or 1
    minimum = 2 if has_batch_norm(setup.model) else 1
    ks = {keep: subset_size(keep, batch, minimum) for keep in keeps}
    progress("warm-up")
    options = setup.options
    results = []
    for round_index in range(rounds):
        fits: list[tuple[str, float | None]] = [("full", None), ("score", None)]
        fits += [("subset", keep) for keep in keeps] + [("selective", keep) for keep in keeps]
        if round_index % 2:
            fits.reverse()
        times: dict[tuple[str, float | None], float] = {}
        for kind, keep in fits:
            clock = _StepClock(warmup, steps)
            callbacks: list[Callback] = []
            variant = None
            if kind == "score":
                variant = _StepVariant("score", options)
                callbacks = [variant]
            elif kind == "subset" and keep is not None:
                callbacks = [_StepVariant("subset", options, ks[keep])]
            elif kind == "selective" and keep is not None:
                callbacks = [_selective(options, keep)]
            _fit(setup, callbacks, clock)
            step_times = clock.step_times()
            if not step_times:
                raise ValueError(
                    f"the training data gave fewer than {warmup + 2} batches to time; use a smaller --warmup"
                )
            times[(kind, keep)] = statistics.median(step_times)
            if variant is not None:  # the scoring pass itself, not the loop around it
                times[(kind, keep)] = statistics.median(variant.score_times[warmup:] or variant.score_times)
            progress(f"round {round_index + 1}/{rounds}: {kind}" + ("" if keep is None else f" keep={keep:g}"))
        results.append(
            RoundTimes(
                full=times[("full", None)],
                score=times[("score", None)],
                subset={keep: times[("subset", keep)] for keep in keeps},
                selective={keep: times[("selective", keep)] for keep in keeps},
            )
        )
    return results, batch, ks


def _selective(options: SelectiveBackprop, keep: float) -> SelectiveBackprop:
    """A loss-ranking callback at ``keep`` with the configured scoring options and no tracking.

    ``topk`` reads the scores, so every selective step pays the scoring pass the cost model counts;
    its selection (a sort of ``N`` losses) costs next to nothing.
    """
    scorer = options.scorer
    return SelectiveBackprop(
        "topk",
        keep=keep,
        score_mode=scorer.mode,
        score_precision=scorer.precision,
        score_scale=scorer.scale,
        loss_fn=scorer.loss_fn,
        last_layer=scorer.last_layer,
        score_fn=scorer.score_fn,
        track_grad_error=False,
    )


# ---------------------------------------------------------------------------------------------- command line

_EPILOG = """\
Extra arguments are passed to LightningCLI after the configuration files, for example
--trainer.precision=bf16-mixed or --data.init_args.batch_size=256. A SelectiveBackprop
callback in the configuration lends its scoring options (score_mode, score_precision,
score_scale) to the scoring pass and to the selective steps; its selector and keep are not
used (selection is by loss, topk: it measures the cost of a scored step, not the choice of examples).
Validation, checkpoints, progress bars and logging are off during the fits; the configuration's
other callbacks run as configured, except early stopping and the tuners (batch size and learning-rate
finders), which would change what is timed.

Exit status: 0 after a profile, 2 for bad input, 1 for a dataset missing from disk or batches the
scoring pass cannot read.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``lightning-sbp profile``."""
    parser = argparse.ArgumentParser(
        prog="lightning-sbp profile",
        description="Time a full step, the scoring pass, steps on k examples and real selective steps of your "
        "own model and data through the Trainer; print the speedup the cost model predicts next to the "
        "measured one, the break-even keep, the fixed overhead and a verdict.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        metavar="CFG.yaml",
        help="LightningCLI configuration (model, data, trainer); repeat to merge several",
    )
    parser.add_argument(
        "--keep",
        nargs="+",
        type=float,
        metavar="F",
        help=f"keep fractions in (0, 1) (default {' '.join(map(str, DEFAULT_KEEPS))})",
    )
    parser.add_argument("--steps", type=int, default=10, metavar="N", help="timed steps per fit (default 10)")
    parser.add_argument("--rounds", type=int, default=3, metavar="R", help="rounds of fits (default 3)")
    parser.add_argument("--warmup", type=int, default=3, metavar="W", help="untimed steps per fit (default 3)")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="torch.set_num_threads for the fits (default: torch's own)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the table as JSON: one object per keep")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lightning-sbp profile``.

    Args:
        argv: the arguments after ``profile``; ``None`` reads ``sys.argv[2:]``.

    Returns:
        0 after a profile.

    Raises:
        SystemExit: with status 2 and ``error: ...`` for bad input, 1 for a dataset missing from disk or
            batches the scoring pass cannot read.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(sys.argv[2:] if argv is None else list(argv))
    keeps = sorted(set(args.keep or DEFAULT_KEEPS))
    bad = [keep for keep in keeps if not 0.0 < keep < 1.0]
    if bad:
        parser.error(f"--keep: keep fractions must be in (0, 1), got {', '.join(map(str, bad))}")
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {args.warmup}")
    missing = [config for config in args.config if not Path(config).is_file()]
    if missing:
        parser.error(f"--config: no such file: {', '.join(missing)}")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    total = 1 + args.rounds * (2 + 2 * len(keeps))
    before = _load_average()
    with _quiet(), _progress(total, not args.no_progress) as advance:
        try:
            setup = _build(args.config, extra, args.warmup, args.steps)
        except (ValueError, TypeError) as err:
            parser.error(" ".join(str(err).split()))
        try:
            rounds, batch, ks = measure(setup, keeps, args.rounds, args.warmup, args.steps, advance)
        except (DatasetNotFoundError, ScoringError) as err:
            sys.stderr.write(f"error: {err}\n")
            raise SystemExit(1) from None
    loads = [load for load in (before, _load_average()) if load is not None]
    profile = dataclasses.replace(
        analyse(rounds, batch, ks),
        load_average=(min(loads), max(loads)) if loads else None,
        cpus=os.cpu_count(),
        threads=torch.get_num_threads(),
    )
    print(format_report(profile), end="")
    if args.json:
        Path(args.json).write_text(json.dumps(json_rows(profile), indent=2) + "\n")
        print(f"json: {args.json}")
    return 0


def _load_average() -> float | None:
    """The 1-minute load average of the machine (``None`` where the system has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    """A progress bar over the fits on stderr (plain lines without tqdm), or nothing."""
    if not enabled:
        yield lambda text: None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        done = [0]

        def line(text: str) -> None:
            done[0] += 1
            sys.stderr.write(f"profile {done[0]}/{total}: {text}\n")

        yield line
        return
    bar = tqdm(total=total, desc="profile", unit="fit", file=sys.stderr, dynamic_ncols=True)

    def advance(text: str) -> None:
        bar.set_postfix_str(text)
        bar.update(1)

    try:
        yield advance
    finally:
        bar.close()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Info messages and known harmless warnings off; ``sys.argv`` hidden from LightningCLI."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings():
            for pattern in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        logging.disable(logging.NOTSET)
        sys.argv = argv


if __name__ == "__main__":
    sys.exit(main())
