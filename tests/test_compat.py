"""Selective Backprop with the training features people already use, each checked to have taken effect."""

from __future__ import annotations

import copy
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from ddp_models import (
    START_METHOD,
    DDPClassifier,
    GlooSyncBatchNorm,
    GlooSyncBatchNormPlugin,
    Recorder,
    ddp_trainer,
    load_ranks,
    points,
    weighted_subset_loss,
)
from helpers import trainer
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from tolerances import assert_within, gamma, replay_tolerance
from torch import Tensor
from torch._dynamo.utils import counters
from torch.utils.data import DataLoader

from lightning_sbp import SelectiveBackprop


def data(n: int = 128, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(points(n), batch_size=batch_size, shuffle=shuffle)


class Steps(pl.Callback):
    """Per batch: the batch, the selection and the learning rate; per optimiser step: gradients and parameters."""

    def __init__(self, sbp: SelectiveBackprop) -> None:
        self.sbp = sbp
        self.batches: list[dict[str, Any]] = []
        self.optimizer_steps: list[dict[str, Any]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self.sbp.last_selection = None
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.batches.append({"step": trainer.global_step, "batch": [t.clone() for t in batch], "lr": lr})

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.batches[-1]["selection"] = self.sbp.last_selection

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, *args: Any) -> None:
        self.optimizer_steps.append(
            {
                "grads": {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None},
                "params": copy.deepcopy(module.state_dict()),
            }
        )


def grad_norm(parameters: Any) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])))


def test_bf16_mixed_scores_in_bf16_and_still_learns() -> None:
    class Probe(DDPClassifier):
        def __init__(self) -> None:
            super().__init__(lr=0.1)
            self.dtypes: list[tuple[bool, torch.dtype]] = []

        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            self.dtypes.append((torch.is_grad_enabled(), out.dtype))
            return out

    torch.manual_seed(0)
    model = Probe()
    dataset = points(256)
    inputs, targets = dataset.tensors

    def loss_and_accuracy() -> tuple[float, float]:
        with torch.no_grad():
            logits = model.head(model.body(inputs))
        return float(F.cross_entropy(logits, targets)), float((logits.argmax(dim=1) == targets).float().mean())

    loss_before, accuracy_before = loss_and_accuracy()
    sbp = SelectiveBackprop("topk", keep=0.5)
    trainer(callbacks=[sbp], precision="bf16-mixed", max_epochs=3).fit(
        model, DataLoader(dataset, batch_size=32, shuffle=True)
    )
    scoring = [dtype for grad, dtype in model.dtypes if not grad]
    subset = [dtype for grad, dtype in model.dtypes if grad]
    assert scoring == [torch.bfloat16] * 24, "every scoring pass ran under bf16 autocast"
    assert subset == [torch.bfloat16] * 24
    assert sbp.examples_backpropagated == 384
    loss, accuracy = loss_and_accuracy()
    assert accuracy_before < 0.4 and accuracy > 0.6, "training on bf16 subsets learns"
    assert loss < 0.85 * loss_before


def test_accumulation_selects_on_every_micro_batch_and_averages_their_gradients() -> None:
    torch.manual_seed(0)
    model = DDPClassifier()
    sbp = SelectiveBackprop("random", keep=0.5)
    steps = Steps(sbp)
    trainer(callbacks=[sbp, steps], accumulate_grad_batches=2, max_steps=2).fit(model, data(64))
    assert [b["step"] for b in steps.batches] == [0, 0, 1, 1]
    assert len(steps.optimizer_steps) == 2, "the optimiser steps once per two micro-batches"
    assert all(b["selection"] is not None and len(b["selection"].indices) == 8 for b in steps.batches)
    first, second = steps.batches[0]["selection"], steps.batches[1]["selection"]
    assert set(first.indices.tolist()) != set(second.indices.tolist()), "micro-batches of one step draw anew"
    for index, recorded in enumerate(steps.optimizer_steps):
        replay = DDPClassifier()
        replay.load_state_dict(recorded["params"])
        micro = steps.batches[2 * index : 2 * index + 2]
        losses = [
            weighted_subset_loss(replay, b["batch"], b["selection"].indices, b["selection"].weights) for b in micro
        ]
        expected = torch.autograd.grad(torch.stack(losses).mean(), list(replay.parameters()))
        # The same float32 graph over two micro-batches of 8 examples, fan-in 16 at most.
        for (name, _), grad in zip(replay.named_parameters(), expected, strict=True):
            assert_within(recorded["grads"][name], grad, replay_tolerance(grad, 2 * 8 * 16), name)


class NormRecordingSGD(torch.optim.SGD):
    """SGD that records the gradient norm it applies: after Lightning's closure, so after clipping."""

    norms: list[float]

    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.norms.append(grad_norm(p for group in self.param_groups for p in group["params"]))
        super().step()
        return loss


class Clipped(DDPClassifier):
    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.norms_before_clipping: list[float] = []

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        self.norms_before_clipping.append(grad_norm(self.parameters()))

    def configure_optimizers(self) -> Any:
        optimizer = NormRecordingSGD(self.parameters(), lr=self.lr)
        optimizer.norms = []
        return optimizer


def test_gradient_clipping_bounds_the_norm_the_optimiser_applies() -> None:
    torch.manual_seed(0)
    model = Clipped()
    sbp = SelectiveBackprop("topk", keep=0.25)
    run = trainer(callbacks=[sbp], gradient_clip_val=0.05, gradient_clip_algorithm="norm", max_steps=4)
    run.fit(model, data(64))
    applied = run.optimizers[0].norms  # type: ignore[attr-defined]
    assert len(applied) == len(model.norms_before_clipping) == 4
    assert sbp.examples_backpropagated == 16, "every step selected"
    assert all(norm > 0.1 for norm in model.norms_before_clipping), "the clip had something to clip"
    # Scaled by 0.05 / (‖g‖ + 1e-6), Lightning's clip: 2e-5 below 0.05 relative; plus the float32 norms of a
    # few hundred entries, before and after.
    assert applied == pytest.approx([0.05] * 4, rel=1e-6 / 0.1 + 2 * gamma(1000, torch.float32))


def test_learning_rate_scheduler_stepped_per_step() -> None:
    class Scheduled(DDPClassifier):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    sbp = SelectiveBackprop("random", keep=0.5)
    steps = Steps(sbp)
    trainer(callbacks=[sbp, steps], max_steps=4).fit(Scheduled(), data(64))
    # Halvings of 0.1 in float64: exact up to the rounding of 0.1 itself.
    assert [b["lr"] for b in steps.batches] == pytest.approx([0.1, 0.05, 0.025, 0.0125], rel=gamma(4, torch.float64))
    assert all(b["selection"] is not None for b in steps.batches)


class Plain(DDPClassifier):
    """Without the recording forward, whose growing lists would make any compiled caller recompile."""

    def __init__(self, compile_body: bool = False) -> None:
        super().__init__(batch_norm=True)
        if compile_body:
            self.body = torch.compile(self.body, backend="eager")  # type: ignore[assignment]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Graphs(pl.Callback):
    """The number of graphs dynamo has compiled so far, after every batch."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.counts.append(counters["stats"]["unique_graphs"])


@pytest.mark.parametrize(
    ("how", "warm_up"),
    [
        # the scoring pass (no grad, 16 rows) and the subset pass (grad, 4 rows): two graphs in the first step
        ("submodule", 1),
        # Lightning compiles forward and training_step; its int batch_idx turns dynamic at the second step
        ("module", 2),
    ],
)
def test_compiled_model_does_not_recompile_after_warm_up(how: str, warm_up: int) -> None:
    # The eager backend keeps the test fast; dynamo's guards and recompiles do not depend on the backend.
    torch._dynamo.reset()
    counters.clear()
    model: Any = Plain(compile_body=True) if how == "submodule" else torch.compile(Plain(), backend="eager")
    sbp = SelectiveBackprop("omp", keep=0.25)
    steps, graphs = Steps(sbp), Graphs()
    trainer(callbacks=[sbp, steps, graphs], max_steps=8).fit(model, data(128))
    assert all(len(b["selection"].indices) == 4 for b in steps.batches), "k is fixed for a fixed batch size"
    assert graphs.counts[0] > 0, "the model ran compiled"
    assert graphs.counts[warm_up - 1 :] == [graphs.counts[warm_up - 1]] * (9 - warm_up), graphs.counts


def test_sync_batch_norm_scoring_leaves_running_stats_alone_and_ranks_stay_in_step(tmp_path: Path) -> None:
    # Rank 0's last batch has 4 rows and selects 2; rank 1's has 2, too few to select from, and trains on both:
    # every rank still runs a scoring pass, so the batch-norm collectives pair up.
    torch.manual_seed(0)
    sbp = SelectiveBackprop("random", keep=0.5, grad_error_every=1)
    run = ddp_trainer(
        tmp_path,
        callbacks=[sbp, Recorder(str(tmp_path))],
        sync_batchnorm=True,
        plugins=[GlooSyncBatchNormPlugin()],
        use_distributed_sampler=False,
    )
    run.fit(DDPClassifier(batch_norm=True, rank_sizes=(36, 34)))
    ranks = load_ranks(tmp_path)
    assert all(GlooSyncBatchNorm.__name__ in rank["module_types"] for rank in ranks)
    assert [[s["forwards"] for s in rank["steps"]] for rank in ranks] == [
        [[(False, 16), (True, 8)], [(False, 16), (True, 8)], [(False, 4), (True, 2)]],
        [[(False, 16), (True, 8)], [(False, 16), (True, 8)], [(False, 2), (True, 2)]],
    ]
    for rank in ranks:
        for step in rank["steps"]:
            for name, before in step["buffers_before"].items():
                assert torch.equal(step["buffers_before_subset"][name], before), f"scoring pass changed {name}"
            tracked = "body.1.num_batches_tracked"
            assert step["buffers_after"][tracked] == step["buffers_before"][tracked] + 1
    for name, buffer in ranks[0]["steps"][-1]["buffers_after"].items():
        assert torch.equal(buffer, ranks[1]["steps"][-1]["buffers_after"][name]), f"{name} not synced"
    for name, param in ranks[0]["params"].items():
        assert torch.equal(param, ranks[1]["params"][name]), name


class Manual(DDPClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimisation_is_refused_at_setup() -> None:
    with pytest.raises(ValueError, match=r"manual optimisation \(automatic_optimization=False\)"):
        trainer(callbacks=[SelectiveBackprop("random")], max_steps=1).fit(Manual(), data(32))


class FakeDeepSpeed(DeepSpeedStrategy):
    """A DeepSpeed strategy as far as ``isinstance`` can tell, without DeepSpeed installed."""

    def __init__(self) -> None:
        pass


@pytest.mark.parametrize("strategy", [FSDPStrategy, FakeDeepSpeed], ids=["fsdp", "deepspeed"])
def test_sharded_strategies_are_refused_at_setup_naming_the_supported_ones(strategy: type[Strategy]) -> None:
    # Lightning refuses FSDP on CPU and DeepSpeed is not installed: hand setup a trainer holding the strategy.
    model = DDPClassifier()
    with pytest.raises(ValueError, match=rf"does not support {strategy.__name__}.*Supported strategies.*'ddp'"):
        SelectiveBackprop("random").setup(SimpleNamespace(strategy=strategy()), model, "fit")  # type: ignore[arg-type]
    assert "training_step" not in model.__dict__, "refused before patching the module"


def test_an_untested_strategy_is_served_with_a_warning() -> None:
    class Custom(Strategy):
        def __init__(self) -> None:
            pass

    Custom.__abstractmethods__ = frozenset()
    sbp = SelectiveBackprop("random")
    model = DDPClassifier()
    with pytest.warns(UserWarning, match="tested on a single device and with DDP, not with Custom"):
        sbp.setup(SimpleNamespace(strategy=Custom()), model, "fit")  # type: ignore[abstract,arg-type]
    sbp.teardown(None, model, "fit")  # type: ignore[arg-type]


class Ranks(DDPStrategy):
    """A DDP strategy as far as setup can tell, with a fixed number of ranks on one kind of device and no processes."""

    def __init__(self, world_size: int, device: str = "cpu") -> None:
        super().__init__()
        self._world_size = world_size
        self._device = torch.device(device)

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def root_device(self) -> torch.device:
        return self._device


def test_ranks_that_share_one_copy_of_the_cpu_parameters_are_refused_at_setup() -> None:
    model = DDPClassifier()
    model.head.weight.share_memory_()
    sbp = SelectiveBackprop("random")
    with pytest.raises(ValueError, match=r"1 parameters of DDPClassifier \(first: 'head.weight'\) are in memory"):
        sbp.setup(SimpleNamespace(strategy=Ranks(2)), model, "fit")  # type: ignore[arg-type]
    # one process may keep its weights in shared memory; so may GPU ranks, which each move the module to their device
    for alone in (Ranks(1), Ranks(2, device="cuda")):
        sbp.setup(SimpleNamespace(strategy=alone), model, "fit")  # type: ignore[arg-type]
        sbp.teardown(None, model, "fit")  # type: ignore[arg-type]
    # and CPU ranks once each holds its own copy
    model.head.weight.data = model.head.weight.data.clone()
    sbp.setup(SimpleNamespace(strategy=Ranks(2)), model, "fit")  # type: ignore[arg-type]
    sbp.teardown(None, model, "fit")  # type: ignore[arg-type]


@pytest.mark.skipif(START_METHOD != "forkserver", reason="Lightning unshares the parameters of spawned ranks")
def test_forkserver_ranks_on_cpu_would_step_one_shared_copy_of_the_weights(tmp_path: Path) -> None:
    # Lightning's own DDPStrategy, without the test suite's copy of the module in each rank.
    strategy = DDPStrategy(start_method="forkserver", process_group_backend="gloo", timeout=timedelta(seconds=60))
    with pytest.raises(Exception, match="are in memory shared by all ranks"):
        ddp_trainer(tmp_path, strategy=strategy, callbacks=[SelectiveBackprop("random")]).fit(DDPClassifier(), data(64))
