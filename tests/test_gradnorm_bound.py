"""gradnorm's weights are bounded by construction: a floor on the inclusion probabilities, still unbiased."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from lightning_sbp.selectors import Scores
from lightning_sbp.selectors.bounds import DEFAULT_MAX_WEIGHT
from lightning_sbp.selectors.gradnorm import GradNormSelector


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def scores_with_bounds(bounds: Tensor, classes: int = 3) -> Scores:
    """Scores whose gradient-norm bound is exactly ``bounds`` (zero features, bias on)."""
    n = bounds.shape[0]
    grads = torch.zeros(n, classes)
    grads[:, 0] = bounds
    return Scores(torch.ones(n), None, grads, torch.zeros(n, 5), True)


def trained_classifier_batch(g: torch.Generator, n: int = 64, decades: float = 4.0) -> Scores:
    """A batch like a trained classifier's: softmax − onehot gradients whose norms span ``decades`` decades."""
    features = torch.randn(n, 16, generator=g)
    direction = torch.randn(n, 10, generator=g)
    direction = direction - direction.mean(1, keepdim=True)  # softmax − onehot sums to zero
    norms = 10 ** (-decades * torch.rand(n, generator=g))
    logit_grads = direction / direction.norm(dim=1, keepdim=True) * norms.unsqueeze(1)
    return Scores(torch.rand(n, generator=g), None, logit_grads, features, True)


def test_over_a_thousand_batches_spanning_four_decades_no_weight_exceeds_2k() -> None:
    n, k = 64, 16
    g = generator(0)
    bounded, unbounded = GradNormSelector(), GradNormSelector(max_weight=None)
    largest = {"bounded": 0.0, "unbounded": 0.0}
    for step in range(1000):
        scores = trained_classifier_batch(g, n)
        for name, selector in (("bounded", bounded), ("unbounded", unbounded)):
            weights = selector.select(scores, k, generator(step)).weights
            assert torch.isfinite(weights).all() and (weights > 0).all()
            largest[name] = max(largest[name], float(weights.max()))
    assert largest["bounded"] <= DEFAULT_MAX_WEIGHT <= 2 * k
    assert largest["unbounded"] > 2 * k  # the batches are the ones that broke the unbounded design


def test_the_floor_design_is_proportional_between_its_floor_and_one() -> None:
    n, k, max_weight = 64, 16, 4.0
    scores = trained_classifier_batch(generator(3), n)
    selector = GradNormSelector(max_weight=max_weight)
    prob = selector.inclusion_probabilities(scores, k).double()
    features, logit_grads = scores.require_last_layer("test")
    bound = logit_grads.norm(dim=1).double() * (features.double().square().sum(1) + 1).sqrt()
    floor = k / (n * max_weight)
    # float32 probabilities: a few float32 epsilons, relative.
    assert float(prob.sum()) == pytest.approx(k, rel=1e-5)
    assert float(prob.min()) >= floor * (1 - 1e-5) and float(prob.max()) <= 1.0
    middle = (prob > floor * (1 + 1e-5)) & (prob < 1 - 1e-5)
    assert int(middle.sum()) > 5 and int((prob <= floor * (1 + 1e-5)).sum()) > 5
    ratio = prob[middle] / bound[middle]
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-5, atol=0.0)
    # Below the floor's reach the scores are the smallest, above it the largest.
    assert float(bound[prob <= floor * (1 + 1e-5)].max()) <= float(bound[middle].min())


def test_the_floor_design_draws_each_example_with_its_probability_so_the_weights_are_unbiased() -> None:
    n, k = 32, 8
    scores = trained_classifier_batch(generator(4), n, decades=3.0)
    selector = GradNormSelector(max_weight=3.0)
    prob = selector.inclusion_probabilities(scores, k)
    draws = 4000
    counts = torch.zeros(n)
    g = generator(5)
    for _ in range(draws):
        selection = selector.select(scores, k, g)
        counts[selection.indices] += 1
        # Horvitz-Thompson: a drawn example weighs k / (N pi), so E[w_i 1{i in S}] = k / N for every example;
        # float32 division of float32 probabilities: a few float32 epsilons.
        expected = k / (n * prob[selection.indices].double())
        torch.testing.assert_close(selection.weights.double(), expected, rtol=1e-6, atol=0.0)
    # Binomial frequencies: five standard deviations, for each of the 32 examples.
    tolerance = 5 * (prob * (1 - prob) / draws).sqrt() + 1e-6
    assert ((counts / draws - prob).abs() <= tolerance).all()


def test_the_bound_leaves_a_design_within_it_unchanged() -> None:
    bounds = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0])  # the smallest pi = 3 / 30: weight 3.75
    for seed in range(10):
        bounded = GradNormSelector().select(scores_with_bounds(bounds), 3, generator(seed))
        unbounded = GradNormSelector(max_weight=None).select(scores_with_bounds(bounds), 3, generator(seed))
        assert torch.equal(bounded.indices, unbounded.indices)
        torch.testing.assert_close(bounded.weights, unbounded.weights)
        assert float(bounded.stats["bounded_selections"]) == 0.0


def test_a_bound_of_one_is_uniform_selection_with_unit_weights() -> None:
    scores = trained_classifier_batch(generator(6), 40)
    prob = GradNormSelector(max_weight=1).inclusion_probabilities(scores, 10)
    torch.testing.assert_close(prob, torch.full((40,), 0.25))
    torch.testing.assert_close(GradNormSelector(max_weight=1).select(scores, 10, generator()).weights, torch.ones(10))


def test_the_bound_is_compared_in_float32_at_its_edge() -> None:
    """At ``max_weight=7.9999999`` the floor's weights, about 8 in float32, must come out below it."""
    selector = GradNormSelector(max_weight=7.9999999)
    g = generator(7)
    largest = 0.0
    for step in range(50):
        weights = selector.select(trained_classifier_batch(g), 16, generator(step)).weights
        largest = max(largest, float(weights.max()))
    assert largest <= 7.9999999
    assert largest == float(torch.nextafter(torch.tensor(8.0), torch.tensor(0.0)))  # the floor was reached


def test_hajek_weights_are_capped_and_still_sum_to_k() -> None:
    g = generator(8)
    capped_some = False
    selector = GradNormSelector(normalize=True, max_weight=2.5)
    for step in range(200):
        scores = trained_classifier_batch(g, 32)
        selection = selector.select(scores, 8, generator(step))
        weights = selection.weights.double()
        inverse = 1 / selector.inclusion_probabilities(scores, 8)[selection.indices].double()
        # float32 weights: a few float32 epsilons, relative.
        assert float(weights.max()) <= 2.5 and float(weights.sum()) == pytest.approx(8, rel=1e-5)
        plain = 8 * inverse / inverse.sum()
        if float(plain.max()) > 2.5:
            capped_some = True
            # min(2.5, t / pi_i): the capped weights sit at 2.5, the others keep their ratios to each other.
            free = weights < 2.5 * (1 - 1e-5)
            ratio = weights[free] / inverse[free]
            torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio), rtol=1e-5, atol=0.0)
            assert float(inverse[~free].min() * ratio.mean()) >= 2.5 * (1 - 1e-5)
        else:
            torch.testing.assert_close(weights, plain, rtol=1e-5, atol=0.0)
    assert capped_some


def test_the_stats_report_the_largest_weight_and_count_bounded_selections() -> None:
    selector = GradNormSelector()
    within = scores_with_bounds(torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0]))
    spread = trained_classifier_batch(generator(9))
    counts = []
    for scores, k in ((within, 3), (spread, 16), (within, 3), (spread, 16)):
        selection = selector.select(scores, k, generator())
        assert torch.equal(selection.stats["max_abs_weight"], selection.weights.max())
        counts.append(float(selection.stats["bounded_selections"]))
    assert counts == [0.0, 1.0, 1.0, 2.0]
    assert selector.state_dict() == {"bounded_selections": 2}
    restored = GradNormSelector()
    restored.load_state_dict(selector.state_dict())
    assert float(restored.select(spread, 16, generator()).stats["bounded_selections"]) == 3.0


@pytest.mark.parametrize("value", [0.5, math.inf, "8", True])
def test_a_bad_bound_is_refused_at_construction(value: object) -> None:
    with pytest.raises(ValueError, match="max_weight must be"):
        GradNormSelector(max_weight=value)  # type: ignore[arg-type]
