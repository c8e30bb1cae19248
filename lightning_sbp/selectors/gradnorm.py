"""Importance sampling by the last-layer gradient-norm bound, with inverse-probability weights."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sbp.functional.gram import gradient_norm_bound
from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.registry import register_selector

__all__ = ["GradNormSelector"]


@register_selector("gradnorm")
class GradNormSelector(Selector):
    """Importance sampling (Katharopoulos & Fleuret 2018): keep examples in proportion to their gradient-norm bound.

    Each example's score is ``b_i = ||p_i|| * sqrt(||h_i||^2 + 1)`` (without the ``+ 1`` for a layer
    without bias), the norm of its gradient with respect to the final linear layer (``p_i`` its logit
    gradient, ``h_i`` the layer's input): a cheap proxy for the norm of its full gradient, which
    Katharopoulos & Fleuret bound by ``||p_i||`` times a constant. With ``smoothing = a`` the
    scores become ``(1 - a) * b_i / sum(b) + a / N``.

    Sampling: a fixed-size design whose *inclusion* probabilities are known exactly. Each example is
    given ``pi_i = min(1, c * b_i)`` with ``c`` set so that ``sum(pi) = k`` (examples that would
    exceed one are taken surely and the rest rescaled), and exactly ``k`` distinct examples are
    drawn by randomised systematic sampling: the examples in random order lay out intervals of
    lengths ``pi_i`` on ``[0, k)``, and the points ``u, u + 1, ..., u + k - 1`` with ``u ~ U[0, 1)``
    pick the examples whose intervals they fall in. Example ``i`` is then kept with probability
    exactly ``pi_i`` (so ``pi`` is proportional to the bound, and for ``k = 1`` it is the
    sampling distribution itself).

    Weights (default, ``normalize=False``): Horvitz-Thompson, ``w_i = k / (N * pi_i)``. The training
    step's loss ``(1/k) * sum_{i in S} w_i * l_i = (1/N) * sum_{i in S} l_i / pi_i`` is then an exactly
    unbiased estimate of the batch's mean loss, and its gradient of the mean gradient, because the
    ``pi_i`` are the true inclusion probabilities of the design (the with-replacement formula
    ``1 / (N * q_i)`` with per-draw probabilities ``q_i`` is only an approximation without
    replacement). Every example not taken surely contributes a last-layer gradient term ``g_i / pi_i``
    of norm at most ``sum(b) / k``, however small its ``pi_i``: the estimate stays well behaved when
    some bounds are tiny. The weights sum to ``k`` in expectation (when no bound is zero), not on
    every draw; every rank still returns an unbiased estimate of its batch's mean loss. A pick of
    zero inclusion probability, which only floating-point rounding in the draw can make, weighs
    zero: every weight is finite and at most ``k / (N * min pi)`` over the drawable examples.

    ``normalize=True`` rescales them to sum to ``k`` exactly, ``w_i = k * (1 / pi_i) / sum_{j in S} (1 / pi_j)``
    (the Hajek ratio estimator): consistent, with an ``O(1/k)`` bias. Its normalising sum is
    dominated by any drawn example with a tiny bound, which then shrinks the whole step: late in
    training, when bounds span several orders of magnitude, it can match the batch gradient worse
    than uniform random selection. Use it with ``smoothing`` (which bounds every ``1 / pi_i`` by
    ``N / (smoothing * k)``) when a fixed weight sum matters more than accuracy.

    Ties to zero and non-finite values: examples with a zero bound have a zero gradient and get
    ``pi_i = 0``, unless fewer than ``k`` examples have a positive bound, in which case the rest of
    the budget is spread uniformly over them; examples with a non-finite loss or bound come last,
    the same way. When every bound is zero the selection is uniform.

    Args:
        smoothing: weight of the uniform distribution mixed into the scores, in ``[0, 1]``; ``1`` is
            uniform random selection.
        normalize: rescale the weights to sum to ``k`` on every draw (Hajek) instead of the unbiased
            Horvitz-Thompson weights.

    Raises:
        ValueError: if ``smoothing`` is outside ``[0, 1]`` or ``normalize`` is not a bool.
    """

    needs_last_layer = True
    weighted = True

    def __init__(self, smoothing: float = 0.0, normalize: bool = False) -> None:
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be a number in [0, 1] (0: proportional to the bound), got {smoothing!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        self.smoothing = float(smoothing)
        self.normalize = normalize

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Draw ``k`` distinct examples with inclusion probabilities proportional to the gradient-norm bound."""
        features, logit_grads = scores.require_last_layer(type(self).__name__)
        bound = gradient_norm_bound(features.detach(), logit_grads.detach(), bias=scores.bias)
        finite = torch.isfinite(scores.losses) & torch.isfinite(bound)
        bound = torch.where(finite, bound, torch.zeros_like(bound))
        n = bound.shape[0]

        if self.smoothing > 0:
            # Normalising by the sum keeps the mixture's two parts on the same scale.
            share = bound / bound.sum().clamp_min(torch.finfo(bound.dtype).tiny)
            score = torch.where(finite, (1.0 - self.smoothing) * share + self.smoothing / n, torch.zeros_like(share))
        else:
            # Dividing by the largest bound keeps the sums below from overflowing.
            score = bound / bound.max().clamp_min(torch.finfo(bound.dtype).tiny)

        prob = _inclusion_probabilities(score, finite, k)
        indices = _systematic_sample(prob, k, generator)
        return Selection(indices, _inverse_probability_weights(prob[indices], k, n, self.normalize))


def _inverse_probability_weights(picked: Tensor, k: int, n: int, normalize: bool) -> Tensor:
    """Weights ``k / (N * pi_i)`` of the picks (Horvitz-Thompson), or rescaled to sum to ``k`` (Hajek).

    Only rounding in the systematic draw can pick an example whose inclusion probability is zero
    (or subnormal, which no draw reaches either): such a pick weighs zero, so every weight is finite
    and at most ``k / (N * min pi)`` over the examples the design can draw.

    Args:
        picked: the inclusion probabilities of the picks, shape ``[k]``.
        k: the number of picks.
        n: the number of examples in the batch.
        normalize: rescale the weights to sum to ``k`` instead.
    """
    drawable = picked >= torch.finfo(picked.dtype).tiny
    inverse = torch.where(drawable, 1.0 / torch.where(drawable, picked, 1.0), 0.0)
    total = inverse.sum().clamp_min(torch.finfo(inverse.dtype).tiny) if normalize else n
    return k * inverse / total


def _capped_proportional(score: Tensor, budget: Tensor, k: int) -> Tensor:
    """Inclusion probabilities ``min(1, c * score)`` summing to ``budget``.

    Args:
        score: non-negative scores, shape ``[N]``.
        budget: 0-dim tensor, at most ``k`` and at most the number of positive scores.
        k: an upper bound of ``budget`` known on the host, ``k <= N``.
    """
    n = score.shape[0]
    sorted_score, order = torch.sort(score, descending=True)
    zero = sorted_score.new_zeros(1)
    # tail[m]: the sum of the scores left after taking the m largest surely, for m = 0..k.
    tail = torch.cat([sorted_score.flip(0).cumsum(0).flip(0), zero])[: k + 1]
    next_score = torch.cat([sorted_score, zero])[: k + 1]
    taken = torch.arange(k + 1, device=score.device)
    left = (budget - taken).clamp_min(0).to(score.dtype)
    scale = torch.where(taken < budget, left / tail.clamp_min(torch.finfo(score.dtype).tiny), torch.zeros_like(tail))
    # The fewest sure examples such that the next one, rescaled, stays at most one.
    feasible = (taken >= budget) | (scale * next_score <= 1.0)
    sure = torch.argmax(feasible.to(torch.int8))
    rank = torch.arange(n, device=score.device)
    # gather, not scale[sure]: indexing by a 0-dim tensor reads the index back on the host.
    ranked = torch.where(rank < sure, torch.ones_like(sorted_score), scale.gather(0, sure.view(1)) * sorted_score)
    prob = torch.empty_like(score)
    prob[order] = ranked.clamp(0.0, 1.0)
    return prob


def _inclusion_probabilities(score: Tensor, finite: Tensor, k: int) -> Tensor:
    """Inclusion probabilities summing to ``k``: proportional to ``score``, then uniform over ties at zero.

    Examples with a positive score share the budget first; what is left goes uniformly to the
    finite examples with a zero score, then to the non-finite ones.
    """
    positive = finite & (score > 0)
    zero = finite & ~positive
    n_positive, n_zero, n_rest = positive.sum(), zero.sum(), (~finite).sum()
    budget = torch.clamp(n_positive, max=k)
    main = _capped_proportional(torch.where(positive, score, torch.zeros_like(score)), budget, k)
    left = k - budget
    zero_prob = (left / n_zero.clamp_min(1)).clamp(max=1.0)
    rest_prob = ((left - n_zero).clamp_min(0) / n_rest.clamp_min(1)).clamp(max=1.0)
    return torch.where(positive, main, torch.where(zero, zero_prob, rest_prob).to(score.dtype))


def _systematic_sample(prob: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices, each included with probability ``prob[i]`` (``prob`` sums to ``k``, each ``<= 1``)."""
    n = prob.shape[0]
    device = prob.device
    order = torch.randperm(n, generator=generator, device=device)
    edges = torch.cumsum(prob[order], 0)
    # Drawn in float32 whatever the dtype of the probabilities, so that a draw does not depend on it.
    start = torch.rand(1, generator=generator, device=device).to(prob.dtype)
    steps = torch.arange(k, device=device)
    # Scaling the points to the actual total absorbs the rounding of the cumulative sum.
    points = (start + steps) * (edges[-1] / k)
    position = torch.searchsorted(edges, points, right=True)
    # Rounding could still put two points in one interval or one past the end: force strictly
    # increasing positions within [0, N - 1]; the exact arithmetic never needs it.
    position = torch.cummax(position - steps, 0).values.clamp(max=n - k) + steps
    return order[position]
