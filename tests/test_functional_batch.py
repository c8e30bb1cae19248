from collections import namedtuple

import pytest
import torch

from lightning_sbp.functional import batch_size, index_batch, subset_size


def test_subset_size_floors_keeps_a_minimum_and_never_exceeds_the_batch() -> None:
    assert subset_size(0.5, 128) == 64
    assert subset_size(0.29, 100) == 29
    assert subset_size(0.01, 10) == 1
    assert subset_size(0.01, 10, minimum=2) == 2
    assert subset_size(0.5, 1, minimum=2) == 1
    assert subset_size(1.0, 7) == 7


def test_index_batch_takes_rows_of_every_tensor_with_batch_rows_and_keeps_types() -> None:
    Pair = namedtuple("Pair", ["x", "y"])
    batch = {
        "input_ids": torch.arange(12).view(4, 3),
        "labels": torch.tensor([0, 1, 2, 3]),
        "scale": torch.tensor(2.0),
        "vocab": torch.zeros(5),
        "name": "text",
        "nested": [Pair(torch.arange(4), torch.arange(4) * 10)],
    }
    out = index_batch(batch, torch.tensor([3, 1]))
    assert out["input_ids"].tolist() == [[9, 10, 11], [3, 4, 5]]
    assert out["labels"].tolist() == [3, 1]
    assert out["scale"] is batch["scale"] and out["vocab"] is batch["vocab"] and out["name"] == "text"
    assert isinstance(out["nested"][0], Pair) and out["nested"][0].y.tolist() == [30, 10]
    tuple_out = index_batch((torch.arange(4), torch.arange(4) + 1), torch.tensor([0]))
    assert isinstance(tuple_out, tuple) and [t.tolist() for t in tuple_out] == [[0], [1]]


def test_batch_size_reads_the_first_batched_tensor() -> None:
    assert batch_size({"meta": torch.tensor(1.0), "x": torch.zeros(6, 2)}) == 6
    assert batch_size([torch.zeros(3, 1), torch.zeros(3)]) == 3
    with pytest.raises(TypeError, match="override"):
        batch_size({"text": ["a", "b"]})


def test_lists_of_one_plain_value_per_example_are_indexed_with_the_rows() -> None:
    # default_collate turns per-example strings (file paths, raw texts) into a list of N strings.
    batch = {
        "text": ["a", "b", "c", "d"],
        "ids": (10, 11, 12, 13),
        "pair": (torch.arange(4), torch.arange(4) * 2),
        "label": torch.tensor([0, 1, 0, 1]),
        "shape": [8, 8],  # not one per example: another length
    }
    picked = index_batch(batch, torch.tensor([3, 1]))
    assert picked["text"] == ["d", "b"] and picked["ids"] == (13, 11)
    assert torch.equal(picked["pair"][0], torch.tensor([3, 1])) and torch.equal(picked["pair"][1], torch.tensor([6, 2]))
    assert torch.equal(picked["label"], torch.tensor([1, 1])) and picked["shape"] == [8, 8]
