from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from ddp_models import random_gram, reduce_worker, run_two_processes
from dispatch import DispatchRecorder
from helpers import SmallCNN, blobs, loader, trainer
from lightning.pytorch.loggers import CSVLogger
from tolerances import assert_within, gamma, mean_tolerance, replay_tolerance

from lightning_sbp import SelectiveBackprop
from lightning_sbp.functional.grad_error import (
    random_subset_gradient_error,
    relative_gradient_error,
    subset_gradient_error,
)
from lightning_sbp.metrics import (
    ExactGradientError,
    GradientApproximationError,
    GradientErrorRatio,
    GradientErrorSquaredRatio,
    RandomSubsetGradientError,
)
from lightning_sbp.tracking import subset_and_full_gradients

# The metrics run the functions they wrap on the same float64 values, then average a few batch values of one
# sign: they may differ from a recomputation by a handful of roundings of the result, γ_8 relative to it.
AVERAGE = gamma(8, torch.float64)


def test_metrics_average_their_per_batch_functional_values() -> None:
    grams = [random_gram(8, seed) for seed in range(3)]
    indices, weights = torch.tensor([0, 3, 5]), torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)
    proxy, rand, ratio = GradientApproximationError(), RandomSubsetGradientError(), GradientErrorRatio()
    for gram in grams:
        batch_value = proxy(gram, indices, weights)
        expected = subset_gradient_error(gram, indices, weights).double()
        assert_within(batch_value, expected, AVERAGE * expected, "batch value")
        ratio(batch_value, rand(gram, 3))
    errors = torch.stack([subset_gradient_error(g, indices, weights) for g in grams]).double()
    randoms = torch.stack([random_subset_gradient_error(g, 3) for g in grams]).double()
    for metric, expected in [(proxy, errors.mean()), (rand, randoms.mean()), (ratio, (errors / randoms).mean())]:
        assert_within(metric.compute(), expected, AVERAGE * expected, type(metric).__name__)
    assert proxy.higher_is_better is False


def test_relative_gradient_error_treats_parameters_as_one_vector() -> None:
    reference = [torch.tensor([3.0, 0.0]), torch.tensor([[4.0]])]
    approximation = [torch.tensor([3.0, 1.0]), torch.tensor([[4.0]])]
    # sqrt(1) / sqrt(9 + 16) = 1/5: integers until the final division, which rounds once.
    assert_within(
        relative_gradient_error(approximation, reference), torch.tensor(0.2, dtype=torch.float64), AVERAGE * 0.2
    )
    zero = [torch.zeros(2)]
    assert relative_gradient_error(zero, zero).item() == 0.0
    metric = ExactGradientError()
    metric(approximation, reference)
    metric(reference, reference)
    assert_within(metric.compute(), torch.tensor(0.1, dtype=torch.float64), AVERAGE * 0.1, "the mean of 0.2 and 0")


def test_degenerate_batches_are_skipped_without_host_syncs() -> None:
    gram = random_gram(8, 0)
    indices, weights = torch.tensor([0, 3, 5]), torch.ones(3, dtype=torch.float64)
    zero = torch.zeros(8, 8, dtype=torch.float64)  # every loss non-finite: every gradient zeroed
    proxy, rand, ratio = GradientApproximationError(), RandomSubsetGradientError(), GradientErrorRatio()
    exact = ExactGradientError()
    good = [torch.tensor([3.0, 1.0])], [torch.tensor([3.0, 0.0])]
    with DispatchRecorder() as recorder:
        error, random_error = proxy(gram, indices, weights), rand(gram, 3)
        ratio(error, random_error)
        exact(*good)
        degenerate = [proxy(zero, indices, weights), rand(zero, 3)]
        degenerate.append(ratio(*degenerate))
        degenerate.append(exact([torch.tensor([1.0, 0.0])], [torch.zeros(2)]))
        degenerate.append(exact([torch.tensor([math.nan])], [torch.tensor([math.nan])]))
    assert recorder.host_syncs() == {}
    # The step value of a degenerate batch is NaN, not 0; the epoch value ignores it.
    assert all(value.isnan() for value in degenerate)
    for metric, expected in [
        (proxy, subset_gradient_error(gram, indices, weights).double()),
        (rand, random_subset_gradient_error(gram, 3).double()),
        (ratio, (error / random_error).double()),
        (exact, torch.tensor(1 / 3, dtype=torch.float64)),  # ‖[0, 1]‖ / ‖[3, 0]‖
    ]:
        assert_within(metric.compute(), expected, AVERAGE * expected, type(metric).__name__)
    # An epoch of degenerate batches alone has nothing to report.
    alone = GradientErrorRatio()
    alone(torch.tensor(0.0), torch.tensor(0.0))
    assert alone.compute().isnan()


def test_metric_reduces_across_two_processes(tmp_path: Path) -> None:
    run_two_processes(reduce_worker, str(tmp_path))
    expected = (
        torch.stack(
            [
                subset_gradient_error(random_gram(6, s), torch.tensor([1, 2]), torch.ones(2, dtype=torch.float64))
                for s in range(3)
            ]
        )
        .double()
        .mean()
    )
    for rank in range(2):
        # Summed across ranks in another order than the stack above.
        assert_within(torch.load(tmp_path / f"rank{rank}.pt"), expected, AVERAGE * expected, f"rank {rank}")


def test_exact_gradients_match_explicit_backward_and_touch_nothing() -> None:
    torch.manual_seed(0)
    model = SmallCNN(dropout=0.0)
    model.train()
    x, y = blobs(16).tensors
    batch, indices = (x, y), torch.tensor([1, 4, 7, 9])
    weights = torch.tensor([0.5, 1.0, 1.5, 1.0])
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    approx, reference = subset_and_full_gradients(
        model, model.sbp_forward, model.sbp_loss, batch, (x[indices], y[indices]), weights
    )

    for p in model.parameters():
        assert torch.all(p.grad == 7.0)
    for name, value in model.named_buffers():
        assert torch.equal(value, buffers[name]), name
    explicit = copy.deepcopy(model)
    explicit.body[1].track_running_stats = False
    for params_grads, inputs, targets, w in [(reference, x, y, None), (approx, x[indices], y[indices], weights)]:
        explicit.zero_grad()
        losses = torch.nn.functional.cross_entropy(explicit(inputs), targets, reduction="none")
        (losses.mean() if w is None else (w * losses).mean()).backward()
        for mine, param in zip(params_grads, explicit.parameters(), strict=True):
            assert param.grad is not None
            # The same float32 graph; a weight's gradient sums over 16 images of 8 × 8 positions and 9 taps.
            assert_within(mine, param.grad, replay_tolerance(param.grad, 16 * 64 * 9))


def test_callback_logs_step_and_epoch_errors_and_the_exact_error(tmp_path: Path) -> None:
    csv = CSVLogger(tmp_path)
    sbp = SelectiveBackprop("topk", keep=0.25, exact_grad_error_every=2)
    trainer(callbacks=[sbp], logger=csv, log_every_n_steps=1, max_epochs=2).fit(SmallCNN(), loader(blobs(64), 16))
    lines = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for name in ("grad_error", "grad_error_random", "grad_error_ratio", "grad_error_sq_ratio", "grad_error_exact"):
        assert f"sbp/{name}_step" in header and f"sbp/{name}_epoch" in header
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    steps = [r for r in rows if r["sbp/grad_error_step"]]
    assert len(steps) == 8
    ratios = [float(r["sbp/grad_error_ratio_step"]) for r in steps]
    quotients = [float(r["sbp/grad_error_step"]) / float(r["sbp/grad_error_random_step"]) for r in steps]
    # The logged values are float32 and the CSV keeps them to 7 significant digits or more: a few float32 ulps.
    assert ratios == pytest.approx(quotients, rel=gamma(8, torch.float32))
    squared = [float(r["sbp/grad_error_sq_ratio_step"]) for r in steps]
    # Squaring doubles the relative error of the quotient.
    assert squared == pytest.approx([q**2 for q in quotients], rel=2 * gamma(8, torch.float32))
    # measured on every other selective step; Lightning repeats a step value until it is logged again
    exact = [float(r["sbp/grad_error_exact_step"]) for r in steps]
    assert exact[0::2] == exact[1::2] and len(set(exact)) == 4
    epochs = [r for r in rows if r["sbp/grad_error_epoch"]]
    assert len(epochs) == 2
    # The mean of four float32 step values: a few float32 roundings of the result.
    assert float(epochs[0]["sbp/grad_error_epoch"]) == pytest.approx(
        sum(float(r["sbp/grad_error_step"]) for r in steps[:4]) / 4, rel=gamma(8, torch.float32)
    )


def test_tracking_can_be_switched_off() -> None:
    sbp = SelectiveBackprop("random", keep=0.5, track_grad_error=False)
    t = trainer(callbacks=[sbp], max_steps=2, log_every_n_steps=1)
    t.fit(SmallCNN(), loader(blobs(64), 16))
    assert not any(key.startswith("sbp/grad_error") for key in t.callback_metrics)
    assert "sbp/k" in t.callback_metrics


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"track_grad_error": 1}, "True or False"),
        ({"exact_grad_error_every": -1}, "positive integer"),
        ({"exact_grad_error_every": 1.5}, "positive integer"),
    ],
)
def test_bad_tracking_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SelectiveBackprop(**kwargs)


def test_the_squared_ratio_of_random_subsets_averages_exactly_one() -> None:
    # For uniformly random subsets E[e² | batch] is random's closed form r², so e² / r² has mean 1 on every
    # batch; the plain ratio e / r averages below 1 (Jensen). 4000 random subsets of several batches.
    generator = torch.Generator().manual_seed(0)
    squared, plain = GradientErrorSquaredRatio(), GradientErrorRatio()
    samples = []
    for batch in range(8):
        atoms = torch.randn(24, 6, generator=generator, dtype=torch.float64) + 0.3 * batch
        gram = atoms @ atoms.T
        random_error = random_subset_gradient_error(gram, 6)
        for _ in range(500):
            indices = torch.randperm(24, generator=generator)[:6]
            error = subset_gradient_error(gram, indices, torch.ones(6, dtype=torch.float64))
            samples.append(float((error / random_error) ** 2))
            squared.update(error, random_error)
            plain.update(error, random_error)
    values = torch.tensor(samples, dtype=torch.float64)
    assert float(squared.compute()) == pytest.approx(float(values.mean()), rel=gamma(len(samples), torch.float64))
    assert abs(float(squared.compute()) - 1.0) <= mean_tolerance(values)
    assert float(plain.compute()) < 1.0 - mean_tolerance(values.sqrt())
