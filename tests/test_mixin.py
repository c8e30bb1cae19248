"""The mixin's place in a module's bases: it never replaces a training step another class defines."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from helpers import loader, trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from tolerances import gamma
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_sbp import SelectiveBackprop, SelectiveBackpropMixin


class Existing(pl.LightningModule):
    """A module someone already has: its own step with label smoothing and its own logging."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 3)
        self.steps: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.steps.append(x.shape[0])
        return F.cross_entropy(self(x), y, label_smoothing=0.1)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class MixinFirst(SelectiveBackpropMixin, Existing):
    pass


class MixinLast(Existing, SelectiveBackpropMixin):
    pass


class OnlyMixinFirst(SelectiveBackpropMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class OnlyMixinLast(pl.LightningModule, SelectiveBackpropMixin):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 32) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 16, generator=generator), torch.randint(3, (n,), generator=generator))


@pytest.mark.parametrize("cls", [MixinFirst, MixinLast])
def test_a_base_classs_training_step_wins_in_either_base_order(cls: type[Existing]) -> None:
    assert cls.training_step is Existing.training_step
    model = cls()
    trainer(callbacks=[SelectiveBackprop("random", keep=0.25, track_grad_error=False)]).fit(model, loader(data(), 16))
    assert model.steps == [4, 4], "the module's own step ran, on the subsets"


@pytest.mark.parametrize("cls", [OnlyMixinFirst, OnlyMixinLast])
def test_the_mixins_step_is_used_when_no_other_class_has_one(cls: type[pl.LightningModule]) -> None:
    assert cls.training_step is SelectiveBackpropMixin.training_step
    model = cls()
    trainer(callbacks=[SelectiveBackprop("omp", keep=0.25)]).fit(model, loader(data(), 16))
    assert model.trainer.global_step == 2


def test_the_modules_own_step_wins_over_its_bases() -> None:
    class Own(SelectiveBackpropMixin, Existing):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return super().training_step(batch, batch_idx) * 2

    class Child(Own):
        pass

    assert Own.training_step is vars(Own)["training_step"]
    assert Child.training_step is vars(Own)["training_step"]


def test_a_lightning_demo_module_keeps_its_step_behind_the_mixin() -> None:
    class Boring(SelectiveBackpropMixin, BoringModel):
        pass

    assert Boring.training_step is BoringModel.training_step


def test_a_weighted_selector_still_refuses_a_base_step_that_never_calls_sbp_reduce() -> None:
    with pytest.raises(RuntimeError, match=r"did not reduce its losses with self\.sbp_reduce"):
        trainer(callbacks=[SelectiveBackprop("omp", keep=0.25)]).fit(MixinFirst(), loader(data(), 16))


class DictRegression(SelectiveBackpropMixin, pl.LightningModule):
    """A regression on dict batches whose per-example losses the test can read back."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.losses: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def sbp_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        losses = (logits.float().squeeze(1) - targets).square()
        self.losses.append(losses.detach())
        return losses

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class StepLosses(pl.Callback):
    """The logged losses of every step, next to the selection's weights."""

    def __init__(self, sbp: SelectiveBackprop) -> None:
        self.sbp = sbp
        self.rows: list[tuple[float, float, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        assert self.sbp.last_selection is not None
        weights = self.sbp.last_selection.weights
        self.rows.append((float(metrics["train/loss"]), float(metrics["train/loss_unweighted"]), weights))


@pytest.mark.parametrize(
    ("selector", "precision"),
    [("omp", "32-true"), ("gradnorm", "32-true"), ("gradnorm", "bf16-mixed"), ("random", "bf16-mixed")],
)
def test_the_step_logs_the_weighted_objective_and_the_plain_mean_loss(selector: str, precision: str) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(64, 16, generator=generator)
    rows = [{"x": x[i], "labels": x[i, :4].sum() + 0.1 * torch.randn((), generator=generator)} for i in range(64)]
    model = DictRegression()
    sbp = SelectiveBackprop(selector, keep=0.25, track_grad_error=False)
    record = StepLosses(sbp)
    fit = trainer(callbacks=[sbp, record], max_epochs=3, log_every_n_steps=1, precision=precision)
    fit.fit(model, torch.utils.data.DataLoader(rows, batch_size=16))
    # The scoring pass also computes losses: the subset pass's are the last of each step.
    subset_losses = [losses for losses in model.losses if losses.shape[0] == 4]
    assert len(subset_losses) == len(record.rows) == 12
    differ = 0
    for (objective, plain, weights), losses in zip(record.rows, subset_losses, strict=True):
        # The same float32 reductions as the step's on the same values, read back through the logger: equal.
        assert plain == float(losses.mean())
        assert objective == float((weights * losses).mean())
        # Two float32 means of 4 terms each round by at most γ_5 of their terms' magnitudes: beyond that, the
        # weighted objective and the plain mean are different quantities.
        rounding = gamma(5, torch.float32) * float((weights.abs() * losses).sum() + losses.sum()) / len(losses)
        differ += abs(objective - plain) > rounding
    if selector == "random":
        assert differ == 0
    else:
        assert differ > 0  # under weighted selectors the two are not the same quantity
