"""Selection and measurement are exact under every mixed precision the Trainer runs.

Lightning runs ``training_step`` inside autocast (``bf16-mixed``; ``16-mixed`` through its mixed-precision
plugin, which on a CPU needs ``MixedPrecision("16-mixed", "cpu", scaler)``). CPU autocast lowers matrix
products to the autocast dtype exactly as CUDA's does, so these tests show on the CPU what a GPU run would
compute. Each one records what a real ``Trainer`` step selected or measured, then recomputes it in float64
on the same captured tensors: the scoring forward is the model's and runs in the training precision, but
everything after it must be float32-exact.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import SmallCNN, blobs, loader, trainer
from lightning.pytorch.plugins import MixedPrecision
from tolerances import (
    assert_within,
    gamma,
    gradient_norm_bound_rtol,
    gradnorm_weight_rtol,
    random_squared_error_tolerance,
    squared_error_tolerance,
)
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_sbp import Scores, Selection, SelectiveBackprop
from lightning_sbp.functional import gradient_gram, gradient_norm_bound, subset_gradient_error
from lightning_sbp.functional.grad_error import random_subset_gradient_error, relative_gradient_error
from lightning_sbp.selectors import get_selector
from lightning_sbp.selectors.bounds import DEFAULT_MAX_WEIGHT
from lightning_sbp.selectors.omp import OMPSelector
from lightning_sbp.tracking import subset_and_full_gradients

EPS32 = torch.finfo(torch.float32).eps
BATCH = 16


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)")]


def precisions() -> list[Any]:
    """Trainer options for each mixed precision, on the CPU and (marked ``gpu``) on a CUDA device.

    On the CPU, bf16 by name and float16 through the plugin (a CPU needs the scaler given).
    """
    float16 = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    return [
        pytest.param({"precision": "bf16-mixed"}, torch.bfloat16, id="bf16-mixed"),
        pytest.param({"plugins": [float16]}, torch.float16, id="16-mixed"),
        pytest.param({"accelerator": "gpu", "precision": "bf16-mixed"}, torch.bfloat16, id="gpu-bf16-mixed", marks=GPU),
        pytest.param({"accelerator": "gpu", "precision": "16-mixed"}, torch.float16, id="gpu-16-mixed", marks=GPU),
    ]


def autocast_on() -> bool:
    """Whether autocast is on for the CPU or for CUDA."""
    return torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")


def cpu(value: Any) -> Any:
    """Captured tensors (or a Scores) moved to the CPU, where the float64 references are computed."""
    if isinstance(value, Scores):
        return Scores(
            *(cpu(getattr(value, name)) for name in ("losses", "logits", "logit_grads", "features")), value.bias
        )
    if isinstance(value, Selection):
        return Selection(value.indices.cpu(), value.weights.cpu(), {k: v.cpu() for k, v in value.stats.items()})
    return value.cpu() if isinstance(value, Tensor) else value


def duplicated_blobs(n: int = 64) -> TensorDataset:
    """Every batch of 16 holds 8 distinct examples twice: a Gram matrix of rank at most 8."""
    images, targets = blobs(n // 2, size=8).tensors
    order = torch.arange(n) // 2
    return TensorDataset(images[order], targets[order])


class Recording:
    """Wraps a selector: records the scores it saw, its selection, the autocast state and the generator's state."""

    def __init__(self, name: str, **options: Any) -> None:
        self.inner = get_selector(name, **options)
        self.records: list[dict[str, Any]] = []

    def selector(self) -> Any:
        recording, base = self, type(self.inner)

        class Recorded(base):  # type: ignore[misc, valid-type]
            def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
                state = generator.get_state()
                selection = super().select(scores, k, generator)
                recording.records.append(
                    {
                        "scores": scores,
                        "k": k,
                        "selection": selection,
                        "autocast": autocast_on(),
                        "generator": state,
                    }
                )
                return selection

        recorded = Recorded.__new__(Recorded)
        recorded.__dict__.update(copy.deepcopy(self.inner.__dict__))
        return recorded


def _fit(name: str, options: dict[str, Any], data: TensorDataset, **selector_options: Any) -> Recording:
    recording = Recording(name, **selector_options)
    sbp = SelectiveBackprop(recording.selector(), keep=0.5, track_grad_error=False)
    torch.manual_seed(0)
    trainer(callbacks=[sbp], max_steps=3, **options).fit(SmallCNN(), loader(data, BATCH))
    assert len(recording.records) == 3
    return recording


def _float64(scores: Scores) -> Scores:
    assert scores.features is not None and scores.logit_grads is not None
    return Scores(scores.losses.double(), None, scores.logit_grads.double(), scores.features.double(), scores.bias)


@pytest.mark.parametrize(("options", "dtype"), precisions())
@pytest.mark.parametrize("data", ["distinct", "rank-deficient"])
def test_omp_matches_a_float64_omp_on_the_same_scores(options: dict[str, Any], dtype: torch.dtype, data: str) -> None:
    dataset = blobs(48, size=8) if data == "distinct" else duplicated_blobs(48)
    recording = _fit("omp", options, dataset)
    for record in recording.records:
        assert record["autocast"] is False, "selection runs with autocast off"
        scores, k, selection = record["scores"], record["k"], record["selection"]
        assert scores.features.dtype == scores.logit_grads.dtype == torch.float32
        device = scores.losses.device
        reference = OMPSelector(dtype="float64").select(_float64(scores), k, torch.Generator(device=device))
        gram = gradient_gram(scores.features.double(), scores.logit_grads.double(), bias=scores.bias)
        assert float(selection.stats["weight_fallbacks"]) == 0, "no weight fallback"
        ours = subset_gradient_error(gram, selection.indices, selection.weights.double())
        best = subset_gradient_error(gram, reference.indices, reference.weights.double())
        # float32 OMP against float64 OMP on the same atoms: either the same support, or a fit no worse than
        # float64's beyond what the float32 Gram's rounding hides in either form (entries of D + C products, then
        # the form's N² sums): the float32 fit minimises the float32 form, which is within that of the exact one.
        width = scores.features.shape[-1] + scores.logit_grads.shape[-1]
        slack = squared_error_tolerance(gram, selection.indices, selection.weights.double(), width, eps=EPS32)
        slack += squared_error_tolerance(gram, reference.indices, reference.weights.double(), width, eps=EPS32)
        same_support = set(selection.indices.tolist()) == set(reference.indices.tolist())
        assert same_support or float(ours) ** 2 <= float(best) ** 2 + slack


@pytest.mark.parametrize(("options", "dtype"), precisions())
def test_gradnorm_draws_what_float64_probabilities_draw(options: dict[str, Any], dtype: torch.dtype) -> None:
    recording = _fit("gradnorm", options, blobs(48, size=8))
    for record in recording.records:
        assert record["autocast"] is False
        scores, k, selection = record["scores"], record["k"], record["selection"]
        bound32 = gradient_norm_bound(scores.features, scores.logit_grads, bias=scores.bias)
        bound64 = gradient_norm_bound(scores.features.double(), scores.logit_grads.double(), bias=scores.bias)
        # Each norm is a square root of a sum of squares of float32 inputs, computed in float32 and in float64.
        dim, classes = scores.features.shape[-1], scores.logit_grads.shape[-1]
        rtol = gradient_norm_bound_rtol(dim, classes, torch.float32)
        assert_within(bound32, bound64, rtol * bound64, "gradient-norm bounds")
        # The same draw in float64: the same examples, weights within float32 rounding of the probabilities.
        generator = torch.Generator(device=scores.losses.device)
        generator.set_state(record["generator"])
        reference = get_selector("gradnorm").select(_float64(scores), k, generator)
        assert selection.indices.tolist() == reference.indices.tolist()
        prob = get_selector("gradnorm").inclusion_probabilities(_float64(scores), k)
        floor = k / (scores.size * DEFAULT_MAX_WEIGHT)
        rtol = gradnorm_weight_rtol(prob, k, floor, dim, classes, torch.float32)[reference.indices]
        assert_within(selection.weights, reference.weights, rtol * reference.weights, "weights")


@pytest.mark.parametrize(("options", "dtype"), precisions())
@pytest.mark.parametrize("name", ["topk", "loss", "random"])
def test_loss_based_and_random_selection_see_float32_losses(
    options: dict[str, Any], dtype: torch.dtype, name: str
) -> None:
    recording = _fit(name, options, blobs(48, size=8))
    for record in recording.records:
        assert record["autocast"] is False
        scores, selection = record["scores"], record["selection"]
        assert scores.losses.dtype == torch.float32
        assert torch.equal(selection.weights, torch.ones_like(selection.weights))
        if name == "topk":
            expected = torch.topk(scores.losses.double(), record["k"]).indices
            assert set(selection.indices.tolist()) == set(expected.tolist())


class MeasurementSpy(pl.Callback):
    """Records what the gradient-error tracker measured, the autocast state, and the model before the step."""

    def __init__(self, sbp: SelectiveBackprop) -> None:
        self.sbp = sbp
        self.records: list[dict[str, Any]] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tracker = self.sbp.step.tracker
        assert tracker is not None
        measure = tracker.measure

        def spy(module: pl.LightningModule, scores: Scores, selection: Selection, *args: Any) -> dict[str, Tensor]:
            record = {"scores": cpu(scores), "selection": cpu(selection), "autocast": autocast_on()}
            record["model"] = {name: value.detach().to("cpu", copy=True) for name, value in module.state_dict().items()}
            record["values"] = measure(module, scores, selection, *args)
            self.records.append(record)
            return record["values"]

        tracker.measure = spy  # type: ignore[method-assign]


class BatchRecorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.batches.append([value.to("cpu", copy=True) for value in batch])


@pytest.mark.parametrize(("options", "dtype"), precisions())
@pytest.mark.parametrize("selector", ["omp", "topk"])
def test_every_gradient_error_metric_matches_float64_on_the_same_scores(
    options: dict[str, Any], dtype: torch.dtype, selector: str
) -> None:
    sbp = SelectiveBackprop(selector, keep=0.25, grad_error_every=1, exact_grad_error_every=1)
    spy, batches = MeasurementSpy(sbp), BatchRecorder()
    torch.manual_seed(0)
    model = SmallCNN(dropout=0.0)
    trainer(callbacks=[sbp, spy, batches], max_steps=3, **options).fit(model, loader(duplicated_blobs(48), BATCH))
    assert len(spy.records) == 3
    for record, batch in zip(spy.records, batches.batches, strict=True):
        assert record["autocast"] is False, "measurement runs with autocast off"
        scores, selection, values = record["scores"], record["selection"], record["values"]
        gram = gradient_gram(scores.features.double(), scores.logit_grads.double(), bias=scores.bias)
        weights = selection.weights.double()
        error = subset_gradient_error(gram, selection.indices, weights)
        # The float32 Gram's rounding: entries of D + C products, then the form's N² sums (see the helper).
        width = scores.features.shape[-1] + scores.logit_grads.shape[-1]
        tolerance = squared_error_tolerance(gram, selection.indices, weights, width, eps=EPS32)
        assert_within(values["sbp/grad_error_step"].square(), error.square(), tolerance, "subset error")
        k = len(selection.indices)
        random_error = random_subset_gradient_error(gram, k)
        tolerance = random_squared_error_tolerance(gram, k, width, eps=EPS32)
        assert_within(values["sbp/grad_error_random_step"].square(), random_error.square(), tolerance, "random error")
        # The ratio is the float64 quotient of the two logged values: the same division here.
        ratio = float(values["sbp/grad_error_ratio_step"])
        assert ratio == float(values["sbp/grad_error_step"]) / float(values["sbp/grad_error_random_step"])
        # The exact error over all parameters, in float64 on a float64 copy of the model before the step.
        reference = SmallCNN(dropout=0.0).double()
        reference.load_state_dict(record["model"])
        double_batch = [batch[0].double(), batch[1]]
        subset = [double_batch[0][selection.indices], batch[1][selection.indices]]
        approximation, full = subset_and_full_gradients(
            reference, reference.sbp_forward, reference.sbp_loss, double_batch, subset, weights
        )
        exact = relative_gradient_error(approximation, full)
        # float32 gradients of the conv net, each rounding relative to the magnitudes it sums (no cancellation, as
        # near initialisation): along the chain, five sums over the batch's N * 64 positions dominate (batch norm's
        # mean and variance, forward and backward, and the convolution's weight gradient), so each gradient errs
        # by γ of their count in norm, and ‖a − r‖ / ‖r‖ by that times ‖a‖ / ‖r‖ + 1 + e <= 2 (1 + e). On a CUDA
        # device cuDNN rounds the convolution's float32 operands to TF32 (unit roundoff 2^-11) unless told not to:
        # twice that more for the forward convolution, and again for its weight gradient.
        tf32 = 2 * 2 * 2.0**-11 if options.get("accelerator") == "gpu" and torch.backends.cudnn.allow_tf32 else 0.0
        rtol = 2 * (gamma(5 * BATCH * 64, torch.float32) + tf32)
        assert_within(values["sbp/grad_error_exact_step"], exact, rtol * (1 + exact), "exact error")
