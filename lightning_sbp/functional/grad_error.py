"""How well a subset of a batch reproduces the batch's mean gradient, from the Gram matrix alone.

With ``K[i, j] = g_i · g_j`` the inner products of the per-example gradients of a batch of ``N``
examples and ``ḡ = (1/N) Σ_i g_i`` their mean, every quantity below is a quadratic form in ``K``: no
per-example gradient is ever materialised.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from lightning_sbp.functional._inputs import outside_autocast

__all__ = ["random_subset_gradient_error", "relative_gradient_error", "subset_gradient_error"]


def _check_gram(gram: Tensor) -> None:
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] == 0:
        raise ValueError(f"gram must be a non-empty square matrix [N, N], got shape {tuple(gram.shape)}")
    if not gram.is_floating_point():
        raise ValueError(f"gram must be floating point, got {gram.dtype}")


def _relative(squared_error: Tensor, squared_reference: Tensor) -> Tensor:
    """``sqrt(squared_error) / sqrt(squared_reference)``, both clamped at 0; 0/0 is 0 and x/0 is inf."""
    error = squared_error.clamp(min=0).sqrt()
    reference = squared_reference.clamp(min=0).sqrt()
    return torch.where(reference > 0, error / reference, torch.where(error > 0, torch.inf, 0.0))


@outside_autocast
def subset_gradient_error(gram: Tensor, indices: Tensor, weights: Tensor | None = None) -> Tensor:
    """Relative error of a weighted subset's mean gradient against the full batch's.

    ``‖(1/k) Σ_{i∈S} w_i g_i − ḡ‖ / ‖ḡ‖``, computed from ``K`` as
    ``‖a‖² = wᵀ K_SS w / k² − 2 wᵀ K_S· 1 / (k N) + 1ᵀ K 1 / N²`` with ``a`` the difference of the
    two gradients. Squared norms are clamped at 0 before the square root (rounding can make them
    slightly negative). When ``ḡ = 0`` the result is 0 if the subset's gradient is 0 too, else ``inf``.
    ``indices`` may repeat (sampling with replacement); weights are in example units, so a uniform
    subset has all-ones weights.

    Args:
        gram: ``[N, N]`` inner products of the per-example gradients.
        indices: ``[k]`` integer indices into the batch, ``k >= 1``.
        weights: ``[k]`` weights of the selected examples; None means all ones.

    Returns:
        0-dim tensor in the dtype of ``gram`` (at least ``float32``).

    Raises:
        ValueError: on shapes that do not match or an empty subset.
    """
    _check_gram(gram)
    if indices.ndim != 1 or indices.shape[0] == 0:
        raise ValueError(f"indices must have shape [k] with k >= 1, got shape {tuple(indices.shape)}")
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise ValueError(f"indices must be integers, got {indices.dtype}")
    if weights is not None and weights.shape != indices.shape:
        raise ValueError(
            f"weights must have the shape of indices {tuple(indices.shape)}, got shape {tuple(weights.shape)}"
        )
    n, k = gram.shape[0], indices.shape[0]
    dtype = torch.promote_types(gram.dtype, torch.float32)
    gram = gram.to(dtype)
    indices = indices.to(device=gram.device, dtype=torch.long)
    w = torch.ones(k, dtype=dtype, device=gram.device) if weights is None else weights.to(gram.device, dtype)

    weighted_rows = w @ gram.index_select(0, indices)  # [N]: Σ_{i∈S} w_i K_i·
    subset_sq = weighted_rows.index_select(0, indices) @ w / k**2
    cross = weighted_rows.sum() / (k * n)
    mean_sq = gram.sum() / n**2
    return _relative(subset_sq - 2 * cross + mean_sq, mean_sq)


@outside_autocast
def random_subset_gradient_error(gram: Tensor, k: int) -> Tensor:
    """Root of the expected squared relative error of a uniformly random subset of ``k`` examples.

    For ``S`` drawn uniformly without replacement and unit weights,
    ``E ‖ḡ_S − ḡ‖² = (N − k) / (k (N − 1)) · (1/N) Σ_i ‖g_i − ḡ‖²`` and
    ``(1/N) Σ_i ‖g_i − ḡ‖² = tr(K) / N − 1ᵀ K 1 / N²``. The result is ``sqrt(E ‖ḡ_S − ḡ‖²) / ‖ḡ‖``:
    0 when ``k = N``, and, when ``ḡ = 0``, 0 if all gradients are 0 and ``inf`` otherwise. It is the
    yardstick for a selector's :func:`subset_gradient_error`.

    Args:
        gram: ``[N, N]`` inner products of the per-example gradients.
        k: subset size, ``1 <= k <= N``.

    Returns:
        0-dim tensor in the dtype of ``gram`` (at least ``float32``).

    Raises:
        ValueError: on a non-square ``gram`` or ``k`` outside ``[1, N]``.
    """
    _check_gram(gram)
    n = gram.shape[0]
    if isinstance(k, bool) or not hasattr(k, "__index__") or not 1 <= operator.index(k) <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= N = {n}, got {k!r}")
    k = operator.index(k)
    gram = gram.to(torch.promote_types(gram.dtype, torch.float32))
    mean_sq = gram.sum() / n**2
    if k == n:
        return _relative(torch.zeros_like(mean_sq), mean_sq)
    spread = gram.diagonal().sum() / n - mean_sq
    return _relative(spread * ((n - k) / (k * (n - 1))), mean_sq)


@outside_autocast
def relative_gradient_error(approximation: list[Tensor], reference: list[Tensor]) -> Tensor:
    """``‖approximation − reference‖ / ‖reference‖`` over parameter tensors taken as one vector.

    Args:
        approximation: gradients of the weighted subset loss, one tensor per parameter.
        reference: gradients of the full-batch loss, in the same order and shapes.

    Returns:
        A 0-dim float64 tensor: 0 when both vanish, inf when only the reference does.

    Raises:
        ValueError: when the two lists have different lengths.
    """
    if len(approximation) != len(reference):
        raise ValueError(f"got {len(approximation)} approximate and {len(reference)} reference gradients")
    difference = torch.zeros((), dtype=torch.float64, device=reference[0].device)
    norm = torch.zeros_like(difference)
    for approx, ref in zip(approximation, reference, strict=True):
        difference += (approx.double() - ref.double()).square().sum()
        norm += ref.double().square().sum()
    return _relative(difference, norm)
