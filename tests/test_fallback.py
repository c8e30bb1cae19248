"""The fallback keeps a weighted subset only when it beats random, and never makes a step worse than random."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import random_squared_error_tolerance, squared_error_tolerance
from torch import Tensor

from lightning_sbp.selectors import OMPSelector, Scores
from lightning_sbp.selectors.fallback import no_worse_than_random


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def direct_error(gradients: Tensor, indices: Tensor, weights: Tensor) -> float:
    """``‖(1/k) Σ_S w_i g_i − ḡ‖ / ‖ḡ‖`` from the gradients themselves, in float64."""
    gradients = gradients.double()
    subset = (weights.double().unsqueeze(1) * gradients[indices]).sum(0) / indices.shape[0]
    mean = gradients.mean(0)
    return float((subset - mean).norm() / mean.norm())


def direct_random_error(gradients: Tensor, k: int) -> float:
    """Root mean squared relative error of a uniform random subset of ``k``: finite-population sampling variance."""
    gradients = gradients.double()
    n = gradients.shape[0]
    mean = gradients.mean(0)
    spread = (gradients - mean).square().sum(1).mean()
    return math.sqrt(float(spread) * (n - k) / (k * (n - 1))) / float(mean.norm())


def rounding_slack(gradients: Tensor, indices: Tensor, weights: Tensor, length: int, dtype: torch.dtype) -> float:
    """How far, in squared relative error, the function's comparison in ``dtype`` can be off.

    The function compares the candidate's squared error with random's, each a form in a Gram matrix whose entries
    are inner products of ``length`` terms rounded to ``dtype``: each side errs by at most its rounding bound, and
    so does the float64 reference from the gradients themselves.
    """
    gram = gradients.double() @ gradients.double().T
    eps = torch.finfo(dtype).eps
    candidate = squared_error_tolerance(gram, indices, weights.double(), length, eps=eps)
    return candidate + random_squared_error_tolerance(gram, indices.shape[0], length, eps=eps)


def test_a_candidate_better_than_random_is_kept_and_a_worse_one_is_not() -> None:
    g = generator(1)
    gradients = torch.randn(32, 6, generator=g) + 0.5
    gram = gradients @ gradients.T
    k = 8
    # The least-squares fit of the mean gradient on 8 examples: far better than random.
    indices = torch.arange(k)
    good = k * torch.linalg.lstsq(gradients[:k].T, gradients.mean(0)).solution
    assert direct_error(gradients, indices, good) < direct_random_error(gradients, k)
    chosen, weights, took_random = no_worse_than_random(gram, indices, good, generator())
    assert not took_random and torch.equal(chosen, indices) and torch.equal(weights, good)

    bad = torch.full((k,), 5.0)
    assert direct_error(gradients, indices, bad) > direct_random_error(gradients, k)
    chosen, weights, took_random = no_worse_than_random(gram, indices, bad, generator(7))
    assert took_random
    assert torch.equal(chosen, torch.randperm(32, generator=generator(7))[:k])  # from the generator given
    assert torch.equal(weights, torch.ones(k))


def test_a_candidate_whose_error_is_not_a_number_takes_the_random_subset() -> None:
    gram = torch.eye(6)
    _, weights, took_random = no_worse_than_random(gram, torch.arange(2), torch.tensor([math.nan, 1.0]), generator())
    assert took_random and torch.equal(weights, torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_the_result_is_never_worse_than_random_in_expectation(dtype: torch.dtype) -> None:
    # Checked against the gradients themselves, not the Gram matrix the function reads. A kept candidate is
    # below random's error; a random subset has exactly random's expected squared error (the closed form).
    g = generator(2)
    kept = 0
    for _ in range(100):
        n, k = 24, 6
        gradients = torch.randn(n, 5, generator=g, dtype=torch.float64) + torch.randn(
            5, generator=g, dtype=torch.float64
        )
        indices = torch.randperm(n, generator=g)[:k]
        candidate = torch.randn(k, generator=g).abs() * 2
        chosen, weights, took_random = no_worse_than_random(
            (gradients @ gradients.T).to(dtype), indices, candidate, generator()
        )
        if took_random:
            assert torch.equal(weights, torch.ones(k)) and chosen.unique().numel() == k
        else:
            kept += 1
            slack = rounding_slack(gradients, chosen, weights, gradients.shape[1], dtype)
            assert direct_error(gradients, chosen, weights) ** 2 <= direct_random_error(gradients, k) ** 2 + slack
    assert 0 < kept < 100  # both branches were taken


def test_omp_fallbacks_on_cancelling_binary_batches_are_never_worse_than_random() -> None:
    """On the batches where OMP's weights blow up, every fallback beats random or is a random subset."""
    g = generator(1)
    selector = OMPSelector(weights="normalized")
    fallbacks = random_fallbacks = 0.0
    for _ in range(40):
        n, k = 32, 8
        centers = torch.randn(4, 6, generator=g)
        features = centers[torch.randint(4, (n,), generator=g)] + 1e-3 * torch.randn(n, 6, generator=g)
        scale = torch.rand(n, generator=g) - 0.5
        logit_grads = scale.unsqueeze(1) * torch.tensor([1.0, -1.0])
        scores = Scores(torch.ones(n), None, logit_grads, features, bias=False)
        selection = selector.select(scores, k, generator())
        # Per-example gradients of a final layer without bias: p_i ⊗ h_i.
        gradients = (logit_grads.unsqueeze(2) * features.unsqueeze(1)).flatten(1)
        fell_back = float(selection.stats["weight_fallbacks"]) > fallbacks
        took_random = float(selection.stats["random_fallbacks"]) > random_fallbacks
        fallbacks, random_fallbacks = (
            float(selection.stats["weight_fallbacks"]),
            float(selection.stats["random_fallbacks"]),
        )
        if fell_back and not took_random:
            error = direct_error(gradients, selection.indices, selection.weights)
            # The selector's float32 Gram entries are products of inner products of 6 features and 2 logits.
            slack = rounding_slack(gradients, selection.indices, selection.weights, 6 + 2 + 1, torch.float32)
            assert error**2 <= direct_random_error(gradients, k) ** 2 + slack
        if took_random:
            assert torch.equal(selection.weights, torch.ones(k))
    assert fallbacks > 5  # the batches do make the paper's weights fall back
