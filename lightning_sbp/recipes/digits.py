"""The 8x8 handwritten digits that scikit-learn ships: a dataset that needs no download."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_sbp.recipes.data import ClassificationDataModule, IndexedDataset

__all__ = ["DigitsDataModule", "load_digits_tensors"]


class _TensorPairs(Dataset):
    """Items ``(images[i], labels[i])`` from two tensors."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.targets = labels

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.targets[index])


def load_digits_tensors() -> tuple[Tensor, Tensor]:
    """All 1,797 digits as ``(images [1797, 1, 8, 8] float in [0, 1], labels [1797] long)``.

    Raises:
        ImportError: without scikit-learn.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("DigitsDataModule needs scikit-learn: pip install 'lightning-sbp[demo]'") from err
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.as_tensor(bunch.target, dtype=torch.long)


def _stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Indices ``(train, held_out)`` holding out ``round(fraction * n_c)`` examples of every class ``c``."""
    generator = torch.Generator().manual_seed(seed)
    train, held = [], []
    for label in torch.unique(labels):
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        count = round(fraction * members.numel())
        held.append(members[:count])
        train.append(members[count:])
    return torch.cat(train).sort().values, torch.cat(held).sort().values


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's 8x8 grey digits (1,797 images, 10 classes), held in memory.

    A stratified, seeded split holds out ``val_fraction`` of every class for validation; the
    digits have no separate test set, so the test loader serves the validation split too. Images
    are scaled to ``[0, 1]``, optionally resized to ``image_size`` (bilinear), and standardised with
    the mean and deviation of the training pixels. Items are ``(image [1, S, S], target, index)``.

    Args:
        image_size: side of the served images; 8 keeps the originals.
        val_fraction: share of every class held out for validation, in ``(0, 1)``.
        split_seed: seeds the split.
        batch_size: examples per batch.
        num_workers: loader worker processes (0 is fastest for data this small).
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seeds which labels flip and to what.
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 8,
        val_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_noise=label_noise, noise_seed=noise_seed)
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed

    def setup(self, stage: str) -> None:
        """Load, split and normalise the digits (once)."""
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors()
        if self.image_size != 8:
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        train_idx, val_idx = _stratified_split(labels, self.val_fraction, self.split_seed)
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std
        train = _TensorPairs(images[train_idx].contiguous(), labels[train_idx])
        self.train_set = self.with_label_noise(train, 10, labels=train.targets)
        self.val_set = IndexedDataset(_TensorPairs(images[val_idx].contiguous(), labels[val_idx]))
        self.test_set = self.val_set
