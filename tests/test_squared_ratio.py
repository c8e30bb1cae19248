from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import SmallCNN, blobs, loader, trainer

from lightning_sbp import SelectiveBackprop
from lightning_sbp.compare.squared_ratio import RatioSums, SquaredRatioLog, squared_ratio
from lightning_sbp.functional import random_subset_gradient_error, subset_gradient_error


def test_the_squared_ratio_of_random_subsets_has_mean_one_and_the_plain_ratio_does_not() -> None:
    generator = torch.Generator().manual_seed(0)
    n, k, draws = 32, 8, 2000
    squared, plain = [], []
    for batch in range(4):
        gradients = torch.randn(n, 6, generator=generator, dtype=torch.float64) + 0.3 * batch
        gram = gradients @ gradients.T
        random_error = random_subset_gradient_error(gram, k)
        for _ in range(draws):
            subset = torch.randperm(n, generator=generator)[:k]
            error = subset_gradient_error(gram, subset)
            squared.append(float(squared_ratio(error, random_error)))
            plain.append(float(error / random_error))
    count = len(squared)

    def mean_and_error(values: list[float]) -> tuple[float, float]:
        mean = sum(values) / count
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (count - 1) / count)

    # Independent draws: the Monte Carlo mean lies within four standard errors of its expectation.
    mean, error = mean_and_error(squared)
    assert abs(mean - 1.0) < 4 * error
    # The ratio of the errors themselves is below 1 for random subsets (Jensen's inequality).
    mean, error = mean_and_error(plain)
    assert mean < 1.0 - 4 * error


def test_ratio_sums_give_the_mean_and_its_standard_error() -> None:
    values = [0.5, 1.5, 1.0, 2.0]
    sums = RatioSums(sum(values), sum(v * v for v in values), len(values)) + RatioSums()
    assert sums.mean == pytest.approx(1.25)
    spread = math.sqrt(sum((v - 1.25) ** 2 for v in values) / 3)
    assert sums.standard_error == pytest.approx(spread / 2)
    assert RatioSums().mean is None and RatioSums(1.0, 1.0, 1).standard_error is None
    assert math.isnan(float(squared_ratio(torch.tensor(0.3), torch.tensor(0.0))))


class _StepValues(pl.Callback):
    """Installs the log before the fit, and keeps each step's logged gradient errors."""

    def __init__(self, sbp: SelectiveBackprop) -> None:
        self.sbp = sbp
        self.log: SquaredRatioLog | None = None
        self.steps: list[tuple[float, float]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log = SquaredRatioLog.following(self.sbp.step_log)
        self.sbp.step_log = self.log

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.steps.append((float(metrics["sbp/grad_error_step"]), float(metrics["sbp/grad_error_random_step"])))


def test_the_log_sums_what_the_callback_measures_and_counts_on() -> None:
    sbp = SelectiveBackprop("random", keep=0.25, grad_error_every=1)
    recorder = _StepValues(sbp)
    fit = trainer(callbacks=[sbp, recorder], log_every_n_steps=1, max_steps=6)
    fit.fit(SmallCNN(), loader(blobs(n=192), batch_size=32))
    assert recorder.log is not None and sbp.step_log is recorder.log
    sums = recorder.log.take()
    expected = [(error / random) ** 2 for error, random in recorder.steps]
    # Both sides square the same float32 values in float64: they agree to float64 rounding.
    assert sums.count == 6 and sums.mean == pytest.approx(sum(expected) / 6, rel=1e-12)
    assert recorder.log.take().count == 0  # the sums restart after each read
    assert sbp.selective_steps == 6 and sbp.examples_backpropagated == 6 * 8  # the counts are still kept
