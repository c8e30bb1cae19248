"""Time of a Selective Backprop step against a full step and against the ideal, in one run.

ResNet-18 with the CIFAR stem on random 3×32×32 batches of 128, on the CPU (``--accelerator gpu
--devices 1`` for one GPU, timed with a device synchronisation before every clock reading). Every
configuration trains through a real ``Trainer`` on the same model; configurations are
interleaved round by round and each row reports the median step time.

The ideal speedup of a configuration is ``T_full(N) / (T_no_grad_forward(N) + T_full(k))``:
the unavoidable work of scoring every example at full precision and then training on ``k`` of
them, measured in the same run. ``ratio`` is the achieved speedup over the ideal one; a cheaper
scoring pass (bf16, downscaled inputs, stale scores) can take it above 1. Random selection with
tracking off reads no score and runs no scoring pass (the ``no scoring pass`` row): its ideal is
``T_full(N) / T_full(k)``.

Each selector runs with gradient-error tracking off, at its default (``+grad_error``: the timed steps
do not measure, since only the dropped first step of a fit does) and measuring on every step
(``+grad_error every step``); the tracking table compares them within each round and amortises a
measuring step over the default ``grad_error_every``. The cheaper scoring rows (``score bf16``,
``score_scale 0.5``, ``stale scores``: cache hits on the second epoch) are set against
full-precision scoring in a last table, by the time a step spends beyond a full step on ``k``.
``omp ... fused`` selects with ``OMPSelector(fused=True)``.

The ``peer`` row trains the same model with the loss-based selection that Composer documents for
its ``select_using_loss``: a forward over the whole batch without a graph in train mode, loss
percentiles raised to ``1/keep - 1``, ``k`` indices drawn on the host with NumPy, then a training
step on the kept rows. It does the scoring work of the ``loss`` rows.

Run ``python benchmarks/step_time.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
import tqdm
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_sbp import SelectiveBackprop, available_selectors, get_selector
from lightning_sbp.functional import subset_size
from lightning_sbp.recipes import ImageClassifier
from lightning_sbp.scoring import cpu_has_fast_kernels, has_batch_norm, scoring_mode
from lightning_sbp.selectors.omp import OMPSelector


class RandomImages(Dataset):
    """Random images that carry their index, as the recipes' datasets do."""

    def __init__(self, count: int, image_size: int, classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(count, 3, image_size, image_size, generator=generator)
        self.targets = torch.randint(classes, (count,), generator=generator)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        return self.images[index], self.targets[index], index


class PeerLossSelection(ImageClassifier):
    """The loss-based selection step as Composer documents it, written out for comparison."""

    def __init__(self, keep: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep = keep

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, targets = batch[0], batch[1]
        size = images.shape[0]
        with torch.no_grad():
            losses = F.cross_entropy(self(images), targets, reduction="none")
            order = torch.argsort(losses)
            percentiles = np.arange(0.5, size, 1) / size
            probabilities = percentiles ** (1.0 / self.keep - 1.0)
            chosen = np.random.choice(size, int(self.keep * size), replace=False, p=probabilities / probabilities.sum())
            kept = order[chosen]
        loss = F.cross_entropy(self(images[kept]), targets[kept])
        self.log("train/loss", loss)
        return loss


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that host clocks measure it (a no-op on the CPU)."""
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def machine(device: torch.device) -> str:
    """What the numbers were taken on: CPU model and cores, library versions, threads, accelerator."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
        cpu = names[0] if names else cpu
    accelerator = "none (CPU only)"
    if device.type != "cpu":
        accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"CPU {cpu} ({os.cpu_count()} logical cores, load average {load}); torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; lightning {pl.__version__}; accelerator {accelerator}"
    )


class StepTimer(pl.Callback):
    """Wall-clock time of each training batch, from batch start to the end of the optimiser step."""

    def __init__(self, first_epoch: int) -> None:
        self.first_epoch = first_epoch
        self.times: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        if trainer.current_epoch >= self.first_epoch:
            self.times.append(time.perf_counter() - self._started)


@dataclass
class Row:
    """One configuration: what it trains on, with which callback, and which of its steps are timed."""

    label: str
    batch_size: int
    keep: float | None = None
    callback: Callable[[], pl.Callback] | None = None
    model: str = "shared"
    epochs: int = 1
    timed_from_epoch: int = 0
    scored: bool = True
    untracked: str | None = None
    measuring: str | None = None


def sbp(selector: str, keep: float, **options: Any) -> Callable[[], pl.Callback]:
    """A factory of the callback, so that every fit gets a fresh one."""
    return lambda: SelectiveBackprop(selector, keep=keep, **options)


def tracking_rows(label: str, batch: int, keep: float, selector: str, **options: Any) -> list[Row]:
    """A configuration with tracking off, at its default, and measuring on every step.

    With the default ``grad_error_every`` only the first selective step of a fit measures, and the
    first step is the dropped warm-up: the default row times the steps that do not measure, the
    ``every step`` row (``grad_error_every=1``) the steps that do.
    """
    scored = get_selector(selector).needs_scores
    untracked = label + ("" if scored else " no scoring pass")
    epochs, timed_from = (2, 1) if options.get("stale_epochs") else (1, 0)
    common = {"batch_size": batch, "keep": keep, "epochs": epochs, "timed_from_epoch": timed_from}
    return [
        Row(untracked, callback=sbp(selector, keep, track_grad_error=False, **options), scored=scored, **common),
        Row(
            f"{label} +grad_error",
            callback=sbp(selector, keep, **options),
            scored=scored,
            untracked=untracked,
            measuring=f"{label} +grad_error every step",
            **common,
        ),
        Row(f"{label} +grad_error every step", callback=sbp(selector, keep, grad_error_every=1, **options), **common),
    ]


def build_rows(batch: int, keeps: list[float], selectors: list[str], minimum: int, extras: bool) -> list[Row]:
    """The full steps, each selector and keep with three tracking settings, and the cheaper scoring rows."""
    rows = [Row("full", batch)]
    rows += [Row(f"full k={k}", k) for k in sorted({subset_size(keep, batch, minimum) for keep in keeps})]
    for keep in keeps:
        for name in selectors:
            rows += tracking_rows(f"{name} keep={keep}", batch, keep, name)
    if extras:
        keep = min(keeps)
        quiet = {"track_grad_error": False}
        rows += [
            Row(f"loss keep={keep} score bf16", batch, keep, sbp("loss", keep, score_precision="bf16", **quiet)),
            Row(f"loss keep={keep} score_scale 0.5", batch, keep, sbp("loss", keep, score_scale=0.5, **quiet)),
            *tracking_rows(f"loss keep={keep} stale scores (cache hits)", batch, keep, "loss", stale_epochs=1),
            Row(
                f"omp keep={keep} fused",
                batch,
                keep,
                lambda: SelectiveBackprop(OMPSelector(fused=True), keep=keep, track_grad_error=False),
            ),
            Row(f"peer loss selection keep={keep}", batch, keep, model="peer"),
        ]
    return rows


def select_rows(rows: list[Row], pattern: str | None) -> list[Row]:
    """The rows whose label matches ``pattern``, with every row their tables compare them to."""
    if pattern is None:
        return rows
    wanted = {row.label for row in rows if re.search(pattern, row.label)}
    if not wanted - {row.label for row in rows if row.keep is None}:
        raise SystemExit(f"--only {pattern!r} matches no selective configuration")
    for row in rows:
        if row.label in wanted:
            wanted |= {label for label in (row.untracked, row.measuring) if label is not None}
    # The references: the full steps, and the fp32 loss row the cheaper scoring rows are set against.
    references = {row.label for row in rows if row.keep is None}
    references.add(f"loss keep={min(row.keep for row in rows if row.keep is not None)}")
    return [row for row in rows if row.label in wanted | references]


def time_fit(
    model: pl.LightningModule, row: Row, data: DataLoader, accelerator: str, devices: str
) -> tuple[list[float], torch.device]:
    """Per-step times of the row's timed epochs, the first step of each fit (warm-up) dropped, and the device."""
    timer = StepTimer(row.timed_from_epoch)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        max_epochs=row.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer] + ([row.callback()] if row.callback else []),
        num_sanity_val_steps=0,
    )
    if trainer.num_devices != 1:
        raise SystemExit(f"--devices {devices} selects {trainer.num_devices} devices; time one, e.g. --devices 1")
    trainer.fit(model, data)
    return timer.times[1:], trainer.strategy.root_device


def time_no_grad_forward(model: pl.LightningModule, data: DataLoader, device: torch.device) -> list[float]:
    """Times of the scoring forward alone: train mode, no graph, running statistics frozen."""
    model.to(device).train()
    times = []
    for images, _, _ in data:
        images = images.to(device)
        synchronize(device)
        started = time.perf_counter()
        with scoring_mode(model, "train"):
            model(images)
        synchronize(device)
        times.append(time.perf_counter() - started)
    return times[1:]


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print Markdown tables."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18", help="backbone of the ImageClassifier recipe")
    parser.add_argument("--batch-size", type=int, default=128, help="N, the examples scored per step")
    parser.add_argument("--image-size", type=int, default=32, help="side of the random square images")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25, 0.5], help="keep fractions to time")
    parser.add_argument("--selectors", nargs="+", default=available_selectors(), help="registered selectors to time")
    parser.add_argument("--steps", type=int, default=4, help="steps per configuration, epoch and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; every configuration runs once per round")
    parser.add_argument(
        "--only",
        metavar="REGEX",
        help="time only the configurations whose label matches, with the rows they are compared to "
        "(e.g. 'stale|omp keep=0.25')",
    )
    parser.add_argument("--no-extras", action="store_true", help="skip the cheaper-scoring and peer rows")
    parser.add_argument("--accelerator", choices=["cpu", "gpu", "cuda", "mps"], default="cpu", help="Lightning's")
    parser.add_argument(
        "--devices", default="1", help="Lightning's devices, selecting one: '1' (the first), '3,' (device 3)"
    )
    args = parser.parse_args(argv)
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        parser.error(f"--accelerator {args.accelerator} needs a CUDA device, and torch sees none")

    pl.seed_everything(0, verbose=False)
    options = {"backbone": args.backbone, "num_classes": 10, "schedule": "constant", "lr": 0.01}
    models: dict[str, pl.LightningModule] = {"shared": ImageClassifier(**options)}
    minimum = 2 if has_batch_norm(models["shared"]) else 1
    rows = select_rows(build_rows(args.batch_size, args.keeps, args.selectors, minimum, not args.no_extras), args.only)
    if args.only is None and args.accelerator == "cpu" and cpu_has_fast_kernels(torch.bfloat16) is False:
        # About a minute a step on such a CPU: only when asked for by name.
        rows = [row for row in rows if "bf16" not in row.label]
        print("The bf16 row is left out: this CPU has no fast bfloat16 kernels. --only bf16 times it anyway.")
    models["peer"] = PeerLossSelection(min(args.keeps), **options)
    models["peer"].load_state_dict(models["shared"].state_dict())
    images = RandomImages(args.batch_size * args.steps, args.image_size, 10)
    loaders = {size: DataLoader(images, batch_size=size) for size in {row.batch_size for row in rows}}
    # full steps on k examples run as many steps as the others
    for row in rows:
        if row.keep is None and row.batch_size != args.batch_size:
            loaders[row.batch_size] = DataLoader(
                torch.utils.data.Subset(images, range(row.batch_size * args.steps)), batch_size=row.batch_size
            )

    # warm-up: allocator, kernels, caches; and the device the trainer picked
    _, device = time_fit(models["shared"], rows[0], loaders[args.batch_size], args.accelerator, args.devices)
    rounds: list[dict[str, float]] = []
    for _ in tqdm.trange(args.rounds, desc="rounds", disable=None):
        times = {"no-grad forward": time_no_grad_forward(models["shared"], loaders[args.batch_size], device)}
        for row in rows:
            model, data = models[row.model], loaders[row.batch_size]
            times[row.label] = time_fit(model, row, data, args.accelerator, args.devices)[0]
        rounds.append({label: statistics.median(values) for label, values in times.items()})
    median = {label: statistics.median(each[label] for each in rounds) for label in rounds[0]}

    print(f"\n{machine(device)}")
    print(f"{args.backbone}, batch {args.batch_size}, medians over {args.rounds} rounds of {args.steps} steps\n")
    print_tables(rows, median, rounds, args.batch_size, minimum)


def paired(rounds: list[dict[str, float]], label: str, reference: str) -> str:
    """The relative difference of two rows, taken within each round: median and range over the rounds."""
    changes = sorted(100 * (each[label] / each[reference] - 1) for each in rounds)
    return f"{statistics.median(changes):+.1f}% ({changes[0]:+.1f} to {changes[-1]:+.1f})"


def print_tables(
    rows: list[Row], median: dict[str, float], rounds: list[dict[str, float]], batch: int, minimum: int
) -> None:
    """The step times against the ideal, the cost of tracking, and the cost of the cheaper scoring passes.

    ``median`` holds each row's median over the rounds of its per-round median step time; the tracking
    table compares rows within each round (``rounds``), so that a slow round slows both sides.
    """
    full, forward = median["full"], median["no-grad forward"]
    on_k = "; ".join(
        f"full step on k={k} {1e3 * median[f'full k={k}']:.1f} ms"
        for k in sorted({subset_size(row.keep, batch, minimum) for row in rows if row.keep is not None})
    )
    print(f"full step {1e3 * full:.1f} ms; no-grad forward {1e3 * forward:.1f} ms; {on_k}\n")
    print("| configuration | step (ms) | speedup | ideal speedup | ratio |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        if row.keep is None:
            continue
        ideal = full / ((forward if row.scored else 0.0) + median[f"full k={subset_size(row.keep, batch, minimum)}"])
        speedup = full / median[row.label]
        print(
            f"| {row.label} | {1e3 * median[row.label]:.1f} | {speedup:.2f}× | {ideal:.2f}× | {speedup / ideal:.2f} |"
        )

    every = inspect.signature(SelectiveBackprop).parameters["grad_error_every"].default
    print(f"\n| configuration | steps that do not measure | a step that measures | amortised (1 in {every}) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        if row.untracked is None or row.measuring is None:
            continue
        amortised = f"amortised {row.label}"
        for each in rounds:
            each[amortised] = ((every - 1) * each[row.label] + each[row.measuring]) / every
        print(
            f"| {row.untracked} | {paired(rounds, row.label, row.untracked)} "
            f"| {paired(rounds, row.measuring, row.untracked)} | {paired(rounds, amortised, row.untracked)} |"
        )

    # The scoring pass's share of a step: what remains of it once the training step on k is taken away.
    keep = min(row.keep for row in rows if row.keep is not None)
    reference = f"loss keep={keep}"
    cheaper = [
        row
        for row in rows
        if row.label.startswith(f"{reference} ")
        and not row.label.startswith(f"{reference} +grad_error")
        and not row.label.endswith("every step")
    ]
    if reference not in median or not cheaper:
        return
    train = median[f"full k={subset_size(keep, batch, minimum)}"]
    scoring = median[reference] - train
    print(f"\n| scoring at keep={keep} (step minus a full step on k) | scoring (ms) | cheaper than fp32 scoring |")
    print("|---|---:|---:|")
    print(f"| fp32 (`{reference}`) | {1e3 * scoring:.1f} | 1.00× |")
    # Below a tenth of the training step on k, the run-to-run noise of this machine, a cost is not resolved
    # from zero: the ratio is then only bounded from below.
    resolution = 0.1 * train
    for row in cheaper:
        cost = median[row.label] - train
        ratio = f"{scoring / cost:.1f}×" if cost > resolution else f"> {scoring / resolution:.0f}× (not resolved)"
        print(f"| {row.label.removeprefix(reference + ' ')} | {1e3 * cost:.1f} | {ratio} |")


if __name__ == "__main__":
    main()
