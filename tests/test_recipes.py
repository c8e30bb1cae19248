from __future__ import annotations

import csv
import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import WORDS, fake_data, tiny_tokenizer
from helpers import trainer as quiet_trainer
from tolerances import gamma
from torch import nn

from lightning_sbp.recipes import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DatasetNotFoundError,
    DigitsDataModule,
    ImageClassifier,
    ImageFolderDataModule,
    SVHNDataModule,
    TextClassificationDataModule,
    TextClassifier,
    available_backbones,
    build_backbone,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


class BatchRecorder(pl.Callback):
    def __init__(self) -> None:
        self.batches: list[Any] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        self.batches.append(batch)


def one_step(model: pl.LightningModule, datamodule: pl.LightningDataModule, tmp_path: Path) -> BatchRecorder:
    """Fit on one training batch and one validation batch, and check that the weights moved."""
    recorder = BatchRecorder()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[recorder],
    )
    trainer.fit(model, datamodule)
    assert trainer.global_step == 1
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters(), strict=True))
    assert "val/acc" in trainer.callback_metrics and "val/loss" in trainer.callback_metrics
    return recorder


# -- backbones ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "wrn16_8", "digits_cnn", "mlp"])
def test_backbone_trains_and_ends_in_its_classifier(name: str) -> None:
    # The CIFAR-style networks take any size down to 8x8; 16x16 keeps the backward pass cheap.
    channels, size = (1, 8) if name in ("digits_cnn", "mlp") else (3, 16)
    model = build_backbone(name, num_classes=7, in_channels=channels)
    logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 7)
    logits.logsumexp(dim=1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    assert linears[-1] is model.fc and model.fc.out_features == 7


def test_wide_resnet_28_10_builds_with_its_size() -> None:
    model = build_backbone("wrn28_10", num_classes=10)
    assert 36_000_000 < sum(p.numel() for p in model.parameters()) < 37_000_000


def test_resnet18_uses_the_cifar_stem() -> None:
    model = build_backbone("resnet18", num_classes=10)
    first = next(module for module in model.modules() if isinstance(module, nn.Conv2d))
    assert first.kernel_size == (3, 3) and first.stride == (1, 1)
    assert not any(isinstance(module, nn.MaxPool2d) for module in model.modules())


def test_the_digits_cnn_takes_its_width() -> None:
    model = build_backbone("digits_cnn", num_classes=10, in_channels=1, width=8)
    assert model.fc.in_features == 16  # type: ignore[union-attr]
    assert build_backbone("digits_cnn", num_classes=10, in_channels=1).fc.in_features == 64  # type: ignore[union-attr]


def test_unknown_backbone_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"available backbones: .*resnet18"):
        build_backbone("vgg", num_classes=10)
    assert {"resnet18", "wrn16_8", "wrn28_10", "digits_cnn", "mlp"} <= set(available_backbones())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"schedule": "linear"}, "schedule"), ({"lr": 0.0}, "lr"), ({"momentum": 0.0, "nesterov": True}, "nesterov")],
)
def test_image_classifier_rejects_bad_hyperparameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ImageClassifier(backbone="mlp", **kwargs)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_learning_rate_schedules(schedule: Any, tmp_path: Path) -> None:
    model = ImageClassifier(
        backbone="digits_cnn", in_channels=1, lr=0.1, schedule=schedule, milestones=[1], warmup_epochs=0.5
    )
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=4, logger=False, default_root_dir=tmp_path)
    trainer.fit_loop.epoch_loop._batches_that_stepped = 0
    model.trainer = trainer
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(trainer), "estimated_stepping_batches", property(lambda self: 8))
        config = model.configure_optimizers()
    scheduler = config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(8):
        rates.append(scheduler.get_last_lr()[0])
        config["optimizer"].step()
        scheduler.step()
    # A few float64 operations on the base rate (a fraction of warm-up, a factor of the decay).
    rel = gamma(8, torch.float64)
    assert rates[0] == pytest.approx(0.05, rel=rel) and rates[1] == pytest.approx(0.1, rel=rel)  # two warm-up steps
    if schedule == "cosine":
        assert rates[2] > rates[5] > rates[7] > 0
    else:
        assert rates[3] == pytest.approx(0.1, rel=rel) and rates[4] == pytest.approx(0.01, rel=rel)


# -- image recipes on FakeData -----------------------------------------------------------------------


@pytest.mark.parametrize("datamodule_class", [CIFAR10DataModule, CIFAR100DataModule, SVHNDataModule])
def test_torchvision_recipe_takes_a_training_step(
    datamodule_class: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datamodule_class, "make_dataset", fake_data())
    datamodule = datamodule_class(data_dir=str(tmp_path), batch_size=8, num_workers=0, label_noise=0.25)
    # The convolutional backbones are exercised on their own above; a small MLP keeps this fast.
    model = ImageClassifier(backbone="mlp", num_classes=datamodule.num_classes, backbone_kwargs={"image_size": 32})
    recorder = one_step(model, datamodule, tmp_path)
    images, targets, indices = recorder.batches[0]
    assert images.shape == (8, 3, 32, 32) and targets.shape == (8,) and indices.shape == (8,)
    assert datamodule.noisy_labels is not None and datamodule.noisy_labels.num_flipped == 6


def test_augmentation_flips_cifar_but_not_svhn() -> None:
    def names(transform: Any) -> list[str]:
        return [type(step).__name__ for step in transform.transforms]

    assert names(CIFAR10DataModule().train_transform())[:2] == ["RandomCrop", "RandomHorizontalFlip"]
    assert "RandomHorizontalFlip" not in names(SVHNDataModule().train_transform())
    assert "RandomCrop" in names(SVHNDataModule().train_transform())
    assert "RandomCrop" not in names(CIFAR10DataModule().eval_transform())


def test_validation_split_holds_out_training_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(CIFAR10DataModule, "make_dataset", fake_data(size=40))
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path), val_split=0.25, label_noise=0.5, num_workers=0)
    datamodule.setup("fit")
    assert len(datamodule.train_set) == 30 and len(datamodule.val_set) == 10  # type: ignore[arg-type]
    train_ids = set(datamodule.train_set.dataset.indices)  # type: ignore[union-attr]
    val_ids = set(datamodule.val_set.dataset.indices)  # type: ignore[union-attr]
    assert not train_ids & val_ids and len(train_ids | val_ids) == 40


def test_image_folder_recipe_takes_a_training_step(tmp_path: Path) -> None:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label in ("cat", "dog", "fox"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 256, (16, 16, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    datamodule = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, batch_size=4, num_workers=0)
    model = ImageClassifier(backbone="mlp", num_classes=3, backbone_kwargs={"image_size": 16}, in_channels=3)
    recorder = one_step(model, datamodule, tmp_path)
    assert datamodule.classes == ["cat", "dog", "fox"] and datamodule.num_classes == 3
    assert recorder.batches[0][0].shape == (4, 3, 16, 16)


def test_model_and_data_must_agree_on_the_number_of_classes(tmp_path: Path) -> None:
    trainer = pl.Trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match="num_classes"):
        trainer.fit(ImageClassifier(backbone="digits_cnn", in_channels=1, num_classes=5), DigitsDataModule())


# -- missing data --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("datamodule_class", "folder"),
    [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python"), (SVHNDataModule, "")],
)
def test_missing_dataset_names_the_path_and_the_download_flag(
    datamodule_class: type, folder: str, tmp_path: Path
) -> None:
    root = tmp_path / "nowhere"
    datamodule = datamodule_class(data_dir=str(root), download=False)
    with pytest.raises(DatasetNotFoundError) as caught:
        datamodule.setup("fit")
    message = str(caught.value)
    assert str(root / folder) in message and "download: true" in message
    assert isinstance(caught.value, FileNotFoundError)
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_missing_image_folder_names_the_expected_layout(tmp_path: Path) -> None:
    datamodule = ImageFolderDataModule(data_dir=str(tmp_path / "imagenet32"))
    with pytest.raises(DatasetNotFoundError, match="imagenet32/train/<class>"):
        datamodule.setup("fit")


# -- digits ----------------------------------------------------------------------------------------------


def test_digits_split_is_stratified_normalised_and_indexed() -> None:
    datamodule = DigitsDataModule(val_fraction=0.2, split_seed=3)
    datamodule.setup("fit")
    train, val = datamodule.train_set, datamodule.val_set
    assert len(train) + len(val) == 1797 and abs(len(val) - 0.2 * 1797) <= 10  # type: ignore[arg-type]
    val_labels = val.dataset.targets  # type: ignore[union-attr]
    assert torch.bincount(val_labels, minlength=10).min() >= 34  # every class held out
    images = train.dataset.images  # type: ignore[union-attr]
    assert images.shape[1:] == (1, 8, 8)
    # Standardised in float32 with the training images' own mean and deviation: 0 and 1 but for the rounding of
    # float32 reductions, which torch sums in a cascade about log2(n) deep, relative to the sum of |pixels|, in
    # units of the deviation: mean|z| plus the blank pixels' |z|, -min(z).
    depth = 2 * images.numel().bit_length() + 4
    bound = 2 * gamma(depth, torch.float32) * float(images.abs().mean() - images.min())
    assert float(images.mean().abs()) <= bound and float((images.std() - 1).abs()) <= bound
    image, target, index = train[5]  # type: ignore[index]
    assert image.shape == (1, 8, 8) and isinstance(target, int) and index == 5
    assert datamodule.test_set is datamodule.val_set


def test_digits_upsampling_and_seeded_split() -> None:
    datamodules: list[Any] = [
        DigitsDataModule(image_size=16),
        DigitsDataModule(split_seed=0),
        DigitsDataModule(split_seed=0),
        DigitsDataModule(split_seed=1),
    ]
    for datamodule in datamodules:
        datamodule.setup("fit")
    upsampled, first, again, other = (datamodule.val_set.dataset for datamodule in datamodules)
    assert upsampled.images.shape[1:] == (1, 16, 16) and first.images.shape[1:] == (1, 8, 8)
    assert torch.equal(first.images, again.images) and torch.equal(first.targets, again.targets)
    assert first.images.shape == other.images.shape and not torch.equal(first.images, other.images)


def test_digits_recipe_learns_and_tests_on_its_validation_split(tmp_path: Path) -> None:
    pl.seed_everything(0)
    model = ImageClassifier(backbone="mlp", in_channels=1, lr=0.1)
    trainer = quiet_trainer(default_root_dir=tmp_path)
    trainer.fit(model, DigitsDataModule(batch_size=64))
    val_acc = float(trainer.callback_metrics["val/acc"])
    assert val_acc > 0.5  # 10 classes; the five epochs of the example configs reach about 0.99
    trainer.test(model, DigitsDataModule(batch_size=64), verbose=False)
    # The digits test on val: the same predictions, averaged the same way in float32.
    assert float(trainer.callback_metrics["test/acc"]) == pytest.approx(val_acc, rel=gamma(8, torch.float32))


# -- text --------------------------------------------------------------------------------------------------


def tiny_bert(num_labels: int = 2) -> TextClassifier:
    config = {
        "model_type": "bert",
        "vocab_size": 5 + len(WORDS),
        "hidden_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 32,
    }
    return TextClassifier(model_name_or_path=None, config=config, num_labels=num_labels, lr=1e-3, warmup_ratio=0.0)


def reviews(n: int, seed: int) -> list[tuple[str, str]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        pool = WORDS[:3] if label == "pos" else WORDS[3:6]
        picks = torch.randint(0, 3, (int(torch.randint(2, 7, (1,), generator=generator)),), generator=generator)
        rows.append(("the movie was " + " ".join(pool[int(j)] for j in picks), label))
    return rows


def test_text_recipe_takes_a_training_step_from_tables(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    with (tmp_path / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        writer.writerows(reviews(16, seed=0))
    (tmp_path / "val.jsonl").write_text(
        "\n".join(json.dumps({"review": text, "sentiment": label}) for text, label in reviews(6, seed=1))
    )
    datamodule = TextClassificationDataModule(
        tokenizer_name_or_path=tokenizer,
        train_file=str(tmp_path / "train.csv"),
        val_file=str(tmp_path / "val.jsonl"),
        text_column="review",
        label_column="sentiment",
        max_length=8,
        batch_size=4,
        label_noise=0.25,
    )
    recorder = one_step(tiny_bert(), datamodule, tmp_path)
    batch = recorder.batches[0]
    assert {"input_ids", "attention_mask", "labels", "index"} <= set(batch)
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 8
    assert datamodule.classes == ["neg", "pos"] and datamodule.num_classes == 2
    assert datamodule.noisy_labels is not None and datamodule.noisy_labels.num_flipped == 4
    assert batch["labels"].tolist() == [int(datamodule.train_set[i][1]) for i in batch["index"].tolist()]  # type: ignore[index]


def test_text_recipe_reads_the_imdb_layout(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer(tmp_path)
    for split, seed in (("train", 0), ("test", 1)):
        for i, (text, label) in enumerate(reviews(8, seed)):
            folder = tmp_path / "aclImdb" / split / label
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}_7.txt").write_text(text)
    (tmp_path / "aclImdb" / "train" / "unsup").mkdir()
    datamodule = TextClassificationDataModule(
        tokenizer_name_or_path=tokenizer, data_dir=str(tmp_path / "aclImdb"), classes=["neg", "pos"], batch_size=4
    )
    datamodule.setup("fit")
    assert len(datamodule.train_set) == 8 and len(datamodule.val_set) == 8  # type: ignore[arg-type]
    batch = next(iter(datamodule.val_dataloader()))
    logits, labels = tiny_bert().sbp_forward(batch)
    assert logits.shape == (4, 2) and labels.shape == (4,)


def test_text_datamodule_needs_exactly_one_source_and_existing_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one data source"):
        TextClassificationDataModule(tokenizer_name_or_path="unused")
    datamodule = TextClassificationDataModule(tokenizer_name_or_path="unused", data_dir=str(tmp_path / "aclImdb"))
    with pytest.raises(DatasetNotFoundError, match="aclImdb"):
        datamodule.setup("fit")
    datamodule = TextClassificationDataModule(tokenizer_name_or_path="unused", train_file=str(tmp_path / "x.csv"))
    with pytest.raises(DatasetNotFoundError, match=r"x\.csv"):
        datamodule.setup("fit")


def test_text_classifier_needs_a_model_name_or_a_config() -> None:
    with pytest.raises(ValueError, match="model_name_or_path"):
        TextClassifier(model_name_or_path=None)
    with pytest.raises(ValueError, match="model_type"):
        TextClassifier(config={"hidden_size": 8})


def test_a_named_dataset_needs_the_optional_datasets_package(tmp_path: Path) -> None:
    if importlib.util.find_spec("datasets") is not None:
        pytest.skip("the datasets package is installed; this checks the message shown without it")
    datamodule = TextClassificationDataModule(tokenizer_name_or_path=tiny_tokenizer(tmp_path), dataset_name="imdb")
    with pytest.raises(ImportError, match="pip install datasets"):
        datamodule.setup("fit")
