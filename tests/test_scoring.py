"""The scoring pass leaves no trace: random streams, every buffer, and the data order of the recipes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm
from torch.utils.data import DataLoader, TensorDataset

from lightning_sbp import SelectiveBackprop, SelectiveBackpropMixin
from lightning_sbp.recipes import DigitsDataModule
from lightning_sbp.scoring import LastLayerCapture, Scorer, ScoringError


class Counter(nn.Module):
    """A module of the kind users write: it counts the examples it sees in a buffer, in any mode."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_mean", torch.zeros(8))

    def forward(self, x: Tensor) -> Tensor:
        self.seen += x.shape[0]
        self.last_mean = x.mean(dim=0).detach()  # reassigned, not updated in place
        return x


class Stateful(pl.LightningModule):
    """Dropout, batch norm, spectral norm and a counting buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.counter = Counter()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
        self.head = spectral_norm(nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.counter(x)))


def buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: buffer.clone() for name, buffer in model.named_buffers()}


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_every_buffer_and_the_random_stream_are_bit_identical_after_scoring(mode: str) -> None:
    torch.manual_seed(0)
    model = Stateful().train()
    before = buffers(model)
    assert any("_u" in name for name in before), "spectral norm keeps its power-iteration vectors as buffers"
    scorer = Scorer(mode=mode)  # type: ignore[arg-type]
    batch = (torch.randn(16, 8), torch.randint(3, (16,)))
    for _ in range(3):  # the first pass learns which buffers change, the later ones copy only those
        rng = torch.get_rng_state()
        scores = scorer.score(model, batch)
        assert torch.equal(torch.get_rng_state(), rng)
        after = buffers(model)
        assert after.keys() == before.keys()
        for name, value in before.items():
            assert torch.equal(after[name], value), f"{name} changed"
    assert scores.losses.shape == (16,)
    # the same forward outside the scoring pass does change them: the test can fail
    model(batch[0])
    assert not torch.equal(model.counter.seen, before["counter.seen"])
    assert not torch.equal(model.head.parametrizations.weight[0]._u, before["head.parametrizations.weight.0._u"])


def test_a_buffer_that_starts_changing_late_warns_once_and_is_restored_after() -> None:
    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("hits", torch.zeros(()))
            self.armed = False

        def forward(self, x: Tensor) -> Tensor:
            if self.armed:
                self.hits += 1
            return x

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.late = Late()
            self.head = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.late(x))

    model, scorer = Model(), Scorer()
    batch = (torch.randn(4, 4), torch.randint(2, (4,)))
    scorer.score(model, batch)
    model.late.armed = True
    with pytest.warns(UserWarning, match=r"Late\.hits"):
        scorer.score(model, batch)
    assert model.late.hits.item() == 1
    scorer.score(model, batch)
    assert model.late.hits.item() == 1


def test_the_recipes_shuffle_the_same_order_whatever_the_model_draws() -> None:
    def first_indices(draws: int) -> list[int]:
        pl.seed_everything(3, verbose=False)
        data = DigitsDataModule(batch_size=16)
        data.setup("fit")
        torch.rand(draws)  # what a model's dropout would take from the global stream
        batches: Any = iter(data.train_dataloader())
        return next(batches)[2].tolist()

    assert first_indices(0) == first_indices(1000)
    pl.seed_everything(4, verbose=False)
    other = DigitsDataModule(batch_size=16)
    other.setup("fit")
    assert next(iter(other.train_dataloader()))[2].tolist() != first_indices(0), "the order follows the seed"


def test_last_layer_capture_errors_name_the_layer_and_the_fix() -> None:
    layer = nn.Linear(4, 3)
    capture = LastLayerCapture(layer, "head")
    with capture.armed(), pytest.raises(RuntimeError, match=r"'head' did not run.*last_layer="):
        capture.take(torch.zeros(2, 3))
    with capture.armed():
        layer(torch.zeros(2, 4))
    mismatch = r"output of 'head' has shape \(2, 3\).*loss reads have shape \(2, 5\)"
    with pytest.raises(ScoringError, match=mismatch) as info:
        capture.take(torch.zeros(2, 5))
    assert "last_layer=" in str(info.value) and "track_grad_error=False" in str(info.value)
    with pytest.raises(ScoringError, match=r"loss reads have shape \(6,\)") as info:
        capture.take(torch.zeros(6))  # the layer's output reshaped: naming another layer would not help
    assert "last_layer=" not in str(info.value) and "return it as the layer gives it" in str(info.value)
    assert capture.take(capture.outputs).shape == (2, 4)
    assert not layer._forward_hooks, "the hook is removed when disarmed"


def test_a_one_output_head_squeezed_to_n_is_read_as_n_by_1() -> None:
    layer = nn.Linear(4, 1)
    capture = LastLayerCapture(layer, "head")
    features = torch.randn(5, 4)
    with capture.armed():
        outputs = layer(features).squeeze(-1)
    assert torch.equal(capture.take(outputs), features)
    wide = LastLayerCapture(nn.Linear(4, 2), "wide")
    with wide.armed():
        squeezed = wide.layer(features).squeeze(-1)
    with pytest.raises(ScoringError):
        wide.take(squeezed[:, 0])  # one column of two outputs is not the layer's output


class Regression(pl.LightningModule):
    """A regression head with one output, squeezed to ``[N]`` or not."""

    def __init__(self, squeeze: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh())
        self.head = nn.Linear(8, 1)
        self.squeeze = squeeze

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.body(x))
        return out.squeeze(-1) if self.squeeze else out


def test_a_squeezed_head_scores_as_the_same_head_unsqueezed() -> None:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=generator), torch.randn(12, generator=generator)
    scored = {}
    for squeeze in (True, False):
        model, scorer = Regression(squeeze), Scorer()
        scorer.capture = LastLayerCapture(model.head, "head")
        scored[squeeze] = scorer.score(model, (x, y if squeeze else y[:, None]))
    squeezed, column = scored[True], scored[False]
    assert squeezed.logit_grads is not None and squeezed.features is not None
    assert squeezed.logit_grads.shape == squeezed.logits.shape == (12, 1)
    for field in ("losses", "logits", "logit_grads", "features"):
        torch.testing.assert_close(getattr(squeezed, field), getattr(column, field), rtol=0, atol=0)
    # The gradient of the squared error with respect to the one output is 2 (output - target); in float32 the
    # subtraction rounds once (half an ulp, 6e-8 relative) and the doubling is exact.
    expected = 2 * (column.logits.double() - y[:, None].double())
    torch.testing.assert_close(squeezed.logit_grads.double(), expected, rtol=1e-6, atol=1e-7)


class Heads(SelectiveBackpropMixin, pl.LightningModule):
    """An MLP classifier whose forward may change its head's output, or run another same-shaped layer after it."""

    def __init__(self, after: str = "none") -> None:
        super().__init__()
        self.after = after
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)
        if after == "aux":
            self.aux = nn.Linear(8, 3)  # registered last: the default last layer, unless it is named

    def forward(self, x: Tensor) -> Tensor:
        logits = self.fc(self.body(x))
        if self.after == "soft cap":
            return 5 * torch.tanh(logits / 5)
        if self.after == "aux":
            self.aux(x)  # a side output, kept aside
        if self.after == "float":
            return logits.float()
        return logits

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit_heads(module: Heads, **options: Any) -> pl.Trainer:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=generator), torch.randint(3, (64,), generator=generator))
    trainer = _trainer(SelectiveBackprop("omp", keep=0.25, grad_error_every=1, **options))
    trainer.fit(module, DataLoader(data, batch_size=16))
    return trainer


def _trainer(sbp: SelectiveBackprop) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        callbacks=[sbp],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


@pytest.mark.parametrize(
    ("after", "advice"),
    [("soft cap", "changes them after it"), ("aux", "another layer of the same shape runs after it")],
)
def test_a_head_whose_output_the_loss_does_not_read_stops_the_first_step(after: str, advice: str) -> None:
    with pytest.raises(ScoringError, match=advice):
        _fit_heads(Heads(after))


class SoftCapInTheLoss(Heads):
    """The fix the error names for a soft cap: the layer's output from sbp_forward, the cap inside sbp_loss."""

    def __init__(self) -> None:
        super().__init__("soft cap")

    def sbp_forward(self, batch: Any) -> tuple[Tensor, Tensor]:
        return self.fc(self.body(batch[0])), batch[1]

    def sbp_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(5 * torch.tanh(logits / 5), targets, reduction="none")


def test_a_soft_cap_moved_into_the_loss_gives_the_gradients_of_the_capped_loss() -> None:
    torch.manual_seed(0)
    model = SoftCapInTheLoss()
    x, y = torch.randn(10, 8), torch.randint(3, (10,))
    scorer = Scorer()
    scorer.capture = LastLayerCapture(model.fc, "fc")
    scores = scorer.score(model, (x, y))
    with torch.no_grad():
        head = model.fc(model.body(x)).double().requires_grad_(True)
    capped = torch.nn.functional.cross_entropy(5 * torch.tanh(head / 5), y, reduction="sum")
    (reference,) = torch.autograd.grad(capped, head)
    # Each entry is (softmax − onehot) times tanh's derivative, values of magnitude at most 1, each a few float32
    # roundings away (the exponentials, their sum, the division, the tanh): within 16 eps.
    assert scores.logit_grads is not None
    torch.testing.assert_close(scores.logit_grads.double(), reference, rtol=0, atol=16 * torch.finfo(torch.float32).eps)
    measured = _fit_heads(SoftCapInTheLoss()).callback_metrics["sbp/grad_error_epoch"]
    assert torch.isfinite(measured) and float(measured) > 0


def test_naming_the_layer_the_loss_reads_measures_its_gradients() -> None:
    measured = _fit_heads(Heads("aux"), last_layer="fc").callback_metrics["sbp/grad_error_epoch"]
    assert torch.isfinite(measured) and float(measured) > 0


def test_a_copy_of_the_head_s_output_is_accepted() -> None:
    # Models that return logits.float() give the loss a copy with the layer's values: that is the layer's output.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        capture = LastLayerCapture(nn.Linear(4, 3), "head")
        with capture.armed():
            logits = capture.layer(torch.randn(5, 4)).float()
    assert logits.data_ptr() != capture.outputs.data_ptr()
    assert capture.take(logits) is capture.features and capture.verified
    capture.outputs = capture.outputs + 1  # a changed head output is refused before the first check only
    assert capture.take(logits) is capture.features


class NormalisedNet(pl.LightningModule):
    """Lightning's demo Net and PyTorch's MNIST example: (log-)probabilities after the head, trained by NLL."""

    def __init__(self, normaliser: str) -> None:
        super().__init__()
        self.normaliser = getattr(torch, normaliser)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.fc = nn.Linear(16, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.normaliser(self.fc(self.body(x)), dim=-1)


def _nll_of_log_probabilities(log_p: Tensor, targets: Tensor) -> Tensor:
    return torch.nn.functional.nll_loss(log_p, targets, reduction="none")


def _nll_of_probabilities(p: Tensor, targets: Tensor) -> Tensor:
    return torch.nn.functional.nll_loss(p.log(), targets, reduction="none")


@pytest.mark.parametrize(
    ("normaliser", "loss_fn"), [("log_softmax", _nll_of_log_probabilities), ("softmax", _nll_of_probabilities)]
)
def test_probabilities_after_the_head_give_the_gradients_with_respect_to_the_head(
    normaliser: str, loss_fn: Any
) -> None:
    # With an NLL loss on log_softmax(z), the gradient the last layer sees is softmax(z) - onehot(y); the gradient
    # with respect to the (log-)probabilities alone would be wrong in every entry.
    torch.manual_seed(0)
    model = NormalisedNet(normaliser)
    x, y = torch.randn(10, 8), torch.randint(3, (10,))
    scorer = Scorer(loss_fn=loss_fn)
    scorer.capture = LastLayerCapture(model.fc, "fc")
    scores = scorer.score(model, (x, y))
    assert scores.logit_grads is not None and scorer.capture.normaliser is not None
    with torch.no_grad():
        features = model.body(x)
        head = model.fc(features).double().requires_grad_(True)
    (reference,) = torch.autograd.grad(
        torch.nn.functional.nll_loss(torch.log_softmax(head, -1), y, reduction="sum"), head
    )
    # Each entry is a float32 softmax (a few roundings of values below 1; through the logarithm of a float32
    # probability, a few more relative to it) less 0 or 1: absolute error within 16 eps.
    torch.testing.assert_close(scores.logit_grads.double(), reference, rtol=0, atol=16 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(scores.features, features, rtol=0, atol=0)


class PooledHead(SelectiveBackpropMixin, pl.LightningModule):
    """A decoder classifier's layout: a head at every position, then the last position's row is the output."""

    def __init__(self, pool: bool = True) -> None:
        super().__init__()
        self.pool = pool
        self.embed = nn.Linear(4, 8)
        self.score = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        per_position = self.score(torch.relu(self.embed(x)))  # [N, T, 2]
        return per_position[:, -1] if self.pool else per_position

    def sbp_forward(self, batch: Any) -> tuple[Tensor, Tensor]:
        if self.pool:
            return super().sbp_forward(batch)
        # The fix the error names: the per-position outputs, with targets only at the pooled position.
        x, y = batch[0], batch[1]
        targets = torch.full(x.shape[:2], -100, dtype=torch.long, device=x.device)
        targets[:, -1] = y
        return self(x), targets

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch[0], batch[1]
        logits = self(x)
        logits = logits if self.pool else logits[:, -1]
        return self.sbp_reduce(torch.nn.functional.cross_entropy(logits, y, reduction="none"))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_head_pooled_after_the_last_layer_stops_with_the_fix_that_works() -> None:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 5, 4, generator=generator), torch.randint(2, (64,), generator=generator))

    def fit(module: PooledHead) -> pl.Trainer:
        trainer = _trainer(SelectiveBackprop("omp", keep=0.25, grad_error_every=1))
        trainer.fit(module, DataLoader(data, batch_size=16))
        return trainer

    with pytest.raises(ScoringError, match="pools it into the outputs the loss reads"):
        fit(PooledHead(pool=True))
    measured = fit(PooledHead(pool=False)).callback_metrics["sbp/grad_error_epoch"]
    assert torch.isfinite(measured) and float(measured) > 0
