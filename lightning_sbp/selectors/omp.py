"""Gradient matching: the weighted subset whose last-layer gradient best matches the batch's (arXiv 2312.05021)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

from lightning_sbp.functional.omp import omp_gram
from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.registry import register_selector

__all__ = ["OMPSelector"]

Weighting = Literal["normalized", "uniform", "raw"]
GramDtype = Literal["float32", "float64"]


@register_selector("omp")
class OMPSelector(Selector):
    """Orthogonal matching pursuit on the Gram matrix of the per-example last-layer gradients.

    The gradient of example ``i`` with respect to the final linear layer is ``p_i ⊗ [h_i, 1]``; the
    selector never forms it, only the Gram matrix ``K = (H Hᵀ + 1) ∘ (P Pᵀ)`` (without the ``+ 1``
    when the layer has no bias). OMP then picks ``k`` examples and coefficients ``c`` so that
    ``sum_{i in S} c_i g_i`` approximates the mean gradient ``(1/N) sum_j g_j`` (target ``K · 1/N``).

    The training step's subset loss is ``(1/k) sum_{i in S} w_i l_i``, so the weights in example
    units that reproduce the OMP combination are ``w_i = k * c_i``. The ``weights`` option:

    * ``"normalized"`` (default, as in arXiv 2312.05021): ``w = k * c / sum(c)``, the coefficients
      rescaled to sum to ``k``, which keeps their relative sizes but fixes the step size to that of
      a uniform subset. When ``sum(c)`` is not positive the weights fall back to uniform.
    * ``"uniform"``: all ones; OMP only chooses the examples.
    * ``"raw"``: ``w = k * c``, the least-squares fit itself in example units (not rescaled; its sum
      is ``k`` only when the fit preserves the gradient's scale). Non-finite coefficients become 0.

    Examples with a non-finite loss, features or logit gradient are given a zero gradient, so they
    are picked (with coefficient 0) only when the support cannot be filled otherwise.

    Args:
        weights: how the OMP coefficients become weights: ``"normalized"``, ``"uniform"`` or ``"raw"``.
        nonnegative: constrain the OMP coefficients to be non-negative (drop-and-refit).
        dtype: precision of the Gram matrix and of OMP, ``"float32"`` or ``"float64"`` (slow on GPUs,
            unsupported on some accelerators, but better conditioned for large batches).
        sketch_dim: for heads too large for the exact Gram matrix (language models), estimate it from a
            TensorSketch of this dimension, drawn afresh on every step, whenever that is cheaper than the
            exact forms (see :func:`~lightning_sbp.functional.gradient_gram`); ``None`` keeps it exact.

    Raises:
        ValueError: for a value of ``weights`` or ``dtype`` outside the allowed ones.
    """

    needs_last_layer = True
    weighted = True

    def __init__(
        self,
        weights: Weighting = "normalized",
        nonnegative: bool = False,
        dtype: GramDtype = "float32",
        sketch_dim: int | None = None,
    ) -> None:
        if weights not in get_args(Weighting):
            raise ValueError(f"weights must be one of {', '.join(map(repr, get_args(Weighting)))}; got {weights!r}")
        if dtype not in get_args(GramDtype):
            raise ValueError(f"dtype must be one of {', '.join(map(repr, get_args(GramDtype)))}; got {dtype!r}")
        if not isinstance(nonnegative, bool):
            raise ValueError(f"nonnegative must be True or False, got {nonnegative!r}")
        if sketch_dim is not None and (
            isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1
        ):
            raise ValueError(f"sketch_dim must be None (exact) or a positive integer, got {sketch_dim!r}")
        self.weights = weights
        self.nonnegative = nonnegative
        self.dtype = dtype
        self.sketch_dim = sketch_dim

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Pick ``k`` examples by OMP and weigh them by their coefficients."""
        scores.require_last_layer(type(self).__name__)
        gram = scores.gram_in(getattr(torch, self.dtype), self.sketch_dim, generator)
        target = gram.mean(dim=1)
        indices, coef = omp_gram(gram, target, k, nonnegative=self.nonnegative)
        coef = torch.where(torch.isfinite(coef), coef, torch.zeros_like(coef)).float()

        if self.weights == "uniform":
            return Selection.uniform(indices)
        if self.weights == "raw":
            return Selection(indices, k * coef)
        total = coef.sum()  # finite: the coefficients were made finite above
        positive = total > 0
        weights = torch.where(positive, coef * (k / torch.where(positive, total, 1.0)), 1.0)
        return Selection(indices, weights)
