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
    "mean_tolerance",
    "replay_tolerance",
    "solve_tolerance",
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
