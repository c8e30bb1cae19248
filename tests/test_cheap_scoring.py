"""score_precision, score_scale and stale_epochs: each takes effect, and the subset pass is unchanged."""

from __future__ import annotations

import csv
import platform
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import Indexed, PlainClassifier, SmallCNN, blobs, loader, trainer
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import TensorDataset

from lightning_sbp import SelectiveBackprop
from lightning_sbp.scoring import cpu_has_fast_kernels


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("16", torch.float16)])
def test_score_precision_sets_the_scoring_dtype_only(precision: str, dtype: torch.dtype) -> None:
    model = SmallCNN()
    sbp = SelectiveBackprop("topk", keep=0.5, score_precision=precision, track_grad_error=False)
    trainer(callbacks=[sbp], max_steps=2).fit(model, loader(blobs(64), 16))
    assert model.scoring_dtypes == [dtype, dtype]
    assert model.graph_sizes == [8, 8]
    assert model.head.weight.dtype == torch.float32


@pytest.mark.parametrize("fast", [True, False, None], ids=["fast-kernels", "emulated", "unknown"])
def test_low_precision_scoring_warns_on_a_cpu_without_fast_kernels(
    monkeypatch: pytest.MonkeyPatch, fast: bool | None
) -> None:
    probed: list[torch.dtype] = []
    monkeypatch.setattr("lightning_sbp.scoring.cpu_has_fast_kernels", lambda dtype: probed.append(dtype) or fast)
    sbp = SelectiveBackprop("topk", keep=0.5, score_precision="16", track_grad_error=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[sbp], max_steps=1).fit(SmallCNN(), loader(blobs(32), 16))
    slow = [str(w.message) for w in caught if "no fast torch.float16 kernels" in str(w.message)]
    assert probed == [torch.float16]
    assert len(slow) == (1 if fast is False else 0), slow


def test_cpu_kernel_probe_answers_for_low_precision_dtypes_only() -> None:
    assert cpu_has_fast_kernels(torch.float32) is None
    assert cpu_has_fast_kernels(torch.int8) is None
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2"):
        # oneDNN's bfloat16 and float16 kernels need AVX-512 at least
        assert cpu_has_fast_kernels(torch.bfloat16) is False
        assert cpu_has_fast_kernels(torch.float16) is False
    else:
        assert cpu_has_fast_kernels(torch.bfloat16) in (True, False, None)


def test_score_scale_downscales_what_the_scoring_pass_sees_only() -> None:
    model = SmallCNN()
    sbp = SelectiveBackprop("topk", keep=0.5, score_scale=0.5, track_grad_error=False)
    trainer(callbacks=[sbp], max_steps=2).fit(model, loader(blobs(64, size=8), 16))
    assert model.scoring_shapes == [(16, 1, 4, 4)] * 2
    assert model.graph_sizes == [8, 8]


def test_cheap_scores_are_measured_against_the_true_full_batch() -> None:
    model = SmallCNN()
    sbp = SelectiveBackprop("topk", keep=0.5, score_scale=0.5, score_precision="bf16")
    t = trainer(callbacks=[sbp], max_steps=1, log_every_n_steps=1)
    t.fit(model, loader(blobs(16, size=8), 16))
    assert model.scoring_shapes == [(16, 1, 4, 4), (16, 1, 8, 8)]
    assert model.scoring_dtypes == [torch.bfloat16, torch.float32]
    assert "sbp/grad_error_step" in t.callback_metrics


def test_score_scale_on_inputs_without_spatial_dimensions_names_their_shape() -> None:
    data = TensorDataset(torch.randn(32, 16), torch.randint(3, (32,)))
    with pytest.raises(ValueError, match=r"shape \(16, 16\)"):
        trainer(callbacks=[SelectiveBackprop("topk", keep=0.5, score_scale=0.5)]).fit(
            PlainClassifier(), loader(data, 16)
        )


def test_stale_scores_skip_the_scoring_pass_while_fresh() -> None:
    model = SmallCNN(dropout=0.0)
    sbp = SelectiveBackprop("topk", keep=0.25, stale_epochs=1, track_grad_error=False)
    trainer(callbacks=[sbp], max_epochs=4).fit(model, loader(Indexed(blobs(64)), 16, shuffle=True))
    # epochs 0 and 2 score their 4 batches; epochs 1 and 3 reuse the scores
    assert len(model.scoring_shapes) == 8
    assert model.graph_sizes == [4] * 16
    cache = sbp.score_cache
    assert cache is not None and cache.tensors["losses"].shape == (64,)
    assert cache.scored_epochs.tolist() == [2] * 64


def test_stale_scores_select_from_the_cached_losses() -> None:
    selections: list[list[int]] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            selections.append(sorted(sbp.last_selection.indices.tolist()))

    sbp = SelectiveBackprop("topk", keep=0.25, stale_epochs=1, track_grad_error=False)
    trainer(callbacks=[sbp, Record()], max_epochs=2).fit(SmallCNN(lr=0.0, dropout=0.0), loader(Indexed(blobs(32)), 16))
    # with lr=0 and no shuffling, the reused scores pick exactly what fresh scores picked
    assert selections[2:] == selections[:2]


def test_stale_scores_need_indexed_batches_and_refuse_at_setup() -> None:
    with pytest.raises(ValueError, match="dataset index"):
        trainer(callbacks=[SelectiveBackprop("topk", stale_epochs=1)]).fit(SmallCNN(), loader(blobs(32), 16))


@pytest.mark.parametrize("saved", [True, False])
def test_score_cache_is_in_the_checkpoint_only_when_asked(tmp_path: Path, saved: bool) -> None:
    options = {"keep": 0.25, "stale_epochs": 2, "track_grad_error": False, "checkpoint_score_cache": saved}
    t = trainer(callbacks=[SelectiveBackprop("topk", **options)], max_epochs=1)
    t.fit(SmallCNN(), loader(Indexed(blobs(32)), 16))
    t.save_checkpoint(tmp_path / "one.ckpt")
    resumed_model = SmallCNN()
    trainer(callbacks=[SelectiveBackprop("topk", **options)], max_epochs=2).fit(
        resumed_model, loader(Indexed(blobs(32)), 16), ckpt_path=str(tmp_path / "one.ckpt")
    )
    # With the cache saved, epoch 1 reuses the scores restored from epoch 0; without, it scores again.
    assert len(resumed_model.scoring_shapes) == (0 if saved else 2)
    assert resumed_model.graph_sizes == [4, 4]


def test_with_default_tracking_stale_hits_skip_the_scoring_forward() -> None:
    model = SmallCNN(dropout=0.0)
    sbp = SelectiveBackprop("topk", keep=0.25, stale_epochs=1)
    trainer(callbacks=[sbp], max_epochs=2).fit(model, loader(Indexed(blobs(64)), 16))
    # Epoch 0 scores its 4 batches (tracking reuses those scores); epoch 1 hits the cache on every batch and,
    # with tracking sampled every 64 selective steps, never pays a re-score.
    assert len(model.scoring_shapes) == 4


def test_gradient_errors_are_measured_every_grad_error_every_steps() -> None:
    model = SmallCNN(dropout=0.0)
    measured: list[int] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            assert sbp.step.tracker is not None
            measured.append(int(sbp.step.tracker.grad_error.count))  # batches in the epoch mean so far

    sbp = SelectiveBackprop("topk", keep=0.25, grad_error_every=3, score_scale=0.5)
    trainer(callbacks=[sbp, Record()], max_epochs=1).fit(model, loader(Indexed(blobs(112)), 16))
    assert measured == [1, 1, 1, 2, 2, 2, 3]
    # One cheap scoring pass per step, and a full-cost re-score on the three measured steps only.
    assert len(model.scoring_shapes) == 7 + 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"score_precision": "fp8"}, "'same', 'bf16', '16'"),
        ({"score_scale": 0.0}, r"\(0, 1\]"),
        ({"score_scale": 2}, r"\(0, 1\]"),
        ({"stale_epochs": -1}, "positive integer"),
        ({"stale_epochs": 1.5}, "positive integer"),
        ({"grad_error_every": 0}, "positive integer"),
        ({"score_cache_dtype": "int8"}, "'float32', 'bfloat16', 'float16'"),
        ({"score_cache_placement": "disk"}, "'device' or 'cpu'"),
        ({"checkpoint_score_cache": 1}, "True or False"),
    ],
)
def test_bad_cheap_scoring_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SelectiveBackprop(**kwargs)


def test_the_batch_loss_is_logged_only_on_steps_that_score(tmp_path: Path) -> None:
    # Cached scores are an earlier model's: logged as sbp/full_loss they would repeat the last epoch's curve.
    sbp = SelectiveBackprop("topk", keep=0.25, stale_epochs=1, track_grad_error=False)
    logger = CSVLogger(tmp_path, name="", version="")
    trainer(callbacks=[sbp], max_epochs=2, logger=logger, log_every_n_steps=1).fit(
        SmallCNN(dropout=0.0), loader(Indexed(blobs(32)), 16)
    )
    with (tmp_path / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("sbp/k")]
    logged = {int(row["step"]): (row["sbp/full_loss"] != "", row["sbp/selected_loss"] != "") for row in rows}
    assert logged == {0: (True, True), 1: (True, True), 2: (False, False), 3: (False, False)}


class ShiftedIndices(Indexed):
    """Indices that are not positions in the dataset: counted from ``start``."""

    def __init__(self, dataset: TensorDataset, start: int) -> None:
        super().__init__(dataset)
        self.start = start

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        x, y, _ = super().__getitem__(i)
        return x, y, i + self.start


@pytest.mark.parametrize(("start", "index"), [(10, 41), (-5, -5)])
def test_indices_that_are_not_positions_in_the_dataset_stop_with_the_fix(start: int, index: int) -> None:
    # 32 examples in batches of 16: indices 10..41 overflow in the first batch's store, -5..26 are refused
    # at the first lookup, before a negative index reads another example's stamp.
    sbp = SelectiveBackprop("topk", keep=0.25, stale_epochs=1, track_grad_error=False)
    with pytest.raises(ValueError, match=rf"position in \[0, 32\).*carries index {index}\b.*position in the dataset"):
        trainer(callbacks=[sbp], max_epochs=2).fit(SmallCNN(), loader(ShiftedIndices(blobs(32), start), 16))
