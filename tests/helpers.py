"""Small models and data shared by the tests."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_sbp import SelectiveBackpropMixin
from lightning_sbp.entry import main as cli_main


def blobs(n: int = 256, classes: int = 4, size: int = 8, seed: int = 0) -> TensorDataset:
    """Images whose class shifts their mean: learnable in a few steps."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(classes, (n,), generator=generator)
    images = torch.randn(n, 1, size, size, generator=generator) + targets.view(-1, 1, 1, 1).float()
    return TensorDataset(images, targets)


class SmallCNN(SelectiveBackpropMixin, pl.LightningModule):
    """A CNN with batch norm and dropout that records how many examples built a graph."""

    def __init__(self, classes: int = 4, lr: float = 0.05, dropout: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Linear(32, classes)
        self.graph_sizes: list[int] = []
        self.backward_sizes: list[int] = []
        self.scoring_shapes: list[tuple[int, ...]] = []
        self.scoring_dtypes: list[torch.dtype] = []

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.body(x))
        if not torch.is_grad_enabled():
            self.scoring_shapes.append(tuple(x.shape))
            self.scoring_dtypes.append(logits.dtype)
        else:
            self.graph_sizes.append(x.shape[0])
            logits.register_hook(lambda grad: self.backward_sizes.append(grad.shape[0]))
        return logits

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PlainClassifier(pl.LightningModule):
    """An unmodified LightningModule with tuple batches."""

    def __init__(self, features: int = 16, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 32), nn.ReLU(), nn.Linear(32, classes))
        self.seen: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.seen.append(x.shape[0])
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def regression_data(n: int = 64, squeeze: bool = False) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=generator)
    y = x @ torch.randn(5, 1, generator=generator) + 0.1 * torch.randn(n, 1, generator=generator)
    return TensorDataset(x, y[:, 0] if squeeze else y)


class Regressor(pl.LightningModule):
    """A plain regression module: one output (squeezed to ``[N]`` or not), trained with the mean squared error."""

    def __init__(self, squeeze: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 1))
        self.squeeze = squeeze

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.squeeze else out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class MixinRegressor(SelectiveBackpropMixin, Regressor):
    """The regression module with the mixin, reducing its per-example squared errors with sbp_reduce."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return self.sbp_reduce(F.mse_loss(self(x), y, reduction="none").mean(dim=1))


class DictDataset(Dataset):
    """Token-like dict examples, as a text pipeline yields them."""

    def __init__(self, n: int = 64, length: int = 6, vocab: int = 20, classes: int = 2) -> None:
        generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(vocab, (n, length), generator=generator)
        self.mask = torch.ones(n, length, dtype=torch.long)
        self.labels = (self.ids[:, 0] % classes).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


class PlainDictClassifier(pl.LightningModule):
    """An unmodified LightningModule with dict batches and a keyword ``forward``; its step takes no batch_idx."""

    def __init__(self, vocab: int = 20, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, 16)
        self.head = nn.Linear(16, classes)
        self.seen: list[int] = []

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.head(self.embed(input_ids, per_sample_weights=None) * attention_mask[:, :1])

    def training_step(self, batch: dict[str, Tensor]) -> Tensor:
        self.seen.append(batch["input_ids"].shape[0])
        logits = self(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Indexed(Dataset):
    """A dataset whose examples carry their own index, as the recipes' datasets do."""

    def __init__(self, dataset: TensorDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x, y = self.dataset[i]
        return x, y, i


def loader(dataset: Dataset, batch_size: int = 32, shuffle: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def trainer(**kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "max_epochs": 1,
    }
    options.update(kwargs)
    return pl.Trainer(**options)


def compare(args: list[str]) -> int:
    """Run ``lightning-sbp compare`` with ``args`` in this process; its exit status."""
    try:
        status = cli_main(["compare", *args])
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return int(status or 0)


def sequence_losses(module: Any, batch: Any) -> Tensor:
    """A ``score_fn`` for Lightning's demo ``LightningTransformer``: per-sequence next-token losses.

    Its ``forward(inputs, target)`` takes the targets too, so the default scoring cannot call it.
    """
    inputs, target = batch
    log_probs = module(inputs, target).view(*target.shape, -1)
    return F.nll_loss(log_probs.movedim(-1, 1), target, reduction="none").mean(dim=1)


def tiny_gpt2_config(vocab_size: int) -> dict[str, Any]:
    """A transformers config of a GPT-2 small enough to train in a test: one layer, 16 features."""
    return {
        "model_type": "gpt2",
        "vocab_size": vocab_size,
        "n_positions": 16,
        "n_embd": 16,
        "n_layer": 1,
        "n_head": 2,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }


def fake_data(image_size: tuple[int, int, int] = (3, 32, 32), size: int = 24, transform: Any = None) -> Any:
    """A ``make_dataset`` for the torchvision DataModules: random images, no files.

    ``transform``, when given, replaces the DataModule's own (whose crops expect the dataset's image size).
    """
    from torchvision.datasets import FakeData

    replacement = transform

    def make_dataset(self: Any, split: str, transform: Any, download: bool) -> Any:
        offset = 0 if split == "train" else 10_000
        return FakeData(
            size=size,
            image_size=image_size,
            num_classes=self.num_classes,
            transform=transform if replacement is None else replacement,
            random_offset=offset,
        )

    return make_dataset


WORDS = ["good", "great", "fine", "bad", "awful", "poor", "the", "movie", "was", "a", "film", "plot"]


def tiny_tokenizer(folder: Path) -> str:
    bert_tokenizer = importlib.import_module("transformers").BertTokenizerFast
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    bert_tokenizer(str(vocab)).save_pretrained(folder / "tokenizer")
    return str(folder / "tokenizer")
