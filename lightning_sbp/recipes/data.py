"""What every recipe DataModule shares: indexed examples, label noise, loaders, clear missing-data errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from lightning_sbp.recipes.label_noise import NoisyLabels, check_noise_fraction, flip_labels

__all__ = ["ClassificationDataModule", "DatasetNotFoundError", "IndexedDataset", "dataset_targets", "split_indices"]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where the configuration says, and downloading it was not requested or not possible."""


class IndexedDataset(Dataset):
    """A classification dataset whose items are ``(input, target, index)``.

    The index is the position of the example in this dataset, so a batch carries the identity of
    its examples (for per-example statistics kept across epochs).

    Args:
        dataset: a dataset whose items are ``(input, target, ...)``.
        targets: labels that replace the dataset's own (the noisy labels), one per example.
    """

    def __init__(self, dataset: Dataset, targets: Tensor | None = None) -> None:
        self.dataset = dataset
        self.targets = targets
        if targets is not None and len(targets) != len(self):
            raise ValueError(f"got {len(targets)} targets for a dataset of {len(self)} examples")

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        item = self.dataset[index]
        target = item[1] if self.targets is None else int(self.targets[index])
        return item[0], target, index


def dataset_targets(dataset: Dataset) -> Tensor:
    """The labels of a classification dataset as a ``long`` tensor, without loading inputs when possible.

    Reads a ``targets`` or ``labels`` attribute (torchvision datasets), follows ``Subset`` and
    ``ConcatDataset``, and otherwise reads every item.
    """
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_targets(part) for part in dataset.datasets])
    for name in ("targets", "labels"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.long).flatten()
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)  # type: ignore[arg-type]


def split_indices(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded random split of ``range(n)`` into ``(kept, held_out)`` with ``round(fraction * n)`` held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {fraction}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    held = round(fraction * n)
    return order[held:].sort().values, order[:held].sort().values


class ClassificationDataModule(pl.LightningDataModule):
    """Base of the recipe DataModules: loaders over ``(input, target, index)`` datasets and label noise.

    Subclasses build ``train_set``, ``val_set`` and ``test_set`` in ``setup``, passing the training
    set through :meth:`with_label_noise`.

    Args:
        batch_size: examples per batch for training and evaluation.
        num_workers: loader worker processes.
        label_noise: fraction of training labels flipped to another class, in ``[0, 1]``.
        noise_seed: seeds which labels flip and to what.
    """

    num_classes: int | None = None

    def __init__(
        self, batch_size: int = 128, num_workers: int = 0, label_noise: float = 0.0, noise_seed: int = 0
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be non-negative, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.label_noise = check_noise_fraction(label_noise)
        self.noise_seed = noise_seed
        self.noisy_labels: NoisyLabels | None = None
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def with_label_noise(
        self, train_set: Dataset, num_classes: int, labels: Sequence[int] | Tensor | None = None
    ) -> Dataset:
        """``train_set`` as an :class:`IndexedDataset`, with ``label_noise`` of its labels flipped.

        The flipped labels are computed once from ``noise_seed``, kept in :attr:`noisy_labels`, and
        served identically in every epoch.

        Args:
            train_set: the clean training set, items ``(input, target, ...)``.
            num_classes: number of classes to flip among.
            labels: the clean labels, when known without reading the dataset.
        """
        if self.label_noise == 0.0:
            self.noisy_labels = None
            return IndexedDataset(train_set)
        clean = dataset_targets(train_set) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.noisy_labels = flip_labels(clean, self.label_noise, num_classes, seed=self.noise_seed)
        return IndexedDataset(train_set, self.noisy_labels.targets)

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not built this split yet")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            collate_fn=self.collate_fn(),
            # Its own generator, seeded from the run's seed: the order depends on the seed only, not on
            # how many random numbers the model drew (dropout over N or over k examples).
            generator=torch.Generator().manual_seed(torch.initial_seed()) if shuffle else None,
        )

    def collate_fn(self) -> Callable[[list[Any]], Any] | None:
        """The function that makes a batch from a list of items; ``None`` is PyTorch's default collation."""
        return None

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``(inputs, targets, indices)`` from the (possibly noisy) training set.

        The order is a function of the run's seed (``seed_everything``) alone: the loader shuffles
        with its own generator, which nothing else draws from.
        """
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Batches of ``(inputs, targets, indices)`` from the validation set, clean labels."""
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Batches of ``(inputs, targets, indices)`` from the test set, clean labels."""
        return self._loader(self.test_set, shuffle=False)
