import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import SIGMAS, assert_within, squared_error_tolerance
from torch import nn

from lightning_sbp.functional.grad_error import random_subset_gradient_error, subset_gradient_error
from lightning_sbp.functional.gram import gradient_gram, last_layer_gram

N, D, C = 12, 6, 5


def _per_example_setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients [N, P] of a real linear classifier (by autograd) and their Gram matrix."""
    torch.manual_seed(seed)
    layer = nn.Linear(D, C).double()
    features = torch.randn(N, D, dtype=torch.float64)
    targets = torch.randint(0, C, (N,))
    rows = []
    for i in range(N):
        loss = F.cross_entropy(layer(features[i : i + 1]), targets[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(layer.parameters()))]))
    with torch.no_grad():
        gram = last_layer_gram(features, layer(features), targets)
    return torch.stack(rows), gram


def _explicit_error(grads: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    mean = grads.mean(dim=0)
    subset = (weights.unsqueeze(1) * grads[indices]).sum(dim=0) / indices.shape[0]
    return torch.linalg.vector_norm(subset - mean) / torch.linalg.vector_norm(mean)


@pytest.mark.parametrize(
    ("indices", "weights"),
    [
        ([0, 3, 5, 7], [1.0, 1.0, 1.0, 1.0]),
        ([2, 4, 11], [0.5, 2.0, 0.5]),
        ([1, 1, 6], [1.0, 1.5, 0.5]),  # repeated index, as with sampling with replacement
        (list(range(N)), [1.0] * N),
    ],
)
def test_subset_gradient_error_matches_materialised_gradients(indices: list[int], weights: list[float]) -> None:
    grads, gram = _per_example_setup()
    index_tensor = torch.tensor(indices)
    weight_tensor = torch.tensor(weights, dtype=torch.float64)
    actual = subset_gradient_error(gram, index_tensor, weight_tensor)
    assert actual.ndim == 0
    expected = _explicit_error(grads, index_tensor, weight_tensor)
    # Compared squared: the square root of a form that cancels to 0 (the full batch) has an absolute floor near
    # sqrt(eps), while the squares differ by no more than the form's rounding error.
    tolerance = squared_error_tolerance(gram, index_tensor, weight_tensor, grads.shape[1])
    assert abs(float(actual) ** 2 - float(expected) ** 2) <= tolerance


def test_subset_gradient_error_of_the_full_batch_is_zero() -> None:
    _, gram = _per_example_setup(seed=1)
    # Zero in exact arithmetic: the square root of the form's rounding error, at most the root of its bound.
    error = float(subset_gradient_error(gram, torch.arange(N)))
    assert error**2 <= squared_error_tolerance(gram, torch.arange(N), torch.ones(N, dtype=torch.float64), length=0)


def test_subset_gradient_error_defaults_to_unit_weights() -> None:
    _, gram = _per_example_setup(seed=2)
    indices = torch.tensor([0, 5, 9])
    # The same operations on the same values: bitwise equal.
    ones = torch.ones(3, dtype=torch.float64)
    assert torch.equal(subset_gradient_error(gram, indices), subset_gradient_error(gram, indices, ones))


def test_zero_mean_gradient() -> None:
    # g_0 = -g_1: the mean gradient is zero.
    gram = torch.tensor([[1.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    assert float(subset_gradient_error(gram, torch.tensor([0]))) == math.inf
    assert float(subset_gradient_error(gram, torch.tensor([0, 1]))) == 0.0
    assert float(random_subset_gradient_error(gram, 1)) == math.inf
    assert float(random_subset_gradient_error(gram, 2)) == 0.0
    zeros = torch.zeros(3, 3)
    assert float(subset_gradient_error(zeros, torch.tensor([1]))) == 0.0
    assert float(random_subset_gradient_error(zeros, 1)) == 0.0


@pytest.mark.parametrize("k", [1, 3, 6, 11])
def test_random_subset_gradient_error_matches_monte_carlo(k: int) -> None:
    grads, gram = _per_example_setup(seed=3)
    generator = torch.Generator().manual_seed(k)
    trials = 20_000
    subsets = torch.rand(trials, N, generator=generator).argsort(dim=1)[:, :k]
    mean = grads.mean(dim=0)
    errors_sq = (grads[subsets].mean(dim=1) - mean).square().sum(dim=1) / mean.square().sum()
    closed_form = random_subset_gradient_error(gram, k)
    assert closed_form.ndim == 0
    # The mean squared error over the draws against the square of the closed form, within SIGMAS standard errors.
    assert abs(float(errors_sq.mean()) - float(closed_form) ** 2) <= SIGMAS * float(errors_sq.std()) / trials**0.5


def test_random_subset_gradient_error_of_the_full_batch_is_zero() -> None:
    _, gram = _per_example_setup(seed=4)
    assert float(random_subset_gradient_error(gram, N)) == 0.0
    assert float(random_subset_gradient_error(gram, N - 1)) > 0.0


def test_float32_gram_is_supported() -> None:
    grads, gram = _per_example_setup(seed=5)
    indices = torch.tensor([1, 2, 8])
    weights = torch.tensor([1.0, 0.5, 1.5])
    actual = subset_gradient_error(gram.float(), indices, weights)
    assert actual.dtype == torch.float32
    expected = _explicit_error(grads, indices, weights.double())
    # Squared, within the float32 form's rounding bound (the float64 reference's is far below it), plus the
    # rounding of the Gram matrix to float32, one ulp of each entry.
    tolerance = squared_error_tolerance(gram.float(), indices, weights, grads.shape[1] + 1)
    assert abs(float(actual) ** 2 - float(expected) ** 2) <= tolerance
    assert random_subset_gradient_error(gram.float(), 3).dtype == torch.float32


def test_validation() -> None:
    gram = torch.eye(4)
    with pytest.raises(ValueError, match="square"):
        subset_gradient_error(torch.ones(4, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="indices must have shape"):
        subset_gradient_error(gram, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        subset_gradient_error(gram, torch.tensor([0.0]))
    with pytest.raises(ValueError, match="weights must have the shape"):
        subset_gradient_error(gram, torch.tensor([0, 1]), torch.ones(3))
    for k in (0, 5):
        with pytest.raises(ValueError, match="k must be"):
            random_subset_gradient_error(gram, k)


def _sequence_setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example gradients of a causal-LM head (shifted, padded targets) by autograd, their Gram matrix, and
    the norms of ``Σ_t |p_it| ⊗ [|h_it|, 1]``, which bound the terms the Gram entries sum over positions."""
    torch.manual_seed(seed)
    positions = 5
    layer = nn.Linear(D, C).double()
    features = torch.randn(N, positions, D, dtype=torch.float64)
    targets = torch.randint(0, C, (N, positions))
    targets[torch.rand(N, positions) < 0.25] = -100

    def losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits, targets = logits[:, :-1], targets[:, 1:]
        token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=-100)
        return token.sum(dim=1) / (targets != -100).sum(dim=1).clamp_min(1)

    rows = []
    for i in range(N):
        loss = losses(layer(features[i : i + 1]), targets[i : i + 1]).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(layer.parameters()))]))
    logits = layer(features).detach().requires_grad_(True)
    (logit_grads,) = torch.autograd.grad(losses(logits, targets).sum(), logits)
    with_bias = torch.cat([features.abs(), torch.ones(N, positions, 1, dtype=torch.float64)], dim=2)
    magnitudes = torch.einsum("ntc,ntd->ncd", logit_grads.abs(), with_bias).flatten(1).norm(dim=1)
    return torch.stack(rows), gradient_gram(features, logit_grads), magnitudes


def test_gradient_errors_of_sequence_heads_match_materialised_gradients() -> None:
    grads, gram, magnitudes = _sequence_setup()
    indices, weights = torch.tensor([1, 4, 6, 10]), torch.tensor([0.5, 1.5, 1.0, 1.0], dtype=torch.float64)
    # As for one position, compared squared; the Gram entries sum position pairs that may cancel, so the bound
    # takes the magnitudes of their terms, with the T² (D + 1) C products of each entry as its length.
    length = 5 * 5 * (D + 1) * C
    tolerance = squared_error_tolerance(gram, indices, weights, length, magnitudes)
    actual, expected = subset_gradient_error(gram, indices, weights), _explicit_error(grads, indices, weights)
    assert abs(float(actual) ** 2 - float(expected) ** 2) <= tolerance
    k = 4
    mean = grads.mean(dim=0)
    spread = (grads - mean).square().sum(dim=1).mean()
    expected_sq = (N - k) / (k * (N - 1)) * spread / mean.square().sum()
    # tr(K)/N − 1ᵀK1/N² errs by at most γ (Σ_i ν_i²/N + (Σ_i ν_i/N)²) on either side, as the form above does.
    eps = torch.finfo(torch.float64).eps
    terms = magnitudes.square().mean() + magnitudes.mean().square()
    tolerance = float(2 * (N * N + length) * eps * terms / mean.square().sum())
    assert_within(random_subset_gradient_error(gram, k).square(), expected_sq, tolerance, "random-subset error")
