"""The GPU path, proved on a CUDA device: no synchronising call in a selective step, CUDA graphs next to a
pinned-memory loader, timings from CUDA events. ``make test-gpu`` runs these (and the ``gpu`` variants of the
mixed-precision tests); without a CUDA device they are skipped.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import Indexed, SmallCNN, blobs, trainer
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_sbp import SelectiveBackprop, available_selectors
from lightning_sbp.functional import omp as omp_module
from lightning_sbp.functional import omp_gram
from lightning_sbp.functional.graphs import WARMUP_CALLS
from lightning_sbp.selectors import get_selector

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make test-gpu)"),
]

SELECTORS = [name for name in available_selectors() if type(get_selector(name)).__module__.startswith("lightning_sbp.")]
BATCH, STEPS = 32, 8


@contextmanager
def synchronising_calls_raise() -> Iterator[None]:
    """Any CUDA call that makes the host wait for the device raises inside the block."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


class NoSyncInSelection(pl.Callback):
    """Runs the selection step of every selective step after the warm-up under ``set_sync_debug_mode("error")``.

    The first steps are warm-up: library handles, the caching allocator, and OMP's CUDA graph, whose capture
    (after its eager warm-up calls) synchronises once by design.
    """

    def __init__(self, sbp: SelectiveBackprop, warmup: int) -> None:
        self.sbp, self.warmup, self.checked = sbp, warmup, 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.sbp.step.run

        def checked(*args: Any, **kwargs: Any) -> Any:
            if trainer.global_step < self.warmup:
                return run(*args, **kwargs)
            self.checked += 1
            with synchronising_calls_raise():
                return run(*args, **kwargs)

        self.sbp.step.run = checked  # type: ignore[method-assign]


@pytest.mark.parametrize("selector", SELECTORS)
@pytest.mark.parametrize(
    "options", [{}, {"stale_epochs": 1}, {"grad_error_every": 1}], ids=["defaults", "stale", "measuring"]
)
def test_selective_steps_make_no_synchronising_call(selector: str, options: dict[str, Any]) -> None:
    sbp = SelectiveBackprop(selector, keep=0.25, **options)
    probe = NoSyncInSelection(sbp, warmup=WARMUP_CALLS + 1)
    data = DataLoader(Indexed(blobs(BATCH * STEPS, size=8)), batch_size=BATCH)
    epochs = 2 if "stale_epochs" in options else 1
    # log_every_n_steps beyond the run: logging reads values on the host by design.
    trainer(accelerator="gpu", callbacks=[sbp, probe], max_epochs=epochs, log_every_n_steps=10_000).fit(
        SmallCNN(), data
    )
    assert probe.checked == epochs * STEPS - WARMUP_CALLS - 1


def test_omp_captures_its_graph_next_to_a_pinned_memory_loader_with_workers() -> None:
    omp_module._GRAPHS.clear()
    sbp = SelectiveBackprop("omp", keep=0.25, track_grad_error=False)
    data = DataLoader(blobs(BATCH * STEPS, size=8), batch_size=BATCH, pin_memory=True, num_workers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(accelerator="gpu", callbacks=[sbp], max_epochs=2).fit(SmallCNN(), data)
    assert not [w for w in caught if "capturing a CUDA graph failed" in str(w.message)]
    assert omp_module._GRAPHS._runners, "the loop was captured once its warm-up calls were done"


def test_replayed_graphs_give_the_eager_loop_s_picks() -> None:
    omp_module._GRAPHS.clear()
    generator = torch.Generator(device="cuda").manual_seed(0)
    for _ in range(WARMUP_CALLS + 3):
        atoms = torch.randn(256, 128, generator=generator, device="cuda")
        gram = atoms.T @ atoms
        target = gram.mean(dim=1)
        indices, coef = omp_gram(gram, target, 32)
        eager_indices, eager_coef = omp_gram(gram, target, 32, cuda_graph=False)
        assert torch.equal(indices, eager_indices)
        torch.testing.assert_close(coef, eager_coef, rtol=0, atol=0)
    assert len(omp_module._GRAPHS._runners) == 1


def test_cuda_graphs_can_be_turned_off() -> None:
    omp_module._GRAPHS.clear()
    sbp = SelectiveBackprop(get_selector("omp", cuda_graph=False), keep=0.25, track_grad_error=False)
    trainer(accelerator="gpu", callbacks=[sbp], max_steps=STEPS).fit(
        SmallCNN(), DataLoader(blobs(BATCH * STEPS, size=8), batch_size=BATCH)
    )
    assert not omp_module._GRAPHS._runners


def test_step_timings_come_from_cuda_events(tmp_path: Path) -> None:
    csv = CSVLogger(tmp_path)
    sbp = SelectiveBackprop("omp", keep=0.25)
    trainer(accelerator="gpu", callbacks=[sbp], logger=csv, log_every_n_steps=1, max_steps=4).fit(
        SmallCNN(), DataLoader(blobs(BATCH * 4, size=8), batch_size=BATCH)
    )
    lines = (Path(csv.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=True)) for line in lines[1:]]
    scores = [float(row["sbp/score_ms"]) for row in rows if row.get("sbp/score_ms")]
    selects = [float(row["sbp/select_ms"]) for row in rows if row.get("sbp/select_ms")]
    assert len(scores) == len(selects) == 4
    assert all(0 < value < 60_000 for value in scores + selects)
