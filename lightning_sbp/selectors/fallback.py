"""A fallback that never makes a step worse than a random subset, in expectation."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_sbp.functional.grad_error import random_subset_gradient_error, subset_gradient_error

__all__ = ["no_worse_than_random"]


def no_worse_than_random(
    gram: Tensor, indices: Tensor, weights: Tensor, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """A weighted subset if it matches the batch gradient at least as well as a random subset would, else one.

    The candidate's error ``‖ḡ_S − ḡ‖`` (:func:`~lightning_sbp.functional.subset_gradient_error`) is known
    exactly from ``gram``, and so is the root mean squared error of a uniformly random subset of the same
    size (:func:`~lightning_sbp.functional.random_subset_gradient_error`). When the candidate's is below
    it, the candidate is returned; otherwise ``k`` examples drawn uniformly without replacement from
    ``generator``, with unit weights, whose expected squared error is exactly random's. Either way the
    expected squared error of the result is at most random's, on the gradients that ``gram`` describes.

    The random subset is drawn on every call and the choice is a ``torch.where`` on the device: nothing is
    read on the host.

    Args:
        gram: ``[N, N]`` inner products of the per-example gradients.
        indices: ``[k]`` the candidate's distinct indices.
        weights: ``[k]`` the candidate's weights, in example units.
        generator: a generator on the device of ``gram``.

    Returns:
        ``(indices, weights, took_random)``: the chosen subset and its weights (in the dtype of ``weights``),
        and a 0-dim ``bool`` tensor, true when the random subset was taken.
    """
    n, k = gram.shape[0], indices.shape[0]
    drawn = torch.randperm(n, generator=generator, device=gram.device)[:k]
    # Written so that a NaN error (an overflowing Gram matrix) takes the random subset too, and so does a tie.
    took_random = ~(subset_gradient_error(gram, indices, weights) < random_subset_gradient_error(gram, k))
    chosen = torch.where(took_random, drawn, indices)
    return chosen, torch.where(took_random, torch.ones_like(weights), weights), took_random
