"""Selective Backprop under DDP: two CPU processes, gloo, ``ddp_spawn``.

Each spawned rank writes what it saw (batches, selections, gradients, parameters, metrics) into a
directory; the tests recompute the promised quantities in the main process.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from ddp_models import DDPClassifier, Recorder, SaveAt, ddp_trainer, load_ranks, points, weighted_subset_loss
from tolerances import assert_within, gamma, replay_tolerance
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_sbp import SelectiveBackprop

Records = list[dict[str, Any]]


@pytest.fixture(scope="module")
def omp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Tensor], Records]:
    """Two epochs of 4 selective steps per rank (k = 4 of 16, OMP weights); shared by several tests."""
    out = tmp_path_factory.mktemp("omp_run")
    torch.manual_seed(0)
    model = DDPClassifier()
    initial = copy.deepcopy(model.state_dict())
    sbp = SelectiveBackprop("omp", keep=0.25)
    ddp_trainer(out, callbacks=[sbp, Recorder(str(out))], max_epochs=2).fit(
        model, DataLoader(points(128), batch_size=16)
    )
    return initial, load_ranks(out)


def test_gradient_of_one_step_is_the_mean_over_ranks_of_the_weighted_subset_gradients(
    omp_run: tuple[dict[str, Tensor], Records],
) -> None:
    initial, ranks = omp_run
    firsts = [rank["steps"][0] for rank in ranks]
    assert all(first["step"] == 0 and first["indices"] is not None for first in firsts)
    assert all(first["indices"].shape == (4,) for first in firsts), "every rank keeps the same k"
    # Least-squares weights differ from one by order one, far beyond allclose's float32 rounding allowance.
    assert any(not torch.allclose(first["weights"], torch.ones(4)) for first in firsts), "OMP weighs its subset"
    model = DDPClassifier()
    model.load_state_dict(initial)
    model.train()
    losses = [weighted_subset_loss(model, f["batch"], f["indices"], f["weights"]) for f in firsts]
    names = [name for name, _ in model.named_parameters()]
    expected = torch.autograd.grad(torch.stack(losses).mean(), [p for _, p in model.named_parameters()])
    for first in firsts:
        # The same float32 graph over two ranks' subsets of 4 examples, fan-in 16 at most, averaged by DDP.
        for name, grad in zip(names, expected, strict=True):
            assert_within(first["grads"][name], grad, replay_tolerance(grad, 2 * 4 * 16 + 2), name)


def test_parameters_are_identical_on_both_ranks_after_several_steps(
    omp_run: tuple[dict[str, Tensor], Records],
) -> None:
    initial, ranks = omp_run
    assert [len(rank["steps"]) for rank in ranks] == [8, 8]
    assert all(step["indices"] is not None for rank in ranks for step in rank["steps"])
    for name, param in ranks[0]["params"].items():
        assert torch.equal(param, ranks[1]["params"][name]), name
        assert not torch.equal(param, initial[name]), f"{name} did not train"


Steps = list[list[dict[str, Any]]]


def _mean_loss(steps: Steps) -> float:
    # Lightning's synced epoch mean: the sum over every rank's steps of batch size x value, over the summed sizes.
    total = sum(float(s["loss"]) * s["batch"][0].shape[0] for rank in steps for s in rank)
    return total / sum(s["batch"][0].shape[0] for rank in steps for s in rank)


def _kept(steps: Steps) -> float:
    return float(sum(len(s["indices"]) for rank in steps for s in rank))


def _batch_mean(step_key: str) -> Callable[[Steps], float]:
    # The callback's epoch metrics: the mean, over the selective steps of every rank, of the per-step values.
    def mean(steps: Steps) -> float:
        values = [s["metrics"][step_key] for rank in steps for s in rank if s["indices"] is not None]
        return sum(values) / len(values)

    return mean


# Logged epoch metric -> its recomputation from every rank's steps of the last epoch.
EPOCH_METRICS: dict[str, Callable[[Steps], float]] = {
    "train/loss": _mean_loss,
    "train/kept": _kept,
    "sbp/grad_error_epoch": _batch_mean("sbp/grad_error_step"),
    "sbp/grad_error_random_epoch": _batch_mean("sbp/grad_error_random_step"),
    "sbp/grad_error_ratio_epoch": _batch_mean("sbp/grad_error_ratio_step"),
}


@pytest.mark.parametrize("name", sorted(EPOCH_METRICS))
def test_logged_epoch_metrics_agree_with_a_recomputation_from_both_ranks(
    omp_run: tuple[dict[str, Tensor], Records], name: str
) -> None:
    _, ranks = omp_run
    last_epoch = [[s for s in rank["steps"] if s["step"] >= 4] for rank in ranks]
    assert [len(steps) for steps in last_epoch] == [4, 4]
    expected = EPOCH_METRICS[name](last_epoch)
    # Means of 8 float32 step values (all positive), summed in another order: γ_8 in float32.
    relative = gamma(8 + 2, torch.float32)
    assert ranks[0]["metrics"][name] == pytest.approx(expected, rel=relative)
    assert ranks[1]["metrics"][name] == pytest.approx(expected, rel=relative), "synced: the same value on every rank"


@pytest.mark.parametrize("selector", ["random", "omp"])
def test_uneven_last_batches_train_to_the_end(tmp_path: Path, selector: str) -> None:
    # Rank 0 sees batches of 16, 16, 8; rank 1 of 16, 16, 1: its last batch is too small to select from.
    torch.manual_seed(0)
    sbp = SelectiveBackprop(selector, keep=0.5)
    ddp_trainer(tmp_path, callbacks=[sbp, Recorder(str(tmp_path))], max_epochs=2, use_distributed_sampler=False).fit(
        DDPClassifier(rank_sizes=(40, 33))
    )
    ranks = load_ranks(tmp_path)
    sizes = [[s["batch"][0].shape[0] for s in rank["steps"]] for rank in ranks]
    assert sizes == [[16, 16, 8] * 2, [16, 16, 1] * 2]
    kept = [[len(s["indices"]) for s in rank["steps"]] for rank in ranks]
    assert kept == [[8, 8, 4] * 2, [8, 8, 1] * 2]
    for name, param in ranks[0]["params"].items():
        assert torch.equal(param, ranks[1]["params"][name]), name
    epoch_metrics = {key: value for key, value in ranks[0]["metrics"].items() if key.endswith("_epoch")}
    assert "sbp/grad_error_ratio_epoch" in epoch_metrics
    assert all(math.isfinite(value) for value in epoch_metrics.values()), epoch_metrics
    if selector == "random":
        # Same batch size, different rank: the per-rank generators draw different subsets.
        pairs = zip(ranks[0]["steps"][:2], ranks[1]["steps"][:2], strict=True)
        assert any(set(a["indices"].tolist()) != set(b["indices"].tolist()) for a, b in pairs)


@pytest.mark.parametrize(
    ("selector", "options"),
    [("random", {}), ("loss", {"stale_epochs": 1})],
    ids=["random", "loss-history-and-score-cache"],
)
def test_resume_inside_the_window_reproduces_the_uninterrupted_run(
    tmp_path: Path, selector: str, options: dict[str, Any]
) -> None:
    # random: per-rank draws; loss: each rank's own loss history and score cache come back from the checkpoint
    indexed = TensorDataset(*points(128).tensors, torch.arange(128))

    def run(out: Path, ckpt_path: str | None) -> Records:
        out.mkdir()
        torch.manual_seed(0)
        sbp = SelectiveBackprop(selector, keep=0.25, start=0.1, end=0.9, seed=7, **options)
        callbacks = [sbp, Recorder(str(out)), SaveAt(str(tmp_path / "mid.ckpt"), step=4)]
        ddp_trainer(out, callbacks=callbacks, max_epochs=3).fit(
            DDPClassifier(), DataLoader(indexed, batch_size=16, shuffle=True), ckpt_path=ckpt_path
        )
        return load_ranks(out)

    uninterrupted = run(tmp_path / "full", None)
    resumed = run(tmp_path / "resumed", str(tmp_path / "mid.ckpt"))
    for full, again in zip(uninterrupted, resumed, strict=True):
        assert [s["step"] for s in again["steps"]] == list(range(4, 12))
        for a, b in zip(full["steps"][4:], again["steps"], strict=True):
            assert torch.equal(a["batch"][0], b["batch"][0])
            assert (a["indices"] is None) == (b["indices"] is None)
            if a["indices"] is not None:
                assert torch.equal(a["indices"], b["indices"])
            assert torch.equal(a["loss"], b["loss"]), f"rank {full['rank']}, step {a['step']}"
        for name, param in full["params"].items():
            assert torch.equal(again["params"][name], param), name
    # window [1, 10) of 12 steps: the resumed part selects, then ends the window with full steps
    assert [s["indices"] is not None for s in resumed[0]["steps"]] == [True] * 6 + [False] * 2
    selective = [
        (a, b) for a, b in zip(resumed[0]["steps"], resumed[1]["steps"], strict=True) if a["indices"] is not None
    ]
    assert any(not torch.equal(a["indices"], b["indices"]) for a, b in selective), "ranks draw differently"


def test_stale_scores_are_shared_so_every_rank_skips_scoring_in_the_next_epoch(tmp_path: Path) -> None:
    # Each epoch the sampler deals each rank another half of the data: a rank's next-epoch batches hold
    # examples the other rank scored, so only a cache of every rank's scores can skip their forward.
    torch.manual_seed(0)
    sbp = SelectiveBackprop("loss", keep=0.25, stale_epochs=1, track_grad_error=False)
    indexed = TensorDataset(*points(128).tensors, torch.arange(128))
    ddp_trainer(tmp_path, callbacks=[sbp, Recorder(str(tmp_path))], max_epochs=3).fit(
        DDPClassifier(), DataLoader(indexed, batch_size=16, shuffle=True)
    )
    ranks = load_ranks(tmp_path)
    for rank in ranks:
        scoring = [[n for with_graph, n in s["forwards"] if not with_graph] for s in rank["steps"]]
        assert scoring == [[16]] * 4 + [[]] * 4 + [[16]] * 4, "epochs 0 and 2 score, epoch 1 reuses"
    seen = [{int(i) for s in rank["steps"][:4] for i in s["batch"][2]} for rank in ranks]
    first_in_epoch_1 = {int(i) for i in ranks[0]["steps"][4]["batch"][2]}
    assert first_in_epoch_1 & seen[1] - seen[0], "rank 0 reused scores that rank 1 computed"
