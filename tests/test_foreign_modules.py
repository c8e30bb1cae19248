"""The callback on modules this project did not write: each trains as its user expects, or fails at the
first step with a message that names the fix."""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import loader, sequence_losses, trainer
from lightning.pytorch.demos import LightningTransformer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from lightning_sbp import Scores, Selection, SelectiveBackprop, Selector
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
