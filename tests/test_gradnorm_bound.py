"""gradnorm's weights are bounded by construction: a floor on the inclusion probabilities, still unbiased."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import (
    assert_within,
    frequency_tolerance,
    gamma,
    gradient_norm_bound_rtol,
    gradnorm_weight_rtol,
    inclusion_sum_tolerance,
    inclusion_tolerance,
)
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
    bound = logit_grads.double().norm(dim=1) * (features.double().square().sum(1) + 1).sqrt()
    # The float32 floor and one are the clamp's own bounds, so they classify the probabilities exactly.
    floor = float(torch.tensor(k / (n * max_weight), dtype=torch.float32))
    assert_within(prob.sum(), torch.tensor(k), inclusion_sum_tolerance(n, k, torch.float32), "sum")
    assert float(prob.min()) >= floor and float(prob.max()) <= 1.0
    middle = (prob > floor) & (prob < 1)
    assert int(middle.sum()) > 5 and int((prob <= floor).sum()) > 5
    # π_i = c · (b_i / max b) in float32: each ratio to the float64 bound is off by the float32 bound's error and
    # two roundings, so any two ratios, and a ratio and their mean, differ by at most twice that.
    bound_rtol = gradient_norm_bound_rtol(features.shape[1], logit_grads.shape[1], torch.float32)
    ratio = prob[middle] / bound[middle]
    assert_within(ratio, ratio.mean().expand_as(ratio), 2 * (bound_rtol + gamma(2, torch.float32)) * ratio, "ratios")
    # Below the floor's reach the scores are the smallest, above it the largest, up to the float32 bound's error.
    assert float(bound[prob <= floor].max()) <= float(bound[middle].min()) * (1 + 2 * bound_rtol)


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
        # from the same float32 probabilities the library rounds 1 / pi, k times it and its quotient by N.
        expected = k / (n * prob[selection.indices].double())
        assert_within(selection.weights, expected, gamma(3, torch.float32) * expected, "weights")
    assert_within(counts / draws, prob, frequency_tolerance(prob, draws), "inclusion frequencies")


def _weight_rtol(scores: Scores, prob: Tensor, k: int, floor: float) -> Tensor:
    """The float32 weights' relative bound against the exact design ``prob``; it bounds the probabilities too."""
    features, logit_grads = scores.require_last_layer("test")
    return gradnorm_weight_rtol(prob, k, floor, features.shape[1], logit_grads.shape[1], torch.float32)


def test_the_bound_leaves_a_design_within_it_unchanged() -> None:
    bounds = torch.tensor([1.0, 2.0, 4.0, 8.0, 1.0, 2.0, 4.0, 8.0])  # the smallest pi = 3 / 30: weight 3.75
    exact = 3 * bounds.double() / bounds.sum()  # no probability reaches the floor 3 / 64, nor one
    for seed in range(10):
        bounded = GradNormSelector().select(scores_with_bounds(bounds), 3, generator(seed))
        unbounded = GradNormSelector(max_weight=None).select(scores_with_bounds(bounds), 3, generator(seed))
        assert torch.equal(bounded.indices, unbounded.indices)
        # Each design's float32 weights are within their bound of the exact ones, so of each other within twice it.
        rtol = 2 * _weight_rtol(scores_with_bounds(bounds), exact, 3, 0.0)[bounded.indices]
        assert_within(bounded.weights, unbounded.weights, rtol * unbounded.weights.double(), "weights")
        assert float(bounded.stats["bounded_selections"]) == 0.0


def test_a_bound_of_one_is_uniform_selection_with_unit_weights() -> None:
    scores = trained_classifier_batch(generator(6), 40)
    prob = GradNormSelector(max_weight=1).inclusion_probabilities(scores, 10)
    exact = torch.full((40,), 0.25, dtype=torch.float64)  # every probability at the floor 10 / 40
    rtol = _weight_rtol(scores, exact, 10, 0.25)
    assert_within(prob, exact, rtol * exact, "probabilities")
    weights = GradNormSelector(max_weight=1).select(scores, 10, generator()).weights
    assert_within(weights, torch.ones(10), rtol[:10], "weights")


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
    # The weights are 2.5 π of the design min(1, c s_i) over the 8 picks summing to 8 / 2.5, with s_i = (1 / π_i) /
    # max(1 / π): its sum errs as inclusion_sum_tolerance says; 1 / π_i, the quotient by the maximum, the product by c
    # and the one by 2.5 round once each, so the free weights keep their ratios to 1 / π_i within γ_4 each.
    ratio_rtol = 2 * gamma(4, torch.float32)
    for step in range(200):
        scores = trained_classifier_batch(g, 32)
        selection = selector.select(scores, 8, generator(step))
        weights = selection.weights.double()
        inverse = 1 / selector.inclusion_probabilities(scores, 8)[selection.indices].double()
        assert float(weights.max()) <= 2.5
        sum_tolerance = 2.5 * inclusion_sum_tolerance(8, 8 / 2.5, torch.float32) + 8 * gamma(1, torch.float32)
        assert_within(weights.sum(), torch.tensor(8.0), sum_tolerance, "sum")
        plain = 8 * inverse / inverse.sum()
        if float(plain.max()) > 2.5:
            capped_some = True
            # min(2.5, t / pi_i): the capped weights sit at 2.5, the others keep their ratios to each other.
            free = weights < 2.5
            ratio = weights[free] / inverse[free]
            assert_within(ratio, ratio.mean().expand_as(ratio), ratio_rtol * ratio, "free weights")
            # A capped pick's c s_i rounded to one or more: t / pi_i is at least 2.5 within the same roundings.
            assert float(inverse[~free].min() * ratio.mean()) >= 2.5 * (1 - gamma(7, torch.float32))
        else:
            tolerance = 2.5 * inclusion_tolerance(plain / 2.5, 8 / 2.5, 0.0, torch.float32, gamma(1, torch.float32))
            assert_within(weights, plain, tolerance + gamma(1, torch.float32) * plain, "uncapped weights")
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
