"""The selection step as a unit: what it charges to measurement, how weights reach the module, when it logs."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import SmallCNN, blobs, loader, trainer
from torch import Tensor

from lightning_sbp import SelectiveBackprop
from lightning_sbp.mixin import subset_weights
from lightning_sbp.tracking import loggers_write_this_step

# A scoring forward of SlowScoring sleeps this long: far above the millisecond a tiny CNN step takes, so
# the time a run charges to measurement tells, within a wide margin, which passes it counted.
SCORING_SLEEP = 0.05


class SlowScoring(SmallCNN):
    """A CNN whose forward without a graph (a scoring pass) takes at least SCORING_SLEEP seconds."""

    def forward(self, x: Tensor) -> Tensor:
        if not torch.is_grad_enabled():
            time.sleep(SCORING_SLEEP)
        return super().forward(x)


def _measurement_seconds(selector: str, **options: Any) -> tuple[float, SlowScoring]:
    model = SlowScoring()
    sbp = SelectiveBackprop(selector, keep=0.5, grad_error_every=1, **options)
    trainer(callbacks=[sbp], max_steps=4).fit(model, loader(blobs(64), 16))
    return sbp.measurement_seconds, model


def test_a_selector_that_reads_no_score_is_charged_nothing_for_the_pass_it_runs_only_to_measure() -> None:
    measured, model = _measurement_seconds("random")
    passes = len(model.scoring_shapes)
    assert passes == 4, "random scores only to measure, once per step"
    assert measured >= passes * SCORING_SLEEP


def test_a_selector_that_reads_scores_pays_its_own_scoring_pass() -> None:
    measured, model = _measurement_seconds("topk")
    assert len(model.scoring_shapes) == 4, "one scoring pass per step, shared by selection and measurement"
    # Only the logit gradients, the Gram matrix and the metrics are measurement: well below one pass.
    assert measured < SCORING_SLEEP


def test_cheap_scores_charge_the_full_cost_rescore_to_measurement() -> None:
    measured, model = _measurement_seconds("topk", score_scale=0.5)
    assert len(model.scoring_shapes) == 8, "a downscaled pass for selection, a full one to measure"
    assert measured >= 4 * SCORING_SLEEP


def test_no_tracking_no_measurement_time() -> None:
    measured, model = _measurement_seconds("random", track_grad_error=False)
    assert measured == 0.0 and model.scoring_shapes == []


def test_weights_reach_sbp_reduce_through_the_step_and_leave_nothing_on_the_module() -> None:
    losses = torch.tensor([1.0, 2.0, 4.0])
    weights = torch.tensor([0.5, 1.0, 2.0])
    module = SmallCNN()
    before = set(vars(module))
    with subset_weights(weights) as subset:
        assert not subset.applied
        reduced = module.sbp_reduce(losses)
        assert subset.applied
    # The same float32 product and mean as the step's, on the same values: equal, not close.
    assert torch.equal(reduced, (weights * losses).mean())
    assert torch.equal(module.sbp_reduce(losses), losses.mean()), "outside a step: plain mean"
    assert set(vars(module)) == before


def test_sbp_reduce_refuses_losses_that_are_not_one_per_selected_example() -> None:
    with (
        subset_weights(torch.ones(4)),
        pytest.raises(ValueError, match=r"one loss per selected example, shape \(4,\), got shape \(4, 3\)"),
    ):
        SmallCNN().sbp_reduce(torch.ones(4, 3))


class LoggingProbe(pl.Callback):
    """Compares, inside every training step, the library's answer with Lightning's own (a private attribute)."""

    def __init__(self) -> None:
        self.answers: list[tuple[bool, bool]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.answers.append((loggers_write_this_step(trainer), trainer._logger_connector.should_update_logs))


@pytest.mark.parametrize(
    "options",
    [
        {"log_every_n_steps": 3},
        {"log_every_n_steps": 1},
        {"log_every_n_steps": 2, "accumulate_grad_batches": 3},
        {"log_every_n_steps": 0},
        {"log_every_n_steps": 4, "max_steps": 6},
    ],
)
def test_the_logging_rule_agrees_with_lightning_on_every_step(options: dict[str, Any]) -> None:
    probe = LoggingProbe()
    run = {"max_epochs": 2, **options}
    trainer(callbacks=[probe], **run).fit(SmallCNN(), loader(blobs(96), 8))
    ours, lightnings = zip(*probe.answers, strict=True)
    assert list(ours) == list(lightnings)
    assert len(ours) >= 6
