"""What a cheaper scoring pass costs in selection quality, on the embedded digits.

For ``omp`` and ``gradnorm``, trains the digits recipe with full-precision scoring and with
each cheaper scoring option, and reports the mean over training of ``sbp/grad_error_ratio``
(the selected subset's last-layer gradient error over a random subset's, always measured
against the full batch scored at full precision). Runs with the same seed share their initial
weights and data order; the relative change is against full-precision scoring.

Run ``python benchmarks/scoring_quality.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_sbp import SelectiveBackprop
from lightning_sbp.recipes import DigitsDataModule, ImageClassifier

OPTIONS: dict[str, dict[str, Any]] = {
    "full precision": {},
    "bf16": {"score_precision": "bf16"},
    "score_scale 0.5": {"score_scale": 0.5},
}


class RatioRecorder(pl.Callback):
    """Collects the per-step gradient-error ratio."""

    def __init__(self) -> None:
        self.ratios: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        value = trainer.callback_metrics.get("sbp/grad_error_ratio_step")
        if value is not None:
            self.ratios.append(float(value))


def mean_ratio(selector: str, options: dict[str, Any], seed: int, epochs: int, image_size: int) -> float:
    """The mean per-step ``sbp/grad_error_ratio`` of one digits fit."""
    pl.seed_everything(seed, verbose=False)
    model = ImageClassifier(backbone="digits_cnn", num_classes=10, in_channels=1, lr=0.05)
    recorder = RatioRecorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[SelectiveBackprop(selector, keep=0.25, seed=seed, **options), recorder],
    )
    trainer.fit(model, datamodule=DigitsDataModule(image_size=image_size, batch_size=64))
    return statistics.fmean(recorder.ratios)


def main(argv: list[str] | None = None) -> None:
    """Run every selector and option, print a Markdown table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--selectors", nargs="+", default=["omp", "gradnorm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=16, help="digits upsampled to this size (score_scale)")
    args = parser.parse_args(argv)

    print(
        f"\ndigits at {args.image_size}×{args.image_size}, keep 0.25, {args.epochs} epochs, seeds {args.seeds}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| selector | scoring | mean grad_error_ratio | change vs full precision |")
    print("|---|---|---:|---:|")
    for selector in args.selectors:
        reference = None
        for label, options in OPTIONS.items():
            ratio = statistics.fmean(
                mean_ratio(selector, options, seed, args.epochs, args.image_size) for seed in args.seeds
            )
            reference = ratio if reference is None else reference
            print(f"| {selector} | {label} | {ratio:.3f} | {100 * (ratio / reference - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
