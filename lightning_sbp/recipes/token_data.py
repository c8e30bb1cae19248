"""Generated token sequences for causal language modelling and token classification: learnable, no download."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_sbp.functional.loss import IGNORE_INDEX

__all__ = ["GeneratedTokensDataModule", "TokenTask"]

TokenTask = Literal["causal_lm", "token_classification"]
_PAD_ID = 0


class _TokenSequences(Dataset):
    """Dict items ``input_ids``, ``attention_mask``, ``labels`` (``[T]`` each) and ``index``."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor) -> None:
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": self.attention_mask[index],
            "labels": self.labels[index],
            "index": torch.tensor(index),
        }


class GeneratedTokensDataModule(pl.LightningDataModule):
    """Token sequences drawn from a seeded random language, padded to ``seq_len``: a test bed for sequence models.

    Tokens ``1 .. vocab_size - 1`` follow a first-order Markov chain in which every token has ``branching``
    likely successors, so a causal LM can learn to predict them (token 0 pads). Each sequence has a random
    length between ``seq_len // 2`` and ``seq_len``; padded positions have ``attention_mask`` 0 and label
    ``-100``.

    - ``task="causal_lm"``: ``labels`` are the token ids (shift them in the model, as
      :class:`~lightning_sbp.recipes.CausalLMModule` does).
    - ``task="token_classification"``: ``labels`` are one of ``num_labels`` tags per position, a fixed random
      function of the token and its predecessor, so a tagger must look at its context.

    Args:
        task: ``"causal_lm"`` or ``"token_classification"``.
        vocab_size: tokens, padding included, at least 3.
        num_labels: tags of ``token_classification``, at least 2.
        seq_len: maximum sequence length, at least 2.
        branching: likely successors of every token.
        train_size: training sequences.
        val_size: validation sequences (also the test set).
        batch_size: sequences per batch.
        seed: seeds the language and the sequences.

    Raises:
        ValueError: for out-of-range values.
    """

    def __init__(
        self,
        task: TokenTask = "causal_lm",
        vocab_size: int = 64,
        num_labels: int = 5,
        seq_len: int = 32,
        branching: int = 3,
        train_size: int = 512,
        val_size: int = 128,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if task not in ("causal_lm", "token_classification"):
            raise ValueError(f"task must be 'causal_lm' or 'token_classification', got {task!r}")
        for name, value, low in (
            ("vocab_size", vocab_size, 3),
            ("num_labels", num_labels, 2),
            ("seq_len", seq_len, 2),
            ("branching", branching, 1),
            ("train_size", train_size, 1),
            ("val_size", val_size, 1),
            ("batch_size", batch_size, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.task = task
        self.vocab_size = vocab_size
        self.num_labels = num_labels
        self.seq_len = seq_len
        self.branching = branching
        self.train_size = train_size
        self.val_size = val_size
        self.batch_size = batch_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def generate(self, size: int, generator: torch.Generator) -> _TokenSequences:
        """``size`` sequences of the language fixed by ``seed``, drawn with ``generator``."""
        language = torch.Generator().manual_seed(self.seed)
        words = self.vocab_size - 1
        successors = torch.randint(1, self.vocab_size, (self.vocab_size, self.branching), generator=language)
        tags = torch.randint(0, self.num_labels, (self.vocab_size, self.vocab_size), generator=language)

        tokens = torch.empty(size, self.seq_len, dtype=torch.long)
        tokens[:, 0] = torch.randint(1, self.vocab_size, (size,), generator=generator)
        for t in range(1, self.seq_len):
            choice = torch.randint(0, self.branching, (size,), generator=generator)
            follow = successors[tokens[:, t - 1], choice]
            # One step in ten leaves the chain, so that no sequence is fully predictable.
            noise = torch.randint(1, words + 1, (size,), generator=generator)
            tokens[:, t] = torch.where(torch.rand(size, generator=generator) < 0.1, noise, follow)
        lengths = torch.randint(self.seq_len // 2, self.seq_len + 1, (size, 1), generator=generator)
        mask = torch.arange(self.seq_len) < lengths
        input_ids = torch.where(mask, tokens, _PAD_ID)
        if self.task == "causal_lm":
            labels = input_ids
        else:
            previous = torch.cat([torch.zeros(size, 1, dtype=torch.long), tokens[:, :-1]], dim=1)
            labels = tags[previous, tokens]
        labels = torch.where(mask, labels, IGNORE_INDEX)
        return _TokenSequences(input_ids, mask.long(), labels)

    def setup(self, stage: str) -> None:
        """Generate the training and validation sequences (seeded: the same on every process)."""
        if self.train_set is None:
            self.train_set = self.generate(self.train_size, torch.Generator().manual_seed(self.seed + 1))
            self.val_set = self.generate(self.val_size, torch.Generator().manual_seed(self.seed + 2))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches, in an order seeded by ``seed``."""
        assert self.train_set is not None
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in order."""
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        """The validation batches."""
        return self.val_dataloader()
