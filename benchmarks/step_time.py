"""Time of a Selective Backprop step against a full step and against the ideal, in one run.

ResNet-18 with the CIFAR stem on random 3×32×32 batches, on the CPU by default. Every
configuration trains through a real ``Trainer`` on the same model; configurations are
interleaved round by round and each row reports the median step time.

The ideal speedup of a configuration is ``T_full(N) / (T_no_grad_forward(N) + T_full(k))``:
the unavoidable work of scoring every example and then training on ``k`` of them, measured in the
same run. ``ratio`` is the achieved speedup over the ideal one.

Run ``python benchmarks/step_time.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_sbp import SelectiveBackprop, available_selectors
from lightning_sbp.functional import subset_size
from lightning_sbp.recipes import ImageClassifier
from lightning_sbp.scoring import has_batch_norm, scoring_mode


class RandomBatches(Dataset):
    """Ready-made batches of random images, so that no data loading is timed."""

    def __init__(self, batch_size: int, image_size: int, channels: int, classes: int, count: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.batches = [
            (
                torch.randn(batch_size, channels, image_size, image_size, generator=generator),
                torch.randint(classes, (batch_size,), generator=generator),
            )
            for _ in range(count)
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batches[index]


class StepTimer(pl.Callback):
    """Wall-clock time of each training batch, from batch start to the end of the optimiser step."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._started = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._started)


@dataclass
class Row:
    """One configuration: a label, the batch size it trains on and the callback it adds."""

    label: str
    batch_size: int
    keep: float | None = None
    callback: Callable[[], pl.Callback] | None = None


def time_fit(model: pl.LightningModule, row: Row, data: dict[int, RandomBatches], steps: int) -> list[float]:
    """Per-step times of ``steps`` steps, the first (warm-up) dropped."""
    timer = StepTimer()
    callbacks = [timer] + ([row.callback()] if row.callback else [])
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(data[row.batch_size], batch_size=None, shuffle=False))
    return timer.times[1:]


def time_no_grad_forward(model: pl.LightningModule, batches: RandomBatches, steps: int) -> list[float]:
    """Times of the scoring forward alone: train mode, no graph, running statistics frozen."""
    model.train()
    times = []
    for index in range(steps):
        images, _ = batches[index % len(batches)]
        started = time.perf_counter()
        with scoring_mode(model, "train"):
            model(images)
        times.append(time.perf_counter() - started)
    return times[1:]


def build_rows(batch: int, keeps: list[float], selectors: list[str], minimum: int) -> tuple[list[Row], dict[float, int]]:
    """The full step, the full steps on k examples, and one row per selector, keep and tracking switch."""
    rows = [Row("full", batch)]
    sizes = {keep: subset_size(keep, batch, minimum) for keep in keeps}
    rows += [Row(f"full k={k}", k) for k in sorted(set(sizes.values()))]
    for keep in keeps:
        for name in selectors:
            for tracking in (False, True):

                def make(name: str = name, keep: float = keep, tracking: bool = tracking) -> pl.Callback:
                    return SelectiveBackprop(name, keep=keep, track_grad_error=tracking)

                label = f"{name} keep={keep}" + (" +grad_error" if tracking else "")
                rows.append(Row(label, batch, keep, make))
    return rows, sizes


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--selectors", nargs="+", default=available_selectors())
    parser.add_argument("--steps", type=int, default=4, help="steps per configuration and round (first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    pl.seed_everything(0, verbose=False)
    model = ImageClassifier(backbone=args.backbone, num_classes=10, schedule="constant", lr=0.01)
    rows, sizes = build_rows(args.batch_size, args.keeps, args.selectors, 2 if has_batch_norm(model) else 1)
    data = {
        size: RandomBatches(size, args.image_size, 3, 10, count=args.steps)
        for size in {row.batch_size for row in rows}
    }
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(args.rounds):
        times["no-grad forward"] += time_no_grad_forward(model, data[args.batch_size], args.steps)
        for row in rows:
            times[row.label] += time_fit(model, row, data, args.steps)
    median = {label: statistics.median(values) for label, values in times.items()}

    full = median["full"]
    print(f"\n{args.backbone}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds * (args.steps - 1)} steps per row\n")
    print(f"full step: {1e3 * full:.1f} ms; no-grad forward: {1e3 * median['no-grad forward']:.1f} ms\n")
    print("| configuration | step (ms) | speedup | ideal speedup | ratio |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        if row.keep is None:
            continue
        step = median[row.label]
        ideal = full / (median["no-grad forward"] + median[f"full k={sizes[row.keep]}"])
        speedup = full / step
        print(f"| {row.label} | {1e3 * step:.1f} | {speedup:.2f}× | {ideal:.2f}× | {speedup / ideal:.2f} |")
    print("\n| selector, keep | cost of grad-error tracking |")
    print("|---|---:|")
    for row in rows:
        if row.keep is not None and row.label.endswith("+grad_error"):
            base = row.label.removesuffix(" +grad_error")
            print(f"| {base} | {100 * (median[row.label] / median[base] - 1):+.1f}% |")


if __name__ == "__main__":
    main()
