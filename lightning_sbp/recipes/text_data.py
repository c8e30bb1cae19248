"""Text classification data (IMDB-style folders, CSV/TSV/JSON Lines files, or a ``datasets`` dataset)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from lightning_sbp.recipes.data import ClassificationDataModule, DatasetNotFoundError, IndexedDataset, split_indices

__all__ = ["PadCollator", "TextClassificationDataModule", "TokenizedDataset"]

_PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0}


class TokenizedDataset(Dataset):
    """Tokenised texts with their labels; items are ``(encoding dict, label)``.

    Args:
        encodings: token lists per model input (``input_ids``, ``attention_mask``, ...), one entry per text.
        labels: one class index per text.
    """

    def __init__(self, encodings: dict[str, list[list[int]]], labels: Sequence[int]) -> None:
        self.encodings = encodings
        self.targets = torch.as_tensor(list(labels), dtype=torch.long)

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int) -> tuple[dict[str, list[int]], int]:
        return {key: values[index] for key, values in self.encodings.items()}, int(self.targets[index])


class PadCollator:
    """Batches ``(encoding, label, index)`` items into a dict of right-padded tensors.

    The batch holds every encoding key padded to the longest sequence of the batch
    (``input_ids`` with ``pad_token_id``, masks and token types with 0), plus ``labels`` and ``index``.

    Args:
        pad_token_id: the tokenizer's padding id.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: list[tuple[dict[str, list[int]], int, int]]) -> dict[str, Tensor]:
        """Pad and stack ``items`` into one batch."""
        longest = max(len(encoding["input_ids"]) for encoding, _, _ in items)
        batch: dict[str, Tensor] = {}
        for key in items[0][0]:
            pad = _PAD_VALUES.get(key, self.pad_token_id)
            rows = [encoding[key] + [pad] * (longest - len(encoding[key])) for encoding, _, _ in items]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        batch["labels"] = torch.tensor([label for _, label, _ in items], dtype=torch.long)
        batch["index"] = torch.tensor([index for _, _, index in items], dtype=torch.long)
        return batch


def _read_table(path: Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Texts and raw labels from a ``.csv``, ``.tsv``, ``.jsonl`` or ``.json`` (a list of objects) file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            rows: list[dict[str, Any]] = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle if line.strip()]
    elif suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise ValueError(f"cannot read '{path}': use a .csv, .tsv, .jsonl or .json file")
    for column in (text_column, label_column):
        if rows and column not in rows[0]:
            raise ValueError(f"'{path}' has no column {column!r}; columns: {', '.join(rows[0])}")
    return [str(row[text_column]) for row in rows], [str(row[label_column]) for row in rows]


def _read_folders(root: Path, classes: Sequence[str]) -> tuple[list[str], list[str]]:
    """Texts and labels from ``root/<class>/*.txt`` for the given class folder names."""
    texts: list[str] = []
    labels: list[str] = []
    for name in classes:
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"missing class folder '{folder}'")
        for file in sorted(folder.glob("*.txt")):
            texts.append(file.read_text(encoding="utf-8"))
            labels.append(name)
    return texts, labels


class TextClassificationDataModule(ClassificationDataModule):
    """Texts and labels tokenised with a model's tokenizer; items are dicts of token ids with ``labels`` and ``index``.

    Give exactly one source:

    - ``data_dir`` in the IMDB layout: ``data_dir/train/<class>/*.txt`` and ``data_dir/test/<class>/*.txt``
      (the layout of the extracted ``aclImdb`` archive; pass ``classes: [neg, pos]`` there so that its
      ``unsup`` folder is skipped);
    - ``train_file`` (and optionally ``val_file``, ``test_file``): ``.csv``, ``.tsv``, ``.jsonl`` or ``.json``
      with ``text_column`` and ``label_column``;
    - ``dataset_name``: a dataset loaded with ``datasets.load_dataset`` (needs the optional ``datasets``
      package), with splits ``train`` and ``validation`` or ``test``.

    Labels: integers are used as class indices; other values are mapped through ``classes`` (default:
    the sorted distinct training labels). Validation uses the held-out ``val_split`` of the training set
    when it is positive, otherwise ``val_file``, the ``validation`` split, or else the test split (IMDB has
    no validation split). Texts are truncated to ``max_length`` tokens and padded per batch.

    Args:
        tokenizer_name_or_path: hub name or local folder of the tokenizer (normally the model's).
        data_dir: folder in the IMDB layout.
        train_file: table of training examples.
        val_file: table of validation examples.
        test_file: table of test examples.
        dataset_name: name or path given to ``datasets.load_dataset``.
        dataset_config: configuration name given to ``datasets.load_dataset``.
        text_column: column of the texts in tables and datasets.
        label_column: column of the labels in tables and datasets.
        classes: class names in label order (folder names for ``data_dir``).
        max_length: maximum tokens per text.
        batch_size: examples per batch.
        num_workers: loader worker processes.
        val_split: fraction of the training set held out for validation, in ``[0, 1)``.
        split_seed: seeds the held-out split.
        label_noise: fraction of training labels flipped to another class.
        noise_seed: seeds which labels flip and to what.

    Raises:
        ValueError: when not exactly one source is given, or for out-of-range values.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str = "bert-base-uncased",
        data_dir: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        test_file: str | None = None,
        dataset_name: str | None = None,
        dataset_config: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        classes: list[str] | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        num_workers: int = 0,
        val_split: float = 0.0,
        split_seed: int = 0,
        label_noise: float = 0.0,
        noise_seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, label_noise=label_noise, noise_seed=noise_seed)
        sources = [
            name
            for name, value in (("data_dir", data_dir), ("train_file", train_file), ("dataset_name", dataset_name))
            if value
        ]
        if len(sources) != 1:
            raise ValueError(
                "give exactly one data source among data_dir (IMDB-style folders), train_file (a table) and "
                f"dataset_name (a `datasets` dataset); got {', '.join(sources) if sources else 'none'}"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {max_length}")
        split_indices(0, val_split, 0)
        self.tokenizer_name_or_path = tokenizer_name_or_path
        self.data_dir = data_dir
        self.train_file = train_file
        self.val_file = val_file
        self.test_file = test_file
        self.dataset_name = dataset_name
        self.dataset_config = dataset_config
        self.text_column = text_column
        self.label_column = label_column
        self.classes = list(classes) if classes is not None else None
        self.max_length = max_length
        self.val_split = val_split
        self.split_seed = split_seed
        self.tokenizer: Any = None
        self._full_train: TokenizedDataset | None = None
        self._train_labels_seen = False

    # -- reading ---------------------------------------------------------------------------------------

    def read_split(self, split: str) -> tuple[list[str], list[Any]] | None:
        """Texts and raw labels of ``train``, ``val`` or ``test``, or ``None`` when the source has no such split.

        Raises:
            DatasetNotFoundError: when a folder or file the configuration names does not exist.
        """
        if self.data_dir is not None:
            if split == "val":
                return None
            root = Path(self.data_dir) / split
            train_root = Path(self.data_dir) / "train"
            if self.classes is None and train_root.is_dir():
                self.classes = sorted(entry.name for entry in train_root.iterdir() if entry.is_dir())
            try:
                if not root.is_dir():
                    raise FileNotFoundError(f"missing folder '{root}'")
                return _read_folders(root, self.classes or [])
            except FileNotFoundError as err:
                raise DatasetNotFoundError(
                    f"text data not found under '{self.data_dir}': {err}. Expected the IMDB layout "
                    f"'{self.data_dir}/{{train,test}}/<class>/*.txt'; this DataModule has no download, so set "
                    "`data_dir` to the extracted folder (e.g. aclImdb)."
                ) from None
        if self.train_file is not None:
            name = {"train": self.train_file, "val": self.val_file, "test": self.test_file}[split]
            if name is None:
                return None
            path = Path(name)
            if not path.is_file():
                raise DatasetNotFoundError(
                    f"the {split} file '{path}' does not exist; this DataModule has no download, so set "
                    f"`{split}_file` to an existing .csv, .tsv, .jsonl or .json file."
                )
            return _read_table(path, self.text_column, self.label_column)
        return self._read_hf_split(split)

    def _read_hf_split(self, split: str) -> tuple[list[str], list[Any]] | None:
        loaded = self._load_hf_dataset()
        names = {"train": ["train"], "val": ["validation"], "test": ["test"]}[split]
        name = next((candidate for candidate in names if candidate in loaded), None)
        if name is None:
            return None
        part = loaded[name]
        feature = part.features.get(self.label_column)
        if self.classes is None and getattr(feature, "names", None):
            self.classes = list(feature.names)
        return list(part[self.text_column]), list(part[self.label_column])

    def _load_hf_dataset(self) -> Any:
        try:
            import datasets
        except ImportError as err:
            raise ImportError("dataset_name needs the `datasets` package: pip install datasets") from err
        return datasets.load_dataset(self.dataset_name, self.dataset_config)

    def _label_ids(self, raw: Sequence[Any]) -> list[int]:
        if self.classes is not None and all(str(label) in self.classes for label in raw):
            lookup = {name: i for i, name in enumerate(self.classes)}
            return [lookup[str(label)] for label in raw]
        try:
            return [int(label) for label in raw]
        except ValueError:
            if self.classes is not None:
                unknown = sorted({str(label) for label in raw} - set(self.classes))
                raise ValueError(f"labels {unknown[:5]} are not among classes {self.classes}") from None
            self.classes = sorted({str(label) for label in raw})
            return self._label_ids(raw)

    # -- tokenising ------------------------------------------------------------------------------------

    def load_tokenizer(self) -> Any:
        """The tokenizer, loaded once with ``AutoTokenizer.from_pretrained(tokenizer_name_or_path)``."""
        if self.tokenizer is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as err:
                raise ImportError(
                    "TextClassificationDataModule needs transformers: pip install 'lightning-sbp[text]'"
                ) from err
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
        return self.tokenizer

    def tokenize(self, texts: list[str], labels: list[int]) -> TokenizedDataset:
        """Tokenise ``texts`` (truncated to ``max_length``, unpadded) into a :class:`TokenizedDataset`."""
        encodings = self.load_tokenizer()(texts, truncation=True, max_length=self.max_length)
        keys = [key for key in ("input_ids", "attention_mask", "token_type_ids") if key in encodings]
        return TokenizedDataset({key: list(encodings[key]) for key in keys}, labels)

    def _split(self, split: str) -> TokenizedDataset | None:
        if split == "train":
            self._train_labels_seen = True
        elif self.classes is None and not self._train_labels_seen:
            # String labels of other splits must map to the same ids as the training labels.
            self._train_labels_seen = True
            train = self.read_split("train")
            if train is not None:
                self._label_ids(train[1])
        read = self.read_split(split)
        if read is None:
            return None
        texts, raw = read
        labels = self._label_ids(raw)
        self.num_classes = max(self.num_classes or 2, len(self.classes or []), max(labels, default=0) + 1)
        return self.tokenize(texts, labels)

    # -- Lightning hooks -------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Fetch the tokenizer and a named ``datasets`` dataset once per node, so that ranks find them cached."""
        self.load_tokenizer()
        if self.dataset_name is not None:
            self._load_hf_dataset()

    def setup(self, stage: str) -> None:
        """Read and tokenise the splits a stage needs."""
        if self._full_train is None and (stage == "fit" or self.val_split > 0):
            self._full_train = self._split("train")
            if self._full_train is None:
                raise DatasetNotFoundError("the data source has no training split")
        full = self._full_train
        if stage == "fit" and self.train_set is None and full is not None:
            if self.val_split > 0:
                kept, _ = split_indices(len(full), self.val_split, self.split_seed)
                self.train_set = self.with_label_noise(Subset(full, kept.tolist()), self._classes(), full.targets[kept])
            else:
                self.train_set = self.with_label_noise(full, self._classes(), full.targets)
        if stage in ("fit", "validate") and self.val_set is None:
            if self.val_split > 0 and full is not None:
                _, held = split_indices(len(full), self.val_split, self.split_seed)
                self.val_set = IndexedDataset(Subset(full, held.tolist()))
            else:
                val = self._split("val")
                if val is None:
                    val = self._split("test")
                if val is None:
                    raise DatasetNotFoundError("no validation data: give val_file or test_file, or set val_split > 0")
                self.val_set = IndexedDataset(val)
        if stage == "test" and self.test_set is None:
            test = self._split("test")
            if test is None:
                raise DatasetNotFoundError("no test data: give test_file (or use a source with a test split)")
            self.test_set = IndexedDataset(test)

    def _classes(self) -> int:
        if self.num_classes is None:
            raise RuntimeError("the number of classes is known only after reading a split")
        return self.num_classes

    def collate_fn(self) -> Callable[[list[Any]], Any]:
        """Pad each batch to its longest text with the tokenizer's padding id."""
        pad = self.load_tokenizer().pad_token_id
        return PadCollator(int(pad) if pad is not None else 0)
