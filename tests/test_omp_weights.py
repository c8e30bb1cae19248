"""OMP weights stay finite and within their bound, whatever the coefficients do, and fall back no worse than random."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import trainer
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_sbp import SelectiveBackprop
from lightning_sbp.functional import omp_gram, random_subset_gradient_error, subset_gradient_error
from lightning_sbp.recipes import flip_labels
from lightning_sbp.recipes.evaluation import ClassifierEvaluation
from lightning_sbp.selectors import OMPSelector, Scores, Selection
from lightning_sbp.selectors.omp import DEFAULT_MAX_WEIGHT, bounded_weights

# Options of every weighting candidate.
SCHEMES: list[dict[str, Any]] = [
    {},
    {"weights": "normalized"},
    {"weights": "normalized", "nonnegative": True},
    {"nonnegative": True},
    {"weights": "normalized", "ridge": 0.1},
    {"ridge": 0.1},
    {"weights": "uniform"},
    {"max_weight": 3.0},
]


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def binary_scores(features: Tensor, scale: Tensor | None = None) -> Scores:
    """Scores of a binary head without bias: logit gradients ``a_i · [1, −1]`` are rank one."""
    n = features.shape[0]
    a = torch.full((n,), 0.5) if scale is None else scale
    logit_grads = a.unsqueeze(1) * torch.tensor([1.0, -1.0])
    return Scores(torch.ones(n), None, logit_grads, features.float(), bias=False)


def cancelling_batch(eta: float) -> Scores:
    """A batch on which OMP with k = 2 picks two nearly collinear atoms with opposite coefficients.

    Atoms (features, all with the same logit gradient): x1 = (1 + eta, 0), x2 = (1, 0.1) and four
    copies of (-0.5, 0). Their mean is (eta / 6, 0.1 / 6): OMP picks x2, then x1, and the fit on the
    two has coefficients ±1/6 whose sum is ``eta``-small (exactly 0 for ``eta = 0``).
    """
    features = torch.tensor([[1.0 + eta, 0.0], [1.0, 0.1]] + [[-0.5, 0.0]] * 4)
    return binary_scores(features)


def assert_bounded(selection: Selection, k: int, max_weight: float) -> None:
    weights = selection.weights
    assert weights.shape == (k,) and weights.dtype == torch.float32
    assert torch.isfinite(weights).all()
    assert float(weights.abs().max()) <= max_weight
    assert torch.equal(selection.stats["max_abs_weight"], weights.abs().amax())
    assert float(selection.stats["negative_weight_share"]) == pytest.approx(float((weights < 0).float().mean()))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("eta", [0.0, 1e-3, -1e-3, 1e-2])
def test_coefficients_that_cancel_fall_back_to_the_clipped_fit_and_are_counted(eta: float, dtype: str) -> None:
    scores = cancelling_batch(eta)
    gram = scores.gram_in(torch.float64)
    indices, coef = omp_gram(gram, gram.mean(dim=1), 2)
    assert indices.tolist() == [1, 0]
    # The premise: the coefficients cancel, so the paper's normalisation explodes (or divides by zero).
    assert float(coef.abs().sum()) > 0.3 and abs(float(coef.sum())) <= abs(eta) / 2 + 1e-12
    unguarded = 2 * coef / coef.sum()
    assert not torch.isfinite(unguarded).all() or float(unguarded.abs().max()) > 50

    selector = OMPSelector(weights="normalized", dtype=dtype)  # type: ignore[arg-type]  # the paper's weights
    selection = selector.select(scores, 2, generator())
    assert_bounded(selection, 2, DEFAULT_MAX_WEIGHT)
    # The fallback: the least-squares weights k * c on the same support (within the bound here), kept
    # because they match the batch gradient better than a random pair would.
    assert selection.indices.tolist() == [1, 0]
    torch.testing.assert_close(selection.weights, 2 * coef.float(), atol=1e-5, rtol=1e-4)
    fallback_error = subset_gradient_error(gram, selection.indices, selection.weights)
    assert fallback_error < random_subset_gradient_error(gram, 2)
    assert float(selection.stats["weight_fallbacks"]) == 1.0 and float(selection.stats["random_fallbacks"]) == 0.0

    # The same coefficients as raw weights are small and used as they are.
    raw = OMPSelector(dtype=dtype).select(scores, 2, generator())  # type: ignore[arg-type]  # the default: raw
    torch.testing.assert_close(raw.weights, 2 * coef.float(), atol=1e-5, rtol=1e-4)
    assert float(raw.stats["weight_fallbacks"]) == 0.0 and float(raw.stats["negative_weight_share"]) == 0.5
    # Non-negative coefficients cannot cancel.
    nonneg = OMPSelector(weights="normalized", nonnegative=True).select(scores, 2, generator())
    assert (nonneg.weights >= 0).all() and float(nonneg.stats["weight_fallbacks"]) == 0.0
    assert float(nonneg.weights.sum()) == pytest.approx(2.0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_fallback_worse_than_random_takes_a_random_subset_from_the_steps_generator(dtype: str) -> None:
    # Identical gradients: any subset with unit weights is exact, random's expected error is 0. OMP puts the
    # whole fit on its first pick (w = k = 16, coefficient 0 for the copies), which breaks the bound; clipped
    # to 8, it gives half the batch gradient, worse than random.
    n, k = 64, 16
    scores = Scores(torch.ones(n), None, torch.tensor([[0.5, -0.5]]).expand(n, 2), torch.ones(n, 3), bias=True)
    selector = OMPSelector(dtype=dtype)  # type: ignore[arg-type]
    selection = selector.select(scores, k, generator())
    assert torch.equal(selection.indices, torch.randperm(n, generator=generator())[:k])
    assert torch.equal(selection.weights, torch.ones(k))
    assert float(selection.stats["weight_fallbacks"]) == 1.0 and float(selection.stats["random_fallbacks"]) == 1.0
    assert float(subset_gradient_error(scores.gram, selection.indices, selection.weights)) == 0.0


def test_the_fallback_counts_accumulate_and_are_checkpointed() -> None:
    selector = OMPSelector(weights="normalized")
    safe = binary_scores(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.5]]))
    identical = Scores(torch.ones(8), None, torch.tensor([[0.5, -0.5]]).expand(8, 2), torch.ones(8, 3), bias=True)
    counts = []
    for scores in (cancelling_batch(0.0), safe, cancelling_batch(1e-3), identical, cancelling_batch(0.0)):
        stats = selector.select(scores, 2, generator()).stats
        counts.append((float(stats["weight_fallbacks"]), float(stats["random_fallbacks"])))
    # On identical gradients the normalised weights are k c / sum(c) = [2, 0], within the bound: no fallback.
    assert counts == [(1.0, 0.0), (1.0, 0.0), (2.0, 0.0), (2.0, 0.0), (3.0, 0.0)]
    assert float(OMPSelector(max_weight=1.5).select(identical, 2, generator()).stats["random_fallbacks"]) == 1.0
    assert selector.state_dict() == {"weight_fallbacks": 3, "random_fallbacks": 0}

    restored = OMPSelector(weights="normalized")
    restored.load_state_dict({"weight_fallbacks": 3, "random_fallbacks": 5})
    stats = restored.select(cancelling_batch(0.0), 2, generator()).stats
    assert (float(stats["weight_fallbacks"]), float(stats["random_fallbacks"])) == (4.0, 5.0)
    assert OMPSelector().state_dict() == {"weight_fallbacks": 0, "random_fallbacks": 0}


def test_bounded_weights_rules() -> None:
    k = 4
    coef = torch.tensor([0.5, 0.3, 0.1, 0.1])
    weights, fell_back = bounded_weights(coef, k, "normalized", 8.0)
    torch.testing.assert_close(weights, k * coef / coef.sum())
    assert not fell_back
    weights, fell_back = bounded_weights(coef, k, "raw", 8.0)
    torch.testing.assert_close(weights, k * coef)
    assert not fell_back
    # One weight above the bound, a non-finite coefficient, a non-positive sum: all fall back to the raw
    # weights k * c clipped to the bound, a non-finite coefficient counting as 0.
    for scheme, bad, replacement in [
        ("normalized", [2.0, -1.0, 0.0, 0.0], [7.9, -4.0, 0.0, 0.0]),  # w = 8, -4: allowed by 8.0, refused by 7.9
        ("raw", [2.0, 0.0, 0.0, 0.0], [7.9, 0.0, 0.0, 0.0]),
        ("raw", [math.nan, 0.1, 0.1, 0.1], [0.0, 0.4, 0.4, 0.4]),
        ("normalized", [math.inf, 0.1, 0.1, 0.1], [0.0, 0.4, 0.4, 0.4]),
        ("normalized", [0.2, -0.2, 0.1, -0.1], [0.8, -0.8, 0.4, -0.4]),
        ("normalized", [-0.2, 0.1, 0.0, 0.0], [-0.8, 0.4, 0.0, 0.0]),
        ("normalized", [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]),
    ]:
        weights, fell_back = bounded_weights(torch.tensor(bad), k, scheme, 7.9)  # type: ignore[arg-type]
        assert fell_back, (scheme, bad)
        torch.testing.assert_close(weights, torch.tensor(replacement))
    weights, fell_back = bounded_weights(torch.tensor([2.0, -1.0, 0.0, 0.0]), k, "normalized", 8.0)
    assert not fell_back and weights.tolist() == [8.0, -4.0, 0.0, 0.0]
    # Uniform never falls back, whatever the coefficients.
    weights, fell_back = bounded_weights(torch.tensor([math.nan, 1e30, 0.0, -1.0]), k, "uniform", 1.0)
    assert not fell_back and torch.equal(weights, torch.ones(k))


def test_a_bound_just_below_a_weight_refuses_it_in_float32() -> None:
    """7.9999999 is 8.0 once rounded to float32: the bound must still refuse a weight of exactly 8."""
    coef = torch.tensor([2.0, -1.0, 0.0, 0.0], dtype=torch.float64)  # normalised weights 8, -4, 0, 0
    weights, fell_back = bounded_weights(coef, 4, "normalized", 7.9999999)
    assert fell_back
    assert weights.dtype == torch.float32 and float(weights.abs().max()) <= 7.9999999
    assert float(weights[0]) == float(torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)))
    # Exactly at the bound is allowed.
    assert not bounded_weights(coef, 4, "normalized", 8.0)[1]


@pytest.mark.parametrize("options", SCHEMES, ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()))
def test_no_weight_above_the_bound_over_many_random_batches(options: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(1)
    selector = OMPSelector(**options)
    bound = selector.max_weight
    fallbacks = 0.0
    for batch in range(24):
        n = 32
        # Binary heads, and clusters of nearly identical examples: the cases in which coefficients cancel.
        centers = torch.randn(4, 6, generator=g)
        features = centers[torch.randint(4, (n,), generator=g)] + 1e-3 * torch.randn(n, 6, generator=g)
        scale = torch.rand(n, generator=g) * torch.where(torch.rand(n, generator=g) < 0.5, 1.0, -1.0)
        scores = binary_scores(features, scale) if batch % 2 else binary_scores(torch.randn(n, 6, generator=g), scale)
        for k in (2, 16):
            selection = selector.select(scores, k, generator())
            assert_bounded(selection, k, bound)
            fell_back = float(selection.stats["weight_fallbacks"]) > fallbacks
            fallbacks = float(selection.stats["weight_fallbacks"])
            if selector.weights != "raw" and not fell_back:
                assert float(selection.weights.sum()) == pytest.approx(k, rel=1e-4)


def test_the_paper_weights_would_break_the_bound_on_such_batches() -> None:
    """The randomised test above is not vacuous: unguarded, the same batches exceed the bound."""
    g = torch.Generator().manual_seed(1)
    largest = 0.0
    fallbacks = OMPSelector(weights="normalized")
    for _ in range(30):
        centers = torch.randn(4, 6, generator=g)
        features = centers[torch.randint(4, (32,), generator=g)] + 1e-3 * torch.randn(32, 6, generator=g)
        scores = binary_scores(features, torch.rand(32, generator=g) - 0.5)
        gram = scores.gram
        _, coef = omp_gram(gram, gram.mean(dim=1), 8)
        largest = max(largest, float((8 * coef / coef.sum()).abs().max()))
        fallbacks.select(scores, 8, generator())
    assert largest > 2 * DEFAULT_MAX_WEIGHT
    assert fallbacks.state_dict()["weight_fallbacks"] > 0


def test_ridge_solves_the_ridge_normal_equations_on_the_support() -> None:
    g = torch.Generator().manual_seed(3)
    features, logit_grads = torch.randn(24, 5, generator=g), torch.randn(24, 3, generator=g)
    scores = Scores(torch.ones(24), None, logit_grads, features, bias=True)
    ridge, k = 0.3, 6
    selection = OMPSelector(weights="raw", ridge=ridge, max_weight=1e6, dtype="float64").select(scores, k, generator())
    gram = scores.gram_in(torch.float64)
    lam = ridge * float(gram.diagonal().mean())
    support = selection.indices
    system = gram[support][:, support] + lam * torch.eye(k, dtype=torch.float64)
    expected = torch.linalg.solve(system, gram.mean(dim=1)[support])
    torch.testing.assert_close(selection.weights.double() / k, expected, rtol=1e-5, atol=1e-7)
    # Ridge shrinks: the unregularised fit on the same support has a larger norm.
    plain = torch.linalg.solve(gram[support][:, support], gram.mean(dim=1)[support])
    assert float(expected.norm()) < float(plain.norm())
    # The scores' cached Gram matrix is left as it was.
    torch.testing.assert_close(scores.gram_in(torch.float64), gram)


class _HostReads(TorchDispatchMode):
    """Counts the operations that read device data on the host."""

    names = ("_local_scalar_dense", "nonzero", "masked_select", "_unique2", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.__name__.split(".")[0] in self.names:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("options", [{}, {"weights": "normalized"}, {"ridge": 0.1, "nonnegative": True}])
def test_selection_with_fallback_reads_nothing_on_the_host(options: dict[str, Any]) -> None:
    selector = OMPSelector(**options)
    scores = cancelling_batch(0.0)
    scores.gram_in(torch.float32)  # the Gram matrix is the callback's; count the selector only
    selector.select(scores, 2, generator())  # creates the counter
    with _HostReads() as reads:
        selection = selector.select(scores, 2, generator())
    assert reads.count == 0
    assert all(value.ndim == 0 for value in selection.stats.values())


# --- training ---------------------------------------------------------------------------------------


class _BinaryMLP(ClassifierEvaluation):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 32), nn.ReLU(), nn.Linear(32, 2))
        self.setup_accuracy(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _cancer_accuracy(selector: OMPSelector, seed: int) -> float:
    from sklearn.datasets import load_breast_cancer

    x, y = (torch.as_tensor(a) for a in load_breast_cancer(return_X_y=True))
    x, y = x.float(), y.long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held = order[:455], order[455:]
    x = (x - x[train].mean(0)) / x[train].std(0)
    noisy = flip_labels(y[train], 0.2, 2, seed=seed).targets
    pl.seed_everything(seed, verbose=False)
    model = _BinaryMLP()
    loaders = (
        DataLoader(TensorDataset(x[train], noisy), 64, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        DataLoader(TensorDataset(x[held], y[held]), 256),
    )
    fit = trainer(
        max_epochs=15,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=15,
        callbacks=[SelectiveBackprop(selector, keep=0.25, seed=seed, track_grad_error=False)],
    )
    fit.fit(model, *loaders)
    return float(fit.callback_metrics["val/acc"])


def test_default_omp_keeps_up_with_uniform_weights_on_a_noisy_binary_task() -> None:
    seeds = (0, 1)
    default = [_cancer_accuracy(OMPSelector(), seed) for seed in seeds]
    uniform = [_cancer_accuracy(OMPSelector(weights="uniform"), seed) for seed in seeds]
    assert min(default) > 0.6  # no collapse on any seed
    assert sum(default) / len(seeds) >= sum(uniform) / len(seeds) - 0.04, (default, uniform)
