import math

import pytest
import torch
import torch.nn.functional as F
from helpers import squared_error_tolerance
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
    assert float(subset_gradient_error(gram, torch.arange(N))) == pytest.approx(0.0, abs=1e-6)


def test_subset_gradient_error_defaults_to_unit_weights() -> None:
    _, gram = _per_example_setup(seed=2)
    indices = torch.tensor([0, 5, 9])
    torch.testing.assert_close(
        subset_gradient_error(gram, indices), subset_gradient_error(gram, indices, torch.ones(3, dtype=torch.float64))
    )


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
    monte_carlo = errors_sq.mean().sqrt()
    closed_form = random_subset_gradient_error(gram, k)
    assert closed_form.ndim == 0
    assert float(closed_form) == pytest.approx(float(monte_carlo), rel=0.02)


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
    torch.testing.assert_close(actual.double(), expected, rtol=1e-4, atol=1e-5)
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


def _sequence_setup(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example gradients of a causal-LM head (shifted, padded targets) by autograd, and their Gram matrix."""
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
    return torch.stack(rows), gradient_gram(features, logit_grads)


def test_gradient_errors_of_sequence_heads_match_materialised_gradients() -> None:
    grads, gram = _sequence_setup()
    indices, weights = torch.tensor([1, 4, 6, 10]), torch.tensor([0.5, 1.5, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(
        subset_gradient_error(gram, indices, weights), _explicit_error(grads, indices, weights), rtol=1e-8, atol=1e-10
    )
    k = 4
    mean = grads.mean(dim=0)
    spread = (grads - mean).square().sum(dim=1).mean()
    expected = torch.sqrt((N - k) / (k * (N - 1)) * spread) / mean.norm()
    torch.testing.assert_close(random_subset_gradient_error(gram, k), expected, rtol=1e-8, atol=1e-10)
