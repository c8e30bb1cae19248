from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_sbp.recipes import CIFAR10DataModule, DigitsDataModule, flip_labels


def clean_labels(n: int = 1000, classes: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("n", "fraction"), [(1000, 0.3), (1000, 0.0), (1000, 1.0), (7, 0.5), (10, 0.25)])
def test_flips_exactly_the_requested_fraction_to_other_classes(n: int, fraction: float) -> None:
    labels = clean_labels(n)
    noisy = flip_labels(labels, fraction, num_classes=10, seed=1)
    assert noisy.num_flipped == round(fraction * n)
    assert torch.equal(noisy.flipped, noisy.targets != labels)  # every flip lands on another class
    assert torch.equal(noisy.clean, labels)
    assert noisy.targets.dtype == torch.long and ((noisy.targets >= 0) & (noisy.targets < 10)).all()


def test_does_not_modify_its_input() -> None:
    labels = clean_labels()
    copy = labels.clone()
    flip_labels(labels, 0.5, num_classes=10)
    assert torch.equal(labels, copy)


def test_is_reproducible_and_depends_on_the_seed() -> None:
    labels = clean_labels()
    first = flip_labels(labels, 0.3, num_classes=10, seed=7)
    again = flip_labels(labels.tolist(), 0.3, num_classes=10, seed=7)
    other = flip_labels(labels, 0.3, num_classes=10, seed=8)
    assert torch.equal(first.targets, again.targets)
    assert not torch.equal(first.flipped, other.flipped)


def test_new_classes_are_uniform_over_the_other_classes() -> None:
    labels = torch.zeros(30_000, dtype=torch.long)
    noisy = flip_labels(labels, 1.0, num_classes=4, seed=0)
    counts = torch.bincount(noisy.targets, minlength=4)
    assert counts[0] == 0
    # Each count of 30 000 draws over three classes has a standard deviation of 82, 0.8% of 10 000: 5% is six.
    assert ((counts[1:].float() / 10_000 - 1).abs() < 0.05).all()


def test_flipped_positions_are_spread_over_the_dataset() -> None:
    noisy = flip_labels(clean_labels(1000), 0.5, num_classes=10, seed=0)
    # 500 flips spread uniformly put 250 ± 8 (hypergeometric) in the first half; 50 either way is six of those.
    assert 200 < int(noisy.flipped[:500].sum()) < 300


@pytest.mark.parametrize(
    ("fraction", "classes", "labels", "message"),
    [
        (-0.1, 10, [0, 1], r"\[0, 1\]"),
        (1.5, 10, [0, 1], r"\[0, 1\]"),
        (0.5, 1, [0, 0], "at least 2 classes"),
        (0.5, 3, [0, 3], r"\[0, 3\)"),
    ],
)
def test_rejects_bad_arguments(fraction: float, classes: int, labels: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flip_labels(labels, fraction, num_classes=classes)


# -- in the DataModules ----------------------------------------------------------------------------------


def epoch_labels(datamodule: Any) -> torch.Tensor:
    """The training labels in dataset order, as one epoch of the shuffled loader serves them."""
    labels = torch.full((len(datamodule.train_set),), -1)
    for _, targets, indices in datamodule.train_dataloader():
        labels[indices] = targets
    return labels


def test_digits_noise_is_fixed_across_epochs_and_spares_validation() -> None:
    clean = DigitsDataModule(split_seed=0)
    noisy = DigitsDataModule(split_seed=0, label_noise=0.3, noise_seed=5)
    for datamodule in (clean, noisy):
        datamodule.setup("fit")
    clean_train = epoch_labels(clean)
    first, second = epoch_labels(noisy), epoch_labels(noisy)
    assert torch.equal(first, second)
    assert int((first != clean_train).sum()) == round(0.3 * len(clean_train))
    assert noisy.noisy_labels is not None and torch.equal(noisy.noisy_labels.targets, first)
    val_clean = torch.tensor([target for _, target, _ in clean.val_set])  # type: ignore[union-attr]
    val_noisy = torch.tensor([target for _, target, _ in noisy.val_set])  # type: ignore[union-attr]
    assert torch.equal(val_clean, val_noisy)

    rebuilt = DigitsDataModule(split_seed=0, label_noise=0.3, noise_seed=5)
    rebuilt.setup("fit")
    assert torch.equal(epoch_labels(rebuilt), first)


def test_zero_noise_leaves_labels_alone() -> None:
    datamodule = DigitsDataModule(label_noise=0.0)
    datamodule.setup("fit")
    assert datamodule.noisy_labels is None
    assert torch.equal(epoch_labels(datamodule), datamodule.train_set.dataset.targets)  # type: ignore[union-attr]


def test_torchvision_noise_touches_training_labels_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import FakeData

    def make_dataset(self: Any, split: str, transform: Any, download: bool) -> Any:
        return FakeData(size=40, image_size=(3, 32, 32), num_classes=10, transform=transform, random_offset=0)

    monkeypatch.setattr(CIFAR10DataModule, "make_dataset", make_dataset)
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path), label_noise=0.5, noise_seed=1, num_workers=0)
    datamodule.setup("fit")
    noisy = datamodule.noisy_labels
    assert noisy is not None and noisy.num_flipped == 20
    train_targets = torch.tensor([datamodule.train_set[i][1] for i in range(40)])  # type: ignore[index]
    val_targets = torch.tensor([datamodule.val_set[i][1] for i in range(40)])  # type: ignore[index]
    assert torch.equal(train_targets, noisy.targets)
    assert torch.equal(val_targets, noisy.clean)  # same FakeData items, clean labels


def test_datamodules_reject_a_bad_noise_level() -> None:
    with pytest.raises(ValueError, match="label_noise"):
        DigitsDataModule(label_noise=1.5)
