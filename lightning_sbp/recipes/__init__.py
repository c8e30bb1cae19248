"""Ready LightningModules and DataModules for the settings of the Selective Backprop comparison.

Models: :class:`ImageClassifier` (ResNet-18 with the CIFAR stem, wide ResNets, small networks for
the digits), :class:`TextClassifier` (a transformers sequence classifier), and the sequence models with
a loss at every position, :class:`CausalLMModule` and :class:`TokenClassifier`. Data: CIFAR-10/100,
SVHN, image folders (downsampled ImageNet), text classification, and the scikit-learn digits that
need no download. Every DataModule flips a seeded fraction ``label_noise`` of its training labels
and serves ``(input, target, index)`` items (text: dicts with ``labels`` and ``index``);
:class:`GeneratedTokensDataModule` generates token sequences for the sequence models.

torchvision, transformers and scikit-learn are imported only by the classes that need them.
"""

from lightning_sbp.recipes.backbones import available_backbones, build_backbone
from lightning_sbp.recipes.data import ClassificationDataModule, DatasetNotFoundError, IndexedDataset
from lightning_sbp.recipes.digits import DigitsDataModule
from lightning_sbp.recipes.image import ImageClassifier
from lightning_sbp.recipes.label_noise import NoisyLabels, flip_labels
from lightning_sbp.recipes.text import TextClassifier
from lightning_sbp.recipes.text_data import TextClassificationDataModule
from lightning_sbp.recipes.token_data import GeneratedTokensDataModule
from lightning_sbp.recipes.token_level import CausalLMModule, TokenClassifier
from lightning_sbp.recipes.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    ImageFolderDataModule,
    SVHNDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CausalLMModule",
    "ClassificationDataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "GeneratedTokensDataModule",
    "ImageClassifier",
    "ImageFolderDataModule",
    "IndexedDataset",
    "NoisyLabels",
    "SVHNDataModule",
    "TextClassificationDataModule",
    "TextClassifier",
    "TokenClassifier",
    "TorchvisionDataModule",
    "available_backbones",
    "build_backbone",
    "flip_labels",
]
