"""Tolerances from the error model of what a test compares, so that they hold on any processor and thread count.

Rounding: a sum of ``n`` terms computed in any order, by any kernel, errs by at most ``γ_n Σ|terms|`` with
``γ_n = n u / (1 − n u)`` and ``u = eps / 2`` (Higham, *Accuracy and Stability of Numerical Algorithms*, §3.1).
So an inner product's error is bounded by the inner product of the absolute values, not by the result, which
may cancel to nothing. A linear solve that is backward stable errs by about ``n u κ(A) ‖x‖``.

Sampling: a Monte Carlo estimate is compared with ``SIGMAS`` of its standard errors, estimated from the draws
themselves, so that a fixed-seed test keeps a wide margin wherever the draws' last bits land.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "SIGMAS",
    "assert_within",
    "frequency_tolerance",
    "gamma",
    "gradient_norm_bound_rtol",
    "gradnorm_weight_rtol",
    "inclusion_sum_tolerance",
    "inclusion_tolerance",
    "mean_tolerance",
    "random_squared_error_tolerance",
    "replay_tolerance",
    "solve_tolerance",
    "squared_error_tolerance",
]

SIGMAS = 5.0
"""Standard errors allowed to a Monte Carlo estimate: a normal deviate beyond 5 has probability 6e-7."""


def gamma(terms: int, dtype: torch.dtype) -> float:
    """``γ_n``: the relative error bound of a sum or inner product of ``terms`` terms in ``dtype``."""
    unit = torch.finfo(dtype).eps / 2
    if terms * unit >= 1:
        raise ValueError(f"{terms} terms are too many for a rounding bound in {dtype}")
    return terms * unit / (1 - terms * unit)


def solve_tolerance(
    matrix: Tensor,
    solution: Tensor,
    dtype: torch.dtype,
    matrix_error: Tensor | None = None,
    rhs_error: Tensor | None = None,
    slack: float = 4.0,
) -> float:
    """Forward error bound of a backward-stable solve of ``A x = b`` in ``dtype``, with ``A`` and ``b`` perturbed.

    ``‖δx‖ ≤ ‖A⁻¹‖ (slack · γ_n ‖A‖ ‖x‖ + ‖δA‖ ‖x‖ + ‖δb‖)``: the solve's own rounding (``slack`` covers the
    few steps of a factorisation and its substitutions) and the rounding of its inputs, given as entrywise
    bounds ``matrix_error`` and ``rhs_error`` when they were computed apart from the reference. ``A`` is the
    system actually solved (for least squares through the Gram matrix, ``XᵀX``, with ``κ(XᵀX) = κ(X)²``); its
    norms are computed in float64. The bound on ``‖δx‖`` bounds every entry of ``δx``.
    """
    size = matrix.shape[0]
    if size == 0:
        return 0.0
    matrix = matrix.double()
    norm = float(torch.linalg.vector_norm(solution.double()))
    inverse_norm = 1 / float(torch.linalg.svdvals(matrix).min())
    perturbation = slack * gamma(size, dtype) * float(torch.linalg.matrix_norm(matrix, ord=2)) * norm
    if matrix_error is not None:
        perturbation += float(torch.linalg.matrix_norm(matrix_error.double())) * norm
    if rhs_error is not None:
        perturbation += float(torch.linalg.vector_norm(rhs_error.double()))
    return inverse_norm * perturbation


def replay_tolerance(expected: Tensor, terms: int) -> float:
    """Bound on the difference of two evaluations of the same network on the same values, in any summation order.

    Each entry of a gradient or activation sums at most ``terms`` products (the batch times the positions and
    fan-in a weight is shared over); near initialisation they do not cancel much, so each term is taken to be
    at most the tensor's largest entry: ``2 γ_terms max|expected|`` in the tensor's dtype.
    """
    return 2 * gamma(terms, expected.dtype) * float(expected.abs().max())


def mean_tolerance(samples: Tensor) -> float:
    """``SIGMAS`` standard errors of the mean of ``samples`` (one draw per entry), from their own spread."""
    samples = samples.double()
    return SIGMAS * float(samples.std()) / math.sqrt(samples.numel())


def frequency_tolerance(probability: Tensor, draws: int) -> Tensor:
    """``SIGMAS`` binomial standard errors of a frequency over ``draws`` draws, plus one draw for the rounding."""
    probability = probability.double()
    return SIGMAS * (probability * (1 - probability) / draws).sqrt() + 1 / draws


def assert_within(actual: Tensor, expected: Tensor, bound: Tensor | float, what: str = "") -> None:
    """Assert ``|actual − expected| <= bound`` entrywise, naming the worst entry's share of the bound."""
    difference = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64)
    within = difference <= bound
    if not bool(within.all()):
        share = difference / bound.clamp_min(torch.finfo(torch.float64).tiny)
        raise AssertionError(
            f"{what}: {int((~within).sum())} entries off by more than their bound, the worst by "
            f"{float(share.max()):.3g} times it (difference {float(difference.max()):.3g})"
        )


def squared_error_tolerance(
    gram: Tensor,
    indices: Tensor,
    weights: Tensor,
    length: int,
    norms: Tensor | None = None,
    eps: float | None = None,
) -> float:
    """A bound on the rounding error of a squared relative gradient error, from either side of a comparison.

    The squared error is ``‖Σ_i a_i g_i‖² / ‖ḡ‖²`` with ``a = w/k`` on the subset and ``−1/N`` everywhere. Formed
    from ``K`` (entries that are inner products of length ``length``, then sums of up to ``N²`` products) or from
    materialised gradients (sums of ``N`` rows, then a squared norm of length ``length``), each rounding is at
    most ``eps`` relative to a term bounded by ``|a_i| |a_j| ‖g_i‖ ‖g_j‖``, so both errors are below
    ``(N² + length) · eps · (Σ_i |a_i| ‖g_i‖)² / ‖ḡ‖²``. Near the full batch the form cancels to 0: this is an
    absolute floor, whatever the processor's summation order. ``norms`` replaces ``‖g_i‖`` by a larger bound on
    the magnitudes of the terms behind each ``g_i`` where they may cancel; ``eps`` is that of the arithmetic
    being bounded (``gram``'s dtype by default, when ``gram`` is the reference in a wider one).
    """
    n, k = gram.shape[0], indices.shape[0]
    if norms is None:
        norms = gram.diagonal().clamp(min=0).sqrt()
    if eps is None:
        eps = torch.finfo(gram.dtype).eps
    spread = (weights.abs().to(norms.dtype) * norms[indices]).sum() / k + norms.sum() / n
    mean_sq = gram.sum() / n**2
    return float(2 * (n * n + length) * eps * spread**2 / mean_sq)


def random_squared_error_tolerance(
    gram: Tensor, k: int, length: int, norms: Tensor | None = None, eps: float | None = None
) -> float:
    """A bound on the rounding error of the squared random-subset error, from either side of a comparison.

    The squared error is ``f (tr(K)/N − 1ᵀK1/N²) / (1ᵀK1/N²)`` with ``f = (N − k) / (k (N − 1))``. As in
    :func:`squared_error_tolerance`, the trace errs by at most ``(N + length) eps Σ_i ‖g_i‖² / N`` and the mean
    square by ``(N² + length) eps (Σ_i ‖g_i‖ / N)²``; the quotient adds the result times the relative error of
    its denominator. ``norms`` and ``eps`` as there.
    """
    n = gram.shape[0]
    if norms is None:
        norms = gram.diagonal().clamp(min=0).sqrt()
    if eps is None:
        eps = torch.finfo(gram.dtype).eps
    factor = (n - k) / (k * (n - 1))
    mean_sq = float(gram.double().sum()) / n**2
    trace_error = (n + length) * eps * float(norms.double().square().sum()) / n
    mean_error = (n * n + length) * eps * (float(norms.double().sum()) / n) ** 2
    result = factor * (float(gram.double().diagonal().sum()) / n - mean_sq) / mean_sq
    return 2 * (factor * (trace_error + mean_error) + abs(result) * mean_error) / mean_sq


def gradient_norm_bound_rtol(dim: int, classes: int, dtype: torch.dtype) -> float:
    """Relative error bound of the gradient-norm bound ``‖p‖ · sqrt(‖h‖² + 1)`` of ``dim`` features, ``classes`` logits.

    Two sums of positive squares (``dim + 1`` and ``classes`` terms, relative ``γ`` of their count, no
    cancellation), halved by their square roots, then three roundings: the two roots and their product.
    """
    return (gamma(dim + 1, dtype) + gamma(classes, dtype)) / 2 + gamma(3, dtype)


def inclusion_sum_tolerance(size: int, budget: float, dtype: torch.dtype) -> float:
    """A bound on ``|Σ_i π_i − budget|`` for the probabilities ``π_i = clamp(c s_i, floor, 1)`` computed in ``dtype``.

    The scale ``c`` is interpolated between totals ``Σ_i clamp(c s_i, floor, 1)`` formed from prefix sums of the
    ``size`` sorted scores: each total errs by at most ``2 γ_{size+3}`` of itself (a difference of two prefix sums,
    a product, two additions), the interpolation moves ``c`` by at most ``6 u`` of itself, and each product
    ``c s_i`` rounds once: ``2 γ_{size+7}`` of the budget in all.
    """
    return 2 * gamma(size + 7, dtype) * budget


def inclusion_tolerance(
    prob: Tensor, budget: float, floor: float, dtype: torch.dtype, score_rtol: float = 0.0
) -> Tensor:
    """A bound on the error of each ``π_i = clamp(c s_i, floor, 1)`` summing to ``budget``, computed in ``dtype``.

    The design gradnorm draws from, with ``s_i = x_i / max x`` and each ``x_i`` known to a relative ``score_rtol``.
    The sum's excess (:func:`inclusion_sum_tolerance`) falls on the probabilities strictly between the floor and one,
    in proportion to them (all of it on one, at most). A score's error moves its probability twice (itself, and
    through ``c``, which keeps the sum); the division by the maximum rounds once, and so does the product by ``c``.

    Args:
        prob: ``[N]`` the exact probabilities.
        budget: their sum.
        floor: the least probability of a positive score.
        dtype: the dtype of the computation bounded.
        score_rtol: the relative error of each ``x_i``.

    Returns:
        ``[N]`` float64 bounds on ``|computed − prob|``.
    """
    prob = prob.double()
    middle = (prob > floor) & (prob < 1)
    mass = torch.where(middle, prob, 0.0).sum()
    share = (prob / mass).clamp(max=1.0) if float(mass) > 0 else torch.ones_like(prob)
    excess = inclusion_sum_tolerance(prob.shape[0], budget, dtype) * share
    return excess + (2 * score_rtol + gamma(3, dtype)) * prob


def gradnorm_weight_rtol(prob: Tensor, k: int, floor: float, dim: int, classes: int, dtype: torch.dtype) -> Tensor:
    """Relative bound on gradnorm's weights ``k / (N π_i)`` computed in ``dtype``, against those of the exact ``prob``.

    The probabilities' own error (:func:`inclusion_tolerance`, their scores carrying the error of
    :func:`gradient_norm_bound_rtol` for ``dim`` features and ``classes`` logits), then three roundings:
    ``1 / π_i``, its product by ``k`` and the quotient by ``N``. A clamp at the weight bound moves a weight less.
    """
    score_rtol = gradient_norm_bound_rtol(dim, classes, dtype)
    return inclusion_tolerance(prob, k, floor, dtype, score_rtol) / prob.double() + gamma(3, dtype)
