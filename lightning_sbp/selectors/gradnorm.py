"""Importance sampling by the last-layer gradient-norm bound, with inverse-probability weights."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_sbp.functional.gram import gradient_norm_bound
from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.bounds import DEFAULT_MAX_WEIGHT, RunningCount, bound_in, check_max_weight
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

    Sampling: a fixed-size design whose *inclusion* probabilities are known exactly. Each example with
    a positive score is given ``pi_i = clamp(c * b_i, k / (N * max_weight), 1)`` with ``c`` set so that
    ``sum(pi) = k``: examples that would exceed one are taken surely, those whose share would fall below
    the floor ``k / (N * max_weight)`` are raised to it, and the rest share what is left in proportion
    to their bound. Exactly ``k`` distinct examples are then drawn by randomised systematic sampling:
    the examples in random order lay out intervals of lengths ``pi_i`` on ``[0, k)``, and the points
    ``u, u + 1, ..., u + k - 1`` with ``u ~ U[0, 1)`` pick the examples whose intervals they fall in.
    Example ``i`` is then kept with probability exactly ``pi_i``.

    Weights (default, ``normalize=False``): Horvitz-Thompson, ``w_i = k / (N * pi_i)``. The training
    step's loss ``(1/k) * sum_{i in S} w_i * l_i = (1/N) * sum_{i in S} l_i / pi_i`` is then an exactly
    unbiased estimate of the batch's mean loss, and its gradient of the mean gradient, because the
    ``pi_i`` are the true inclusion probabilities of the design (the with-replacement formula
    ``1 / (N * q_i)`` with per-draw probabilities ``q_i`` is only an approximation without
    replacement). The floor bounds every weight by ``max_weight`` *by construction*, without a bias:
    the bound changes which examples are drawn, not what a drawn example counts for. Among the designs
    with weights within the bound, it is the one whose variance proxy ``sum_i b_i^2 / pi_i`` is least
    (the bound's only cost: a little variance when ``b`` is a faithful proxy, against no single example
    dominating a step when it is not). ``max_weight=None`` drops the floor: the unbounded design of
    Katharopoulos & Fleuret, whose largest weight, ``k / (N * min pi)``, reached hundreds on trained
    classifiers whose bounds span four decades. The weights sum to ``k`` in expectation (when no bound
    is zero), not on every draw; every rank still returns an unbiased estimate of its batch's mean loss.
    A pick of zero inclusion probability, which only floating-point rounding in the draw can make,
    weighs zero.

    ``normalize=True`` rescales them to sum to ``k`` exactly, ``w_i = k * (1 / pi_i) / sum_{j in S} (1 / pi_j)``
    (the Hajek ratio estimator): consistent, with an ``O(1/k)`` bias, and capped at ``max_weight`` with
    the excess spread over the other picks. Its normalising sum is dominated by any drawn example with
    a tiny bound, which then shrinks the whole step: when bounds span several orders of magnitude it can
    match the batch gradient worse than uniform random selection.

    Ties to zero and non-finite values: examples with a zero bound have a zero gradient and get
    ``pi_i = 0``, unless fewer than ``k`` examples have a positive bound, in which case the rest of
    the budget is spread uniformly over them; examples with a non-finite loss or bound come last,
    the same way. When every bound is zero the selection is uniform. Such fill-ins may have a smaller
    ``pi_i`` than the floor; their weights are clamped at ``max_weight`` (their gradient is zero).

    Each selection reports in ``Selection.stats``: ``max_abs_weight`` (the largest weight) and
    ``bounded_selections`` (the number of selections, since the start of training, in which the bound
    raised an inclusion probability or clamped a weight; part of the checkpoint).

    Args:
        smoothing: weight of the uniform distribution mixed into the scores, in ``[0, 1]``; ``1`` is
            uniform random selection.
        normalize: rescale the weights to sum to ``k`` on every draw (Hajek) instead of the unbiased
            Horvitz-Thompson weights.
        max_weight: the bound on every weight, at least 1 (uniform weights are 1); ``None`` for the
            unbounded design.

    Raises:
        ValueError: if ``smoothing`` is outside ``[0, 1]``, ``normalize`` is not a bool, or ``max_weight``
            is neither ``None`` nor a finite number of at least 1.
    """

    needs_last_layer = True
    weighted = True

    def __init__(
        self, smoothing: float = 0.0, normalize: bool = False, max_weight: float | None = DEFAULT_MAX_WEIGHT
    ) -> None:
        if isinstance(smoothing, bool) or not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing <= 1.0:
            raise ValueError(f"smoothing must be a number in [0, 1] (0: proportional to the bound), got {smoothing!r}")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        check_max_weight(max_weight, allow_none=True)
        self.smoothing = float(smoothing)
        self.normalize = normalize
        self.max_weight = None if max_weight is None else float(max_weight)
        self._bounded = RunningCount()

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Draw ``k`` distinct examples with inclusion probabilities proportional to the gradient-norm bound."""
        prob, raised = self._design(scores, k)
        indices = _systematic_sample(prob, k, generator)
        weights = _inverse_probability_weights(prob.gather(0, indices), k, scores.size, self.normalize, self.max_weight)
        if self.max_weight is not None:
            bound = bound_in(weights.dtype, self.max_weight)
            raised = raised | (weights > bound).any()
            weights = weights.clamp(max=bound)
        stats = {"max_abs_weight": weights.abs().amax(), "bounded_selections": self._bounded.add(raised)}
        return Selection(indices, weights, stats)

    def inclusion_probabilities(self, scores: Scores, k: int) -> Tensor:
        """The probability ``pi_i`` with which :meth:`select` keeps each example, ``[N]`` summing to ``k``."""
        return self._design(scores, k)[0]

    def state_dict(self) -> dict[str, Any]:
        """The number of selections the bound acted on: ``{"bounded_selections": int}``."""
        return {"bounded_selections": self._bounded.value()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the count; it moves to the scores' device at the next select."""
        self._bounded.restore(int(state.get("bounded_selections", 0)))

    def _design(self, scores: Scores, k: int) -> tuple[Tensor, Tensor]:
        """Inclusion probabilities ``[N]``, and whether the floor raised one of them."""
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
        floor = 0.0 if self.max_weight is None else k / (n * self.max_weight)
        return _inclusion_probabilities(score, finite, k, floor)


def _inverse_probability_weights(picked: Tensor, k: int, n: int, normalize: bool, max_weight: float | None) -> Tensor:
    """Weights ``k / (N * pi_i)`` of the picks (Horvitz-Thompson), or rescaled to sum to ``k`` (Hajek).

    Only rounding in the systematic draw can pick an example whose inclusion probability is zero
    (or subnormal, which no draw reaches either): such a pick weighs zero, so every weight is finite.
    Hajek weights are capped at ``max_weight``, the excess going to the other picks in proportion.

    Args:
        picked: the inclusion probabilities of the picks, shape ``[k]``.
        k: the number of picks.
        n: the number of examples in the batch.
        normalize: rescale the weights to sum to ``k`` instead.
        max_weight: the cap of Hajek weights, or ``None``.
    """
    drawable = picked >= torch.finfo(picked.dtype).tiny
    inverse = torch.where(drawable, 1.0 / torch.where(drawable, picked, 1.0), 0.0)
    if not normalize:
        return k * inverse / n
    if max_weight is None:
        return k * inverse / inverse.sum().clamp_min(torch.finfo(inverse.dtype).tiny)
    # min(max_weight, t * inverse) summing to k: proportional shares of k / max_weight, each at most one.
    budget = torch.tensor(k / max_weight, dtype=inverse.dtype, device=inverse.device)
    scaled = inverse / inverse.max().clamp_min(torch.finfo(inverse.dtype).tiny)
    return max_weight * _proportional_within(scaled, budget, 0.0)[0]


def _proportional_within(score: Tensor, budget: Tensor, floor: float) -> tuple[Tensor, Tensor]:
    """Probabilities ``clamp(c * score, floor, 1)`` of the positive scores (0 for the others) summing to ``budget``.

    ``F(c) = sum_i clamp(c * s_i, floor, 1)`` over the positive scores grows continuously and piecewise
    linearly in ``c``, with a kink wherever an example leaves the floor (``c = floor / s_i``) or reaches one
    (``c = 1 / s_i``). ``F`` is evaluated at every kink from sorted scores and their prefix sums, and ``c`` is
    interpolated linearly on the segment where ``F`` crosses ``budget``: exact, in ``O(N log N)``, with
    static shapes and nothing read on the host. With ``floor = 0`` this is ``min(1, c * s_i)``: the
    examples that would exceed one are taken surely and the rest rescaled.

    Args:
        score: ``[N]`` non-negative scores; those below the smallest normal float count as zero.
        budget: 0-dim tensor with ``n_positive * floor <= budget <= n_positive``.
        floor: the least probability of an example with a positive score, in ``[0, 1]``.

    Returns:
        ``(prob, raised)``: the probabilities ``[N]`` in the dtype of ``score``, and a 0-dim ``bool`` tensor,
        true when the floor raised some example above ``c * s_i``.
    """
    dtype = score.dtype
    n = score.shape[0]
    positive = score >= torch.finfo(dtype).tiny
    s = torch.where(positive, score, 0.0)
    ascending = torch.sort(s).values
    prefix = torch.cat([ascending.new_zeros(1), ascending.cumsum(0)])
    n_zero = (~positive).sum()
    # Kinks as thresholds t = 1 / c: at t, scores >= t sit at one and scores <= floor * t at the floor. An
    # infinite t (c = 0) stands for the start, where every positive score sits at the floor.
    infinity = torch.full((1,), torch.inf, dtype=dtype, device=score.device)
    kinks = [infinity, torch.where(positive, s, torch.inf)]
    if floor > 0:
        kinks.append(torch.where(positive, s / floor, torch.inf))
    t = torch.sort(torch.cat(kinks), descending=True).values  # c ascending
    below_t = torch.searchsorted(ascending, t)  # scores < t
    at_floor = torch.searchsorted(ascending, t * floor, right=True) if floor > 0 else n_zero.expand_as(below_t)
    at_floor = torch.minimum(at_floor, below_t)
    c = 1.0 / t  # 0 for the infinite thresholds
    middle = prefix.gather(0, below_t) - prefix.gather(0, at_floor)
    total = (n - below_t) + c * middle + floor * (at_floor - n_zero).clamp_min(0)
    total = torch.cummax(total, 0).values  # monotone, whatever the rounding
    # The segment [c[j - 1], c[j]] on which the total reaches the budget.
    j = torch.searchsorted(total, budget.to(dtype).view(1)).clamp(1, t.shape[0] - 1)
    c_low, c_high = c.gather(0, j - 1), c.gather(0, j)
    f_low, f_high = total.gather(0, j - 1), total.gather(0, j)
    slope = (c_high - c_low) / (f_high - f_low).clamp_min(torch.finfo(dtype).tiny)
    scale = torch.where(torch.isfinite(slope), c_low + (budget - f_low) * slope, c_high).clamp_min(0.0)
    scaled = scale * s
    prob = torch.where(positive, scaled.clamp(floor, 1.0), 0.0)
    raised = (positive & (scaled < floor)).any()
    return prob, raised


def _inclusion_probabilities(score: Tensor, finite: Tensor, k: int, floor: float) -> tuple[Tensor, Tensor]:
    """Inclusion probabilities summing to ``k``: proportional to ``score`` within ``[floor, 1]``, then uniform.

    Examples with a positive score share the budget first (see :func:`_proportional_within`); what is left
    goes uniformly to the finite examples with a zero score, then to the non-finite ones.

    Returns:
        ``(prob, raised)``: the probabilities ``[N]``, and whether the floor raised one of them.
    """
    positive = finite & (score >= torch.finfo(score.dtype).tiny)
    zero = finite & ~positive
    n_positive, n_zero, n_rest = positive.sum(), zero.sum(), (~finite).sum()
    budget = torch.clamp(n_positive, max=k)
    main, raised = _proportional_within(torch.where(positive, score, 0.0), budget, floor)
    left = k - budget
    zero_prob = (left / n_zero.clamp_min(1)).clamp(max=1.0)
    rest_prob = ((left - n_zero).clamp_min(0) / n_rest.clamp_min(1)).clamp(max=1.0)
    return torch.where(positive, main, torch.where(zero, zero_prob, rest_prob).to(score.dtype)), raised


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
