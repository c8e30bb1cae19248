"""The callback on modules this project did not write: each trains as its user expects, or fails at the
first step with a message that names the fix."""

from __future__ import annotations

import copy
import functools
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import MixinRegressor, Regressor, loader, regression_data, sequence_losses, trainer
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.demos.boring_classes import Net as DemoNet
from tolerances import assert_within, gamma
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from lightning_sbp import Scores, Selection, SelectiveBackprop, SelectiveBackpropMixin, Selector
from lightning_sbp.scoring import ScoringError


class Sizes(pl.Callback):
    """Records the number of rows of every batch the module's own training_step receives."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        selection = next(cb for cb in trainer.callbacks if isinstance(cb, SelectiveBackprop)).last_selection
        self.sizes.append(-1 if selection is None else int(selection.indices.shape[0]))


def fit(model: pl.LightningModule, data: Dataset, batch_size: int, sbp: SelectiveBackprop, steps: int = 2) -> Sizes:
    sizes = Sizes()
    trainer(callbacks=[sbp, sizes], max_steps=steps).fit(model, loader(data, batch_size))
    return sizes


class Wrapped(pl.LightningModule):
    """What a user writes around a model from another library: forward and a step on its loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.seen: list[int] = []

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if isinstance(batch, dict):
            self.seen.append(batch["input_ids"].shape[0])
            return self(**batch).loss
        inputs, targets = batch
        self.seen.append(inputs.shape[0])
        return F.cross_entropy(self(inputs), targets)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


# ---------------------------------------------------------------- Lightning's own demo modules


def test_boring_model_trains_on_random_subsets_without_a_scoring_pass() -> None:
    sbp = SelectiveBackprop("random", keep=0.25, track_grad_error=False)
    sizes = fit(BoringModel(), RandomDataset(32, 64), 16, sbp, steps=3)
    assert sizes.sizes == [4, 4, 4]
    assert sbp.examples_backpropagated == 12


def test_boring_model_trains_on_random_subsets_with_the_defaults_and_says_why_it_tracks_nothing() -> None:
    sbp = SelectiveBackprop("random", keep=0.25)
    with pytest.warns(UserWarning, match=r"does not track gradient errors.*BoringModel.*training goes on"):
        sizes = fit(BoringModel(), RandomDataset(32, 64), 16, sbp, steps=3)
    assert sizes.sizes == [4, 4, 4]


def test_boring_model_with_a_scoring_selector_fails_at_the_first_step_naming_score_fn() -> None:
    with pytest.raises(ScoringError) as info:
        fit(BoringModel(), RandomDataset(32, 64), 16, SelectiveBackprop("topk", keep=0.25))
    message = str(info.value)
    assert "BoringModel" in message and "score_fn" in message and "sbp_forward" in message
    assert "\n" not in message, "one paragraph"


class Transformer(LightningTransformer):
    """Lightning's demo language model, fed random tokens instead of its WikiText-2 download."""

    def prepare_data(self) -> None:
        pass


def tokens(n: int = 16, length: int = 8, vocab: int = 50) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (n, length + 1), generator=generator)
    return TensorDataset(ids[:, :-1], ids[:, 1:])


def test_lightning_transformer_needs_score_fn_and_trains_with_it() -> None:
    with pytest.raises(ScoringError, match=r"batches of Transformer.*TypeError.*score_fn"):
        fit(Transformer(vocab_size=50), tokens(), 8, SelectiveBackprop("topk", keep=0.5))
    sbp = SelectiveBackprop("topk", keep=0.5, score_fn=sequence_losses)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # no last layer to track with losses only; said once
        sizes = fit(Transformer(vocab_size=50), tokens(), 8, sbp)
    assert sizes.sizes == [4, 4]


def test_lightning_transformer_trains_on_random_subsets_without_any_option() -> None:
    sizes = fit(Transformer(vocab_size=50), tokens(), 8, SelectiveBackprop("random", track_grad_error=False))
    assert sizes.sizes == [4, 4]


# ---------------------------------------------------------------- transformers


class TokenDicts(Dataset):
    def __init__(self, n: int = 16, length: int = 6, vocab: int = 40, per_token: bool = False) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(vocab, (n, length), generator=generator)
        self.labels = self.ids.clone() if per_token else self.ids[:, 0] % 2

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def test_bert_sequence_classifier_trains_on_topk_subsets_with_gradient_tracking() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, num_labels=2
    )
    model = Wrapped(transformers.BertForSequenceClassification(config))
    sbp = SelectiveBackprop("topk", keep=0.5)
    t = trainer(callbacks=[sbp], max_steps=2, log_every_n_steps=1)
    t.fit(model, loader(TokenDicts(), 8))
    assert model.seen == [4, 4]
    assert "sbp/grad_error_step" in t.callback_metrics


def test_gpt2_language_model_scores_token_level_logits() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = Wrapped(transformers.GPT2LMHeadModel(config))
    sbp = SelectiveBackprop("loss", keep=0.5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(model, TokenDicts(per_token=True), 8, sbp)
    assert model.seen == [4, 4]
    assert not [w for w in record if "does not track gradient errors" in str(w.message)]
    assert model.trainer.callback_metrics["sbp/grad_error_ratio_epoch"].isfinite()


def test_a_causal_lm_whose_labels_are_its_inputs_is_scored_on_the_next_token() -> None:
    # transformers' causal LMs take labels = input_ids and shift inside their loss; scored at their own positions,
    # every position would predict the token it reads. The scoring pass shifts them the same way.
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        vocab_size=40, n_positions=16, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0
    )
    torch.manual_seed(0)
    model = Wrapped(transformers.GPT2LMHeadModel(config))
    data = TokenDicts(per_token=True)
    first = next(iter(loader(data, 8)))
    with torch.no_grad():
        expected = float(model(**first).loss)  # the model's own, shifted loss, before any step
    t = trainer(callbacks=[SelectiveBackprop("loss", keep=0.5)], max_steps=1, log_every_n_steps=1)
    t.fit(model, loader(data, 8))
    # Every sequence has the same length: the mean of per-sequence means is the mean over tokens. Both are
    # float32 sums of 8 * 5 token losses of a few units each.
    assert float(t.callback_metrics["sbp/full_loss"]) == pytest.approx(expected, rel=gamma(8 * 5, torch.float32) * 4)


class NextTokenMixin(SelectiveBackpropMixin, pl.LightningModule):
    """A mixin module around a causal LM that keeps the mixin's default loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.model(**inputs).logits

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_mixin_causal_lm_with_unshifted_labels_stops_with_the_loss_to_use() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = NextTokenMixin(transformers.GPT2LMHeadModel(config))
    with pytest.raises(ScoringError, match="per_example_next_token_cross_entropy"):
        fit(model, TokenDicts(per_token=True), 8, SelectiveBackprop("omp", keep=0.5))


class LargestGrad(Selector):
    """An unweighted selector that reads the last layer: the largest logit gradients."""

    needs_last_layer = True

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        _, grads = scores.require_last_layer("LargestGrad")
        return Selection.uniform(grads.flatten(1).norm(dim=1).topk(k).indices)


def test_a_last_layer_selector_on_a_language_model_reads_its_per_position_head() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = Wrapped(transformers.GPT2LMHeadModel(config))
    sbp = SelectiveBackprop(LargestGrad(), keep=0.25)
    fit(model, TokenDicts(per_token=True), 8, sbp)
    assert model.seen == [2, 2]
    assert sbp.last_selection is not None and sbp.last_selection.indices.shape == (2,)


# ---------------------------------------------------------------- torchvision


def images(n: int = 16, size: int = 32, classes: int = 3) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 3, size, size, generator=generator), torch.randint(classes, (n,)))


def test_torchvision_resnet18_trains_on_subsets_and_keeps_its_running_statistics() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = Wrapped(torchvision.models.resnet18(num_classes=3))
    sbp = SelectiveBackprop("topk", keep=0.25)
    fit(model, images(), 8, sbp)
    assert model.seen == [2, 2]
    assert int(model.model.bn1.num_batches_tracked) == 2, "only the subset passes updated batch norm"


def test_tiny_torchvision_vision_transformer_trains_on_subsets() -> None:
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(
        image_size=16, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )
    model = Wrapped(vit)
    fit(model, images(size=16), 8, SelectiveBackprop("loss", keep=0.5))
    assert model.seen == [4, 4]


# ---------------------------------------------------------------- what a step must select: an independent audit


# A reference gives a batch's per-example float64 losses and the float64 outputs they come from.
Reference = Callable[[pl.LightningModule, Any], tuple[Tensor, Tensor]]


def logit_rtol(module: nn.Module, precision: str) -> float:
    """Bound on the rounding of a scoring pass's outputs, relative to the largest output.

    Each matrix product (a linear or convolution layer, and the two products of each self-attention, taken as wide
    as the widest layer) rounds relative to the magnitudes it sums; without cancellation, as near initialisation,
    it adds γ of its fan-in in float32, and under bf16-mixed twice bfloat16's unit roundoff (both operands are
    rounded to bfloat16, the sums stay in float32), and once more for the outputs, stored in bfloat16. Other
    operations round once per element: negligible beside.
    """
    unit = gamma(1, torch.bfloat16) if precision == "bf16-mixed" else 0.0
    fan_ins = []
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            fan_ins.append(layer.in_features)
        elif isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            fan_ins.append(layer.in_channels // layer.groups * math.prod(layer.kernel_size))
    attention = sum(type(layer).__name__.endswith("SelfAttention") for layer in module.modules())
    fan_ins += [max(fan_ins)] * 2 * attention
    return unit + sum(2 * unit + gamma(fan_in, torch.float32) for fan_in in fan_ins)


def scoring_error(module: nn.Module, precision: str, losses: Tensor, outputs: Tensor) -> float:
    """Bound on how far a batch's scoring-pass losses can be from the float64 reference ``losses``.

    The outputs err by ``δz`` (:func:`logit_rtol` of the largest); cross-entropy moves by at most ``2 δz``, binary
    cross-entropy by ``δz`` and a mean squared error by ``2 sqrt(loss) δz + δz²``; the float32 loss itself rounds by
    ``γ_{m+6}`` of its terms over ``m`` outputs, at most twice the largest output, the loss and ``log(m + 1)``.
    """
    n = losses.shape[0]
    magnitudes = outputs.detach().reshape(n, -1).abs()
    classes = magnitudes.shape[1]
    logit_error = logit_rtol(module, precision) * float(magnitudes.max())
    propagated = 2 * losses.sqrt().clamp(min=1) * logit_error + logit_error**2
    rounding = 2 * gamma(classes + 6, torch.float32) * (2 * magnitudes.amax(1) + losses + math.log(classes + 1))
    return float((propagated + rounding).max())


class TopkAudit(pl.Callback):
    """Before each step, the batch's per-example losses from an independent float64 reference; after it, the kept rows.

    ``topk`` must keep the rows of the largest reference losses, up to the rounding of the scoring pass.
    """

    def __init__(self, reference: Reference) -> None:
        self.reference = reference
        self.losses: list[Tensor] = []
        self.errors: list[float] = []
        self.kept: list[Tensor] = []
        self.precision = ""

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        losses, outputs = self.reference(pl_module, batch)
        self.precision = str(trainer.precision)
        self.losses.append(losses)
        self.errors.append(scoring_error(pl_module, self.precision, losses, outputs))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        selection = next(cb for cb in trainer.callbacks if isinstance(cb, SelectiveBackprop)).last_selection
        assert selection is not None
        self.kept.append(selection.indices.cpu())

    def assert_kept_the_largest(self, k: int) -> None:
        assert self.losses and len(self.kept) == len(self.losses)
        for losses, kept, error in zip(self.losses, self.kept, self.errors, strict=True):
            assert kept.shape == (k,) and kept.unique().numel() == k
            assert losses.std() > 0, "the reference ranks the examples"
            # A kept loss and the k-th largest each err by at most the scoring pass's bound.
            threshold = float(losses.topk(k).values[-1]) - 2 * error
            assert bool((losses[kept] >= threshold).all()), (losses, kept, error)
            assert float(losses[kept].min()) > float(losses.min()), "the audit can fail: the smallest loss is out"
            if self.precision == "32-true":
                # Under bf16-mixed the bound can exceed the spread of an untrained model's losses; in float32 it
                # must not, or the audit could not tell a wrong pick from rounding.
                assert float(losses.min()) < threshold, "the audit can fail: keeping the smallest loss would break it"


def float64_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).double().eval()


def fit_audited(
    model: pl.LightningModule, data: Dataset, sbp: SelectiveBackprop, audit: pl.Callback, precision: str, steps: int = 2
) -> pl.Trainer:
    fitted = trainer(callbacks=[sbp, audit], max_steps=steps, precision=precision, log_every_n_steps=1)
    fitted.fit(model, loader(data, 16))
    return fitted


# ---------------------------------------------------------------- regression


def regression_reference(module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
    x, y = batch
    with torch.no_grad():
        out = float64_copy(module.net)(x.double())
    return (out.reshape(len(y), -1) - y.double().reshape(len(y), -1)).square().mean(dim=1), out


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_regression_is_scored_by_its_squared_error_and_topk_keeps_the_largest(
    precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    audit = TopkAudit(regression_reference)
    with caplog.at_level(logging.INFO):
        fitted = fit_audited(Regressor(), regression_data(), SelectiveBackprop("topk", keep=0.5), audit, precision)
    audit.assert_kept_the_largest(8)
    said = [r.getMessage() for r in caplog.records if "scores Regressor with the squared error" in r.getMessage()]
    assert len(said) == 1 and "loss_fn" in said[0]
    # sbp/full_loss is the mean of the scoring losses of the last step: real losses, not zeros. Each loss is
    # within the scoring pass's bound, and their float32 mean rounds by γ_16 of it.
    full_loss, expected = fitted.callback_metrics["sbp/full_loss"], audit.losses[-1].mean()
    tolerance = audit.errors[-1] + gamma(16, torch.float32) * float(expected)
    assert_within(full_loss, expected, tolerance, "full loss")
    assert fitted.callback_metrics["sbp/grad_error_ratio_epoch"].isfinite()


def test_a_loss_that_is_zero_by_construction_is_said_once() -> None:
    single_logit_cross_entropy = functools.partial(F.cross_entropy, reduction="none")
    sbp = SelectiveBackprop("topk", keep=0.5, loss_fn=single_logit_cross_entropy, track_grad_error=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Regressor(), regression_data(), 16, sbp, steps=3)
    said = [str(w.message) for w in record if "exactly 0" in str(w.message)]
    assert len(said) == 1 and "Regressor" in said[0] and "loss_fn" in said[0]


class ThreeOutputs(Regressor):
    """Three outputs per example against one floating-point target: no default loss fits."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 3))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x).mean(dim=1), y)


class MixinThreeOutputs(SelectiveBackpropMixin, ThreeOutputs):
    pass


@pytest.mark.parametrize(("module", "fix"), [(ThreeOutputs, "loss_fn=..."), (MixinThreeOutputs, "sbp_loss")])
def test_targets_no_default_loss_fits_stop_the_first_step_naming_the_loss_option(module: type, fix: str) -> None:
    with pytest.raises(ScoringError) as info:
        fit(module(), regression_data(squeeze=True), 16, SelectiveBackprop("topk", keep=0.5))
    message = str(info.value)
    assert "outputs of shape (16, 3) and torch.float32 targets of shape (16,)" in message
    assert fix in message and "\n" not in message


@pytest.mark.parametrize("selector", ["random", "loss"])
@pytest.mark.parametrize("loss_fn", [None, functools.partial(F.mse_loss, reduction="none")])
def test_a_squeezed_regression_head_trains_and_tracks_with_its_last_layer(selector: str, loss_fn: Any) -> None:
    model = Regressor(squeeze=True)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    sbp = SelectiveBackprop(selector, keep=0.5, loss_fn=loss_fn)
    fitted = trainer(callbacks=[sbp], max_steps=2, log_every_n_steps=1)
    fitted.fit(model, loader(regression_data(squeeze=True), 16))
    assert sbp.examples_backpropagated == 16
    assert all(not torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True))
    ratio = fitted.callback_metrics["sbp/grad_error_ratio_epoch"]
    assert ratio.isfinite() and ratio > 0, "the one-output head's gradients were read as [N, 1]"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("selector", ["omp", "gradnorm"])
def test_weighted_selectors_train_a_regression_on_its_squared_error(selector: str, precision: str) -> None:
    model = MixinRegressor()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    sbp = SelectiveBackprop(selector, keep=0.5)
    fitted = trainer(callbacks=[sbp], max_steps=2, log_every_n_steps=1, precision=precision)
    fitted.fit(model, loader(regression_data(), 16))
    assert sbp.last_selection is not None and bool(sbp.last_selection.weights.abs().sum() > 0)
    changed = [not torch.equal(old, new) for old, new in zip(before, model.parameters(), strict=True)]
    assert changed == [True] * 4, "every parameter tensor trained"
    assert fitted.callback_metrics["sbp/grad_error_ratio_epoch"].isfinite()


# ---------------------------------------------------------------- dict batches with a plain forward(x)


class ImageDicts(Dataset):
    """Image examples as dicts, as torchvision-style and datasets-style pipelines yield them, with an index."""

    def __init__(self, keys: tuple[str, str], n: int = 32, size: int = 16, channels: int = 3, classes: int = 3) -> None:
        generator = torch.Generator().manual_seed(0)
        self.labels = torch.randint(classes, (n,), generator=generator)
        self.images = torch.randn(n, channels, size, size, generator=generator) + self.labels.view(-1, 1, 1, 1)
        self.keys = keys

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label = self.keys
        return {image: self.images[i], label: self.labels[i], "index": i}


class ImageModule(pl.LightningModule):
    """What a user writes around an image model: ``forward(x)`` and a step that reads its dict batch by name."""

    def __init__(self, model: nn.Module, keys: tuple[str, str]) -> None:
        super().__init__()
        self.model = model
        self.keys = keys

    def forward(self, x: Tensor) -> Tensor:
        output = self.model(x)
        return output.logits if hasattr(output, "logits") else output

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image, label = self.keys
        return F.cross_entropy(self(batch[image]), batch[label])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def image_reference(keys: tuple[str, str]) -> Reference:
    def reference(module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        image, label = keys
        with torch.no_grad():
            logits = float64_copy(module)(batch[image].double())
        return F.cross_entropy(logits, batch[label], reduction="none"), logits

    return reference


def small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("keys", [("image", "label"), ("pixel_values", "labels")])
def test_image_dicts_with_a_plain_forward_train_with_topk_and_loss_and_no_options(keys: tuple[str, str]) -> None:
    audit = TopkAudit(image_reference(keys))
    fit_audited(ImageModule(small_cnn(), keys), ImageDicts(keys), SelectiveBackprop("topk", keep=0.5), audit, "32-true")
    audit.assert_kept_the_largest(8)
    sizes = fit(ImageModule(small_cnn(), keys), ImageDicts(keys), 16, SelectiveBackprop("loss", keep=0.5))
    assert sizes.sizes == [8, 8]


# ---------------------------------------------------------------- modules the project had not tried


def estimate_batch_statistics(model: nn.Module, images: Tensor) -> None:
    """Batch norm's running statistics estimated on ``images``, as a trained model has them.

    At initialisation (mean 0, variance 1) eval-mode batch norm lets mobilenet's activations shrink to about 1e-8
    over its 50 layers: every example then scores log 3 within 1e-10, and there is nothing to rank.
    """
    norms = [layer for layer in model.modules() if isinstance(layer, nn.BatchNorm2d)]
    momenta = [layer.momentum for layer in norms]
    for layer in norms:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average over the one pass
    model.train()
    with torch.no_grad():
        model(images)
    for layer, momentum in zip(norms, momenta, strict=True):
        layer.momentum = momentum


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_torchvision_mobilenet_v3_on_image_dicts_keeps_the_largest_losses(precision: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    keys = ("image", "label")
    torch.manual_seed(0)
    model = ImageModule(torchvision.models.mobilenet_v3_small(num_classes=3), keys)
    data = ImageDicts(keys, size=32)
    estimate_batch_statistics(model, data.images)
    audit = TopkAudit(image_reference(keys))
    # Batch norm and dropout: scored in eval mode, the mode of the independent reference.
    sbp = SelectiveBackprop("topk", keep=0.5, score_mode="eval")
    fitted = fit_audited(model, data, sbp, audit, precision)
    audit.assert_kept_the_largest(8)
    assert fitted.callback_metrics["sbp/grad_error_ratio_epoch"].isfinite()


@pytest.mark.parametrize("selector", ["random", "loss"])
def test_torchvision_mobilenet_v3_trains_on_random_and_loss_subsets(selector: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    keys = ("image", "label")
    model = ImageModule(torchvision.models.mobilenet_v3_small(num_classes=3), keys)
    sizes = fit(model, ImageDicts(keys, size=32), 16, SelectiveBackprop(selector, keep=0.25))
    assert sizes.sizes == [4, 4]


TINY_TRANSFORMER = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def tiny_vit(transformers: Any, classes: int = 3) -> nn.Module:
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_labels=classes, **TINY_TRANSFORMER)
    return transformers.ViTForImageClassification(config)


def tiny_bert_config(transformers: Any, **options: Any) -> Any:
    return transformers.BertConfig(vocab_size=40, **TINY_TRANSFORMER, **options)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_transformers_vit_on_pixel_values_dicts_keeps_the_largest_losses(precision: str) -> None:
    transformers = pytest.importorskip("transformers")
    keys = ("pixel_values", "labels")
    torch.manual_seed(0)
    audit = TopkAudit(image_reference(keys))
    model = ImageModule(tiny_vit(transformers), keys)
    sbp = SelectiveBackprop("topk", keep=0.5, score_mode="eval")
    fit_audited(model, ImageDicts(keys), sbp, audit, precision)
    audit.assert_kept_the_largest(8)


class MixinViT(SelectiveBackpropMixin, pl.LightningModule):
    """A transformers image classifier with the mixin and its default step: the batch dict goes to forward as is."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Any:
        return self.model(pixel_values=pixel_values)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("selector", ["omp", "gradnorm"])
def test_transformers_vit_with_the_mixin_trains_with_weighted_selectors(selector: str) -> None:
    transformers = pytest.importorskip("transformers")
    model = MixinViT(tiny_vit(transformers))
    before = model.model.classifier.weight.detach().clone()
    sbp = SelectiveBackprop(selector, keep=0.5)
    fitted = trainer(callbacks=[sbp], max_steps=2, log_every_n_steps=1)
    fitted.fit(model, loader(ImageDicts(("pixel_values", "labels")), 16))
    assert sbp.examples_backpropagated == 16
    assert not torch.equal(before, model.model.classifier.weight)
    assert fitted.callback_metrics["sbp/grad_error_ratio_epoch"].isfinite()


class TextDicts(Dataset):
    """Token dicts with float labels: a score per example, or multi-hot labels."""

    def __init__(self, labels: Tensor, length: int = 6, vocab: int = 40) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(vocab, (len(labels), length), generator=generator)
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def bert_reference(loss: Callable[[Tensor, Tensor], Tensor]) -> Reference:
    def reference(module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            logits = float64_copy(module.model)(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return loss(logits, batch["labels"].double()), logits

    return reference


def rowwise_squared_error(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.reshape(len(labels), -1) - labels.reshape(len(labels), -1)).square().mean(dim=1)


def rowwise_binary_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)


PROBLEMS = {
    # problem: (num_labels, transformers' problem_type, labels, the loss transformers trains with, its reference)
    "regression": (1, "regression", lambda g: 3 * torch.rand(32, generator=g), "squared error", rowwise_squared_error),
    "multi-label": (
        4,
        "multi_label_classification",
        lambda g: torch.randint(2, (32, 4), generator=g).float(),
        "binary cross-entropy with logits",
        rowwise_binary_cross_entropy,
    ),
}


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_transformers_bert_regression_and_multi_label_are_scored_by_their_own_loss(
    problem: str, precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    transformers = pytest.importorskip("transformers")
    num_labels, problem_type, labels, loss_name, reference = PROBLEMS[problem]
    config = tiny_bert_config(transformers, num_labels=num_labels, problem_type=problem_type)
    torch.manual_seed(0)
    model = Wrapped(transformers.BertForSequenceClassification(config))
    audit = TopkAudit(bert_reference(reference))
    data = TextDicts(labels(torch.Generator().manual_seed(1)))
    with caplog.at_level(logging.INFO):
        fit_audited(model, data, SelectiveBackprop("topk", keep=0.5, score_mode="eval"), audit, precision)
    audit.assert_kept_the_largest(8)
    assert model.seen == [8, 8]
    assert [r for r in caplog.records if f"scores Wrapped with the {loss_name} of each example" in r.getMessage()]


class StepCallsTheModel(pl.LightningModule):
    """A transformers module whose step calls the model itself, as many write it: it defines no forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_module_without_forward_is_told_so_at_the_first_selective_step() -> None:
    transformers = pytest.importorskip("transformers")
    model = StepCallsTheModel(transformers.BertForSequenceClassification(tiny_bert_config(transformers, num_labels=2)))
    with pytest.raises(ScoringError) as info:
        fit(model, TokenDicts(), 8, SelectiveBackprop("topk", keep=0.5))
    message = str(info.value)
    assert "StepCallsTheModel has no forward method" in message and "def forward(self, **inputs)" in message
    assert "_forward_unimplemented" not in message and "\n" not in message
    sizes = fit(model, TokenDicts(), 8, SelectiveBackprop("random", keep=0.5, track_grad_error=False))
    assert sizes.sizes == [4, 4], "random selection without tracking needs no forward"


class LightningDemoNet(pl.LightningModule):
    """Lightning's demo MNIST network (log-probabilities out), trained with the negative log-likelihood."""

    def __init__(self) -> None:
        super().__init__()
        self.net = DemoNet()

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.nll_loss(self(batch["x"]), batch["y"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def digit_dicts(n: int = 32) -> list[dict[str, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(10, (n,), generator=generator)
    images = torch.randn(n, 1, 28, 28, generator=generator) + 0.1 * labels.view(-1, 1, 1, 1)
    return [{"x": image, "y": label} for image, label in zip(images, labels, strict=True)]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_demo_net_is_scored_by_its_negative_log_likelihood(precision: str) -> None:
    def reference(module: pl.LightningModule, batch: Any) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            log_probabilities = float64_copy(module.net)(batch["x"].double())
        return F.nll_loss(log_probabilities, batch["y"], reduction="none"), log_probabilities

    torch.manual_seed(0)
    audit = TopkAudit(reference)
    # Cross-entropy of log-probabilities is their negative log-likelihood: the default fits without options.
    sbp = SelectiveBackprop("topk", keep=0.5, score_mode="eval")
    fit_audited(LightningDemoNet(), digit_dicts(), sbp, audit, precision)
    audit.assert_kept_the_largest(8)


# ---------------------------------------------------------------- batches with raw strings


class Texts(Dataset):
    """Raw texts and labels: the loader collates the texts into a list of strings."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"text": "ab" * (i % 4 + 1), "label": i % 2}


class TokenizesInItsStep(pl.LightningModule):
    """Featurises its texts in training_step, as modules that tokenise on the fly do."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 2)
        self.pairs: list[tuple[int, int]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self.pairs.append((len(batch["text"]), int(batch["label"].shape[0])))
        lengths = torch.tensor([[float(len(text))] for text in batch["text"]])
        return F.cross_entropy(self.head(lengths), batch["label"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_list_of_strings_in_the_batch_is_subset_with_the_tensors() -> None:
    model = TokenizesInItsStep()
    fit(model, Texts(), 8, SelectiveBackprop("random", keep=0.25, track_grad_error=False))
    assert model.pairs == [(2, 2), (2, 2)]
