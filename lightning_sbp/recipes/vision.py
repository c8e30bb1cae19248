"""Image DataModules over torchvision datasets: CIFAR-10, CIFAR-100, SVHN and image folders.

torchvision is imported only when a dataset or transform is built, so the rest of the recipes
work without it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import ConcatDataset, Dataset, Subset

from lightning_sbp.recipes.data import ClassificationDataModule, DatasetNotFoundError, IndexedDataset, split_indices

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ImageFolderDataModule",
    "SVHNDataModule",
    "TorchvisionDataModule",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transforms() -> Any:
    try:
        from torchvision.transforms import v2
    except ImportError as err:
        raise ImportError("the image DataModules need torchvision: pip install 'lightning-sbp[vision]'") from err
    return v2


def _datasets() -> Any:
    try:
        from torchvision import datasets
    except ImportError as err:
        raise ImportError("the image DataModules need torchvision: pip install 'lightning-sbp[vision]'") from err
    return datasets


class TorchvisionDataModule(ClassificationDataModule):
    """Base of the image DataModules: augmentation, validation split, download and missing-data errors.

    Training images get a random crop of ``image_size`` after zero-padding by ``padding`` pixels and,
    when ``flip`` is set, a random horizontal flip; every split is normalised with the dataset's
    channel means and deviations. Items are ``(image [3, H, W], target, index)``.

    Validation: with ``val_split = 0`` (the default) the test split doubles as the validation set,
    as is usual for these benchmarks; with ``val_split > 0`` that fraction of the training set is
    held out (seeded by ``split_seed``, no augmentation, never noisy) and validation no longer sees
    the test split.

    Args:
        data_dir: folder that holds (or will hold, with ``download``) the dataset.
        download: download the dataset into ``data_dir`` when it is missing.
        batch_size: examples per batch.
        num_workers: loader worker processes.
        val_split: fraction of the training set held out for validation, in ``[0, 1)``.
        split_seed: seeds the held-out split.
        augment: apply the training augmentation (crop and flip); off gives plain normalised images.
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seeds which labels flip and to what.
    """

    dataset_label: str = "dataset"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    image_size: int = 32
    padding: int = 4
    flip: bool = True

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        val_split: float = 0.0,
        split_seed: int = 0,
        augment: bool = True,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_noise=label_noise, noise_seed=noise_seed)
        split_indices(0, val_split, 0)  # validates the fraction
        self.data_dir = data_dir
        self.download = download
        self.val_split = val_split
        self.split_seed = split_seed
        self.augment = augment

    def make_dataset(self, split: str, transform: Callable[[Any], Any] | None, download: bool) -> Dataset:
        """The raw torchvision dataset of a split (``train`` or ``test``), items ``(image, target)``.

        Override (or patch) this to serve other data through the same augmentation and noise.
        """
        raise NotImplementedError

    def dataset_path(self) -> Path:
        """Where the dataset's files are expected, for error messages."""
        return Path(self.data_dir)

    def train_transform(self) -> Callable[[Any], Any]:
        """Random crop with padding, optional horizontal flip, then normalisation."""
        v2 = _transforms()
        steps: list[Any] = []
        if self.augment:
            steps.append(v2.RandomCrop(self.image_size, padding=self.padding))
            if self.flip:
                steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps + self._to_tensor())

    def eval_transform(self) -> Callable[[Any], Any]:
        """Normalisation only."""
        return _transforms().Compose(self._to_tensor())

    def _to_tensor(self) -> list[Any]:
        import torch

        v2 = _transforms()
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]

    def _load(self, split: str, transform: Callable[[Any], Any] | None, download: bool = False) -> Dataset:
        try:
            return self.make_dataset(split, transform, download)
        except (RuntimeError, FileNotFoundError) as err:
            if download:
                raise DatasetNotFoundError(
                    f"could not download {self.dataset_label} into '{self.dataset_path()}': {err}"
                ) from None
            raise DatasetNotFoundError(
                f"{self.dataset_label} ({split} split) was not found under '{self.dataset_path()}' ({err}). "
                "Set `download: true` under data init_args (or pass --data.download=true) to download it there, "
                "or point `data_dir` at the folder that holds it."
            ) from None
        except OSError as err:  # network errors while downloading
            raise DatasetNotFoundError(
                f"could not download {self.dataset_label} into '{self.dataset_path()}': {err}"
            ) from None

    def prepare_data(self) -> None:
        """Download the dataset when ``download`` is set (runs once per node)."""
        if self.download:
            for split in ("train", "test"):
                self._load(split, None, download=True)

    def setup(self, stage: str) -> None:
        """Build the splits a stage needs; raise :class:`DatasetNotFoundError` when the data is missing."""
        if stage == "fit" and self.train_set is None:
            train = self._load("train", self.train_transform())
            if self.val_split > 0:
                kept, held = split_indices(len(train), self.val_split, self.split_seed)  # type: ignore[arg-type]
                train = Subset(train, kept.tolist())
            self.train_set = self.with_label_noise(train, self._classes())
        if stage in ("fit", "validate") and self.val_set is None:
            if self.val_split > 0:
                full = self._load("train", self.eval_transform())
                _, held = split_indices(len(full), self.val_split, self.split_seed)  # type: ignore[arg-type]
                self.val_set = self._indexed(Subset(full, held.tolist()))
            else:
                self.val_set = self._indexed(self._load("test", self.eval_transform()))
        if stage == "test" and self.test_set is None:
            self.test_set = self._indexed(self._load("test", self.eval_transform()))

    def _classes(self) -> int:
        if self.num_classes is None:
            raise RuntimeError(f"{type(self).__name__} does not know its number of classes")
        return self.num_classes

    @staticmethod
    def _indexed(dataset: Dataset) -> Dataset:
        return IndexedDataset(dataset)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images of 32x32, 10 classes).

    Augmentation: random 32x32 crop after 4-pixel padding and horizontal flip. Files live in
    ``data_dir/cifar-10-batches-py``. See :class:`TorchvisionDataModule` for the arguments.
    """

    dataset_label = "CIFAR-10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def make_dataset(self, split: str, transform: Callable[[Any], Any] | None, download: bool) -> Dataset:
        """``torchvision.datasets.CIFAR10`` for ``train`` or ``test``."""
        return _datasets().CIFAR10(self.data_dir, train=split == "train", transform=transform, download=download)

    def dataset_path(self) -> Path:
        """``data_dir/cifar-10-batches-py``."""
        return Path(self.data_dir) / "cifar-10-batches-py"


class CIFAR100DataModule(TorchvisionDataModule):
    """CIFAR-100 (50,000 training and 10,000 test images of 32x32, 100 classes).

    Augmentation: random 32x32 crop after 4-pixel padding and horizontal flip. Files live in
    ``data_dir/cifar-100-python``. See :class:`TorchvisionDataModule` for the arguments.
    """

    dataset_label = "CIFAR-100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def make_dataset(self, split: str, transform: Callable[[Any], Any] | None, download: bool) -> Dataset:
        """``torchvision.datasets.CIFAR100`` for ``train`` or ``test``."""
        return _datasets().CIFAR100(self.data_dir, train=split == "train", transform=transform, download=download)

    def dataset_path(self) -> Path:
        """``data_dir/cifar-100-python``."""
        return Path(self.data_dir) / "cifar-100-python"


class SVHNDataModule(TorchvisionDataModule):
    """SVHN street-view house numbers (73,257 training and 26,032 test images of 32x32, 10 classes).

    Augmentation: random 32x32 crop after 4-pixel padding, no flip (digits are not mirror
    symmetric). Files (``train_32x32.mat``, ``test_32x32.mat``, ``extra_32x32.mat``) live directly in
    ``data_dir``; reading them needs scipy.

    Args:
        data_dir: folder that holds (or will hold) the ``.mat`` files.
        download: download missing files into ``data_dir``.
        batch_size: examples per batch.
        num_workers: loader worker processes.
        val_split: fraction of the training set held out for validation; 0 validates on the test split.
        split_seed: seeds the held-out split.
        augment: apply the random crop.
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seeds which labels flip and to what.
        use_extra: add the 531,131 ``extra`` images to the training set.
    """

    dataset_label = "SVHN"
    num_classes = 10
    mean = (0.4377, 0.4438, 0.4728)
    std = (0.1980, 0.2010, 0.1970)
    flip = False

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 4,
        val_split: float = 0.0,
        split_seed: int = 0,
        augment: bool = True,
        label_noise: float = 0.0,
        noise_seed: int = 0,
        use_extra: bool = False,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            download=download,
            batch_size=batch_size,
            num_workers=num_workers,
            val_split=val_split,
            split_seed=split_seed,
            augment=augment,
            label_noise=label_noise,
            noise_seed=noise_seed,
        )
        self.use_extra = use_extra

    def make_dataset(self, split: str, transform: Callable[[Any], Any] | None, download: bool) -> Dataset:
        """``torchvision.datasets.SVHN``; ``train`` includes ``extra`` when ``use_extra`` is set."""
        svhn = _datasets().SVHN
        dataset = svhn(self.data_dir, split=split, transform=transform, download=download)
        if split == "train" and self.use_extra:
            extra = svhn(self.data_dir, split="extra", transform=transform, download=download)
            return ConcatDataset([dataset, extra])
        return dataset


class ImageFolderDataModule(TorchvisionDataModule):
    """Images in class folders, such as downsampled ImageNet (ImageNet-32 or -64) exported as files.

    Expects ``data_dir/train/<class>/*.png`` and ``data_dir/val/<class>/*.png`` (any image format
    PIL reads); classes are the sorted folder names, the same in both splits. ``val/`` serves as
    validation and, unless ``test_dir`` names another folder, as the test split. There is no
    download: convert the dataset to folders first.

    Args:
        data_dir: folder holding the split folders.
        image_size: side of the (square) images; training crops pad by ``image_size // 8``.
        batch_size: examples per batch.
        num_workers: loader worker processes.
        train_dir: name of the training folder under ``data_dir``.
        val_dir: name of the validation folder under ``data_dir``.
        test_dir: name of the test folder; ``None`` tests on ``val_dir``.
        augment: apply random crop and horizontal flip to training images.
        mean: per-channel means used for normalisation (ImageNet's by default).
        std: per-channel standard deviations used for normalisation.
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seeds which labels flip and to what.
    """

    dataset_label = "image folder dataset"

    def __init__(
        self,
        data_dir: str = "data/imagenet32",
        image_size: int = 32,
        batch_size: int = 256,
        num_workers: int = 8,
        train_dir: str = "train",
        val_dir: str = "val",
        test_dir: str | None = None,
        augment: bool = True,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(
            data_dir=data_dir,
            download=False,
            batch_size=batch_size,
            num_workers=num_workers,
            augment=augment,
            label_noise=label_noise,
            noise_seed=noise_seed,
        )
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        self.padding = max(1, image_size // 8)
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.test_dir = test_dir
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.classes: list[str] | None = None

    def _folder(self, split: str) -> Path:
        name = {"train": self.train_dir, "val": self.val_dir, "test": self.test_dir or self.val_dir}[split]
        return Path(self.data_dir) / name

    def make_dataset(self, split: str, transform: Callable[[Any], Any] | None, download: bool) -> Dataset:
        """``torchvision.datasets.ImageFolder`` over the split's folder."""
        dataset = _datasets().ImageFolder(str(self._folder(split)), transform=transform)
        if self.classes is None:
            self.classes = list(dataset.classes)
            self.num_classes = len(self.classes)
        elif list(dataset.classes) != self.classes:
            raise ValueError(
                f"the class folders of '{self._folder(split)}' differ from those of the other splits "
                f"({len(dataset.classes)} against {len(self.classes)} classes)"
            )
        return dataset

    def _load(self, split: str, transform: Callable[[Any], Any] | None, download: bool = False) -> Dataset:
        try:
            return self.make_dataset(split, transform, download)
        except FileNotFoundError as err:
            raise DatasetNotFoundError(
                f"no image folders found for the {split} split at '{self._folder(split)}' ({err}). "
                f"Expected '{self.data_dir}/{self.train_dir}/<class>/<image>' and "
                f"'{self.data_dir}/{self.val_dir}/<class>/<image>'; this DataModule has no download, "
                "so set `data_dir` to the folder that holds them."
            ) from None

    def prepare_data(self) -> None:
        """Nothing to download."""

    def setup(self, stage: str) -> None:
        """Build the splits a stage needs: ``train`` for fitting, ``val`` for validation and testing."""
        if stage == "fit" and self.train_set is None:
            train = self._load("train", self.train_transform())
            self.train_set = self.with_label_noise(train, self._classes())
        if stage in ("fit", "validate") and self.val_set is None:
            self.val_set = self._indexed(self._load("val", self.eval_transform()))
        if stage == "test" and self.test_set is None:
            self.test_set = self._indexed(self._load("test", self.eval_transform()))
