"""Gradient matching: the weighted subset whose last-layer gradient best matches the batch's (arXiv 2312.05021)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from lightning_sbp.functional.omp import omp_gram
from lightning_sbp.selectors.base import Scores, Selection, Selector
from lightning_sbp.selectors.bounds import DEFAULT_MAX_WEIGHT, RunningCount, bound_in, check_max_weight
from lightning_sbp.selectors.fallback import no_worse_than_random
from lightning_sbp.selectors.registry import register_selector

__all__ = ["DEFAULT_MAX_WEIGHT", "OMPSelector", "bounded_weights"]

Weighting = Literal["normalized", "uniform", "raw"]
GramDtype = Literal["float32", "float64"]


def bounded_weights(coef: Tensor, k: int, weights: Weighting, max_weight: float) -> tuple[Tensor, Tensor]:
    """Weights in example units from OMP coefficients, within ``|w_i| <= max_weight``.

    ``"raw"`` gives ``w = k * c``, ``"normalized"`` ``w = k * c / sum(c)`` and ``"uniform"`` all ones.
    The weights are *unsafe* when a coefficient is not finite, when ``sum(c) <= 0`` (``"normalized"``
    only), or when some ``|w_i| > max_weight``. Since ``max|w| >= sum|w| / k = sum|c| / sum(c)`` for
    ``"normalized"``, the last test also refuses coefficients that nearly cancel: ``sum(c)`` is never
    below ``sum|c| / max_weight``. The bound is compared in float32, the weights' dtype, against the
    largest float32 value that does not exceed it (see :func:`~lightning_sbp.selectors.bounds.bound_in`).

    Unsafe weights are replaced by the least-squares weights ``k * c`` clipped to ``±max_weight`` (a
    non-finite coefficient counts as 0): on the scale of the full batch's gradient, like a uniform
    subset's, whatever the scheme. That is the candidate of the fallback; :class:`OMPSelector` keeps it
    only when it matches the batch gradient at least as well as a random subset would. Everything stays
    on the device of ``coef``; nothing is read on the host.

    Args:
        coef: the OMP coefficients ``[k]``.
        k: the subset size.
        weights: ``"normalized"``, ``"raw"`` or ``"uniform"``.
        max_weight: the bound, at least 1.

    Returns:
        ``(weights, fell_back)``: float32 weights ``[k]`` with ``|w_i| <= max_weight``, and a 0-dim
        ``bool`` tensor, true when the scheme's weights were unsafe and replaced.
    """
    if weights == "uniform":
        return torch.ones(coef.shape, device=coef.device), torch.zeros((), dtype=torch.bool, device=coef.device)
    bound = bound_in(torch.float32, max_weight)
    finite = torch.isfinite(coef)
    coef = torch.where(finite, coef, 0.0)
    raw = (k * coef).float()
    if weights == "raw":
        scaled, valid = raw, finite.all()
    else:
        total = coef.sum()
        valid = finite.all() & (total > 0)
        scaled = (coef * (k / torch.where(valid, total, 1.0))).float()
    # A NaN or infinite weight fails the comparison, so it falls back too.
    safe = valid & (scaled.abs() <= bound).all()
    return torch.where(safe, scaled, raw.clamp(-bound, bound)), ~safe


@register_selector("omp")
class OMPSelector(Selector):
    """Orthogonal matching pursuit on the Gram matrix of the per-example last-layer gradients.

    The gradient of example ``i`` with respect to the final linear layer is ``p_i ⊗ [h_i, 1]``; the
    selector never forms it, only the Gram matrix ``K = (H Hᵀ + 1) ∘ (P Pᵀ)`` (without the ``+ 1``
    when the layer has no bias). OMP then picks ``k`` examples and coefficients ``c`` so that
    ``sum_{i in S} c_i g_i`` approximates the mean gradient ``(1/N) sum_j g_j`` (target ``K · 1/N``).

    With ``ridge = ρ > 0`` the fit is ridge regression: OMP runs on ``K + λ I`` with
    ``λ = ρ · mean(diag K)`` (the mean squared gradient norm) and the same target. That is OMP, exactly,
    on the augmented atoms ``[g_i; sqrt(λ) e_i]`` and signal ``[ḡ; 0]``: every pick maximises the
    correlation with the ridge residual, and every refit minimises ``‖G_S c − ḡ‖² + λ ‖c‖²``, which
    damps the large opposite coefficients of nearly collinear gradients.

    The training step's subset loss is ``(1/k) sum_{i in S} w_i l_i``, so the weights in example
    units that reproduce the OMP combination are ``w_i = k * c_i``. The ``weights`` option:

    * ``"raw"`` (default): ``w = k * c``, the least-squares fit itself in example units. The step then
      approximates the full batch's, on its scale: the weights sum to ``k`` only when the fit
      preserves the gradient's scale.
    * ``"normalized"`` (the scheme of arXiv 2312.05021): ``w = k * c / sum(c)``, the coefficients
      rescaled to sum to ``k``. The step becomes the fitted gradient divided by ``sum(c)``: when the
      batch's gradients cancel (label noise, binary heads), far larger than the full batch's.
    * ``"uniform"``: all ones; OMP only chooses the examples.

    Every scheme keeps ``|w_i| <= max_weight``, and no fallback is worse than a random subset in
    expectation. Weights that would break the bound, or that cannot be formed (non-finite coefficients;
    ``sum(c) <= 0`` for ``"normalized"``), are replaced (see :func:`bounded_weights`) by the least-squares
    weights ``k * c`` clipped to ``±max_weight`` on the same support, if their gradient error, computed
    from the Gram matrix, is at most the expected error of a uniformly random subset of ``k``; otherwise
    by ``k`` examples drawn uniformly from the step's generator, with unit weights (see
    :func:`~lightning_sbp.selectors.fallback.no_worse_than_random`). Both are decided on the device.
    Each selection reports in ``Selection.stats``: ``max_abs_weight``, ``negative_weight_share`` (the
    fraction of the ``k`` weights below zero), ``weight_fallbacks`` (the number of selections, since
    the start of training, whose weights were replaced) and ``random_fallbacks`` (how many of those
    took a random subset); both counts are part of the checkpoint.

    Examples with a non-finite loss, features or logit gradient are given a zero gradient, so they
    are picked (with coefficient 0) only when the support cannot be filled otherwise.

    Args:
        weights: how the OMP coefficients become weights: ``"normalized"``, ``"uniform"`` or ``"raw"``.
        nonnegative: constrain the OMP coefficients to be non-negative (clipping, then projected
            least-squares rounds).
        dtype: precision of the Gram matrix and of OMP, ``"float32"`` or ``"float64"`` (slow on GPUs,
            unsupported on some accelerators, but better conditioned for large batches).
        sketch_dim: for heads too large for the exact Gram matrix (language models), estimate it from a
            TensorSketch of this dimension, drawn afresh on every step, whenever that is cheaper than the
            exact forms (see :func:`~lightning_sbp.functional.gradient_gram`); ``None`` keeps it exact.
        ridge: the ridge strength ``ρ >= 0`` relative to the mean squared gradient norm; ``0`` is plain
            least squares.
        max_weight: the bound on every ``|w_i|``, at least 1 (uniform weights must satisfy it).
        fused: run each greedy pick as one ``torch.compile``-d function, a few fused kernels instead of
            about a dozen (see :func:`~lightning_sbp.functional.omp_gram`). For GPUs at large ``k``
            (slower on the CPU); the first step of each batch size compiles.
        cuda_graph: on a GPU, replay the greedy loop as a CUDA graph, captured per batch size after two
            eager steps; ``False`` launches its kernels one by one (for debugging, or a profiler that
            needs every kernel).

    Raises:
        ValueError: for a value of an argument outside the allowed ones.
    """

    needs_last_layer = True
    weighted = True

    def __init__(
        self,
        weights: Weighting = "raw",
        nonnegative: bool = False,
        dtype: GramDtype = "float32",
        ridge: float = 0.0,
        max_weight: float = DEFAULT_MAX_WEIGHT,
        sketch_dim: int | None = None,
        fused: bool = False,
        cuda_graph: bool = True,
    ) -> None:
        if weights not in get_args(Weighting):
            raise ValueError(f"weights must be one of {', '.join(map(repr, get_args(Weighting)))}; got {weights!r}")
        if dtype not in get_args(GramDtype):
            raise ValueError(f"dtype must be one of {', '.join(map(repr, get_args(GramDtype)))}; got {dtype!r}")
        if not isinstance(nonnegative, bool):
            raise ValueError(f"nonnegative must be True or False, got {nonnegative!r}")
        if not isinstance(fused, bool):
            raise ValueError(f"fused must be True or False, got {fused!r}")
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        if sketch_dim is not None and (
            isinstance(sketch_dim, bool) or not isinstance(sketch_dim, int) or sketch_dim < 1
        ):
            raise ValueError(f"sketch_dim must be None (exact) or a positive integer, got {sketch_dim!r}")
        if not _is_number(ridge) or not 0.0 <= ridge < math.inf:
            raise ValueError(f"ridge must be a finite number >= 0 (0: plain least squares), got {ridge!r}")
        check_max_weight(max_weight)
        self.weights = weights
        self.nonnegative = nonnegative
        self.dtype = dtype
        self.ridge = float(ridge)
        self.max_weight = float(max_weight)
        self.sketch_dim = sketch_dim
        self.fused = fused
        self.cuda_graph = cuda_graph
        self._warned_cpu = False
        self._fallbacks = RunningCount()
        self._random_fallbacks = RunningCount()

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Pick ``k`` examples by OMP and weigh them by their coefficients, within the bound."""
        scores.require_last_layer(type(self).__name__)
        plain = scores.gram_in(getattr(torch, self.dtype), self.sketch_dim, generator)
        target = plain.mean(dim=1)
        gram = plain
        if self.ridge > 0:
            gram = plain.clone()  # the scores cache the plain Gram matrix
            gram.diagonal().add_(gram.diagonal().mean() * self.ridge)
        if self.fused and gram.device.type == "cpu" and not self._warned_cpu:
            self._warned_cpu = True
            warnings.warn(
                "OMPSelector(fused=True) on the CPU: the compiled loop is two to four times slower than the "
                "eager one there, and the first step of each batch size compiles it; fused is meant for GPUs",
                stacklevel=2,
            )
        indices, coef = omp_gram(
            gram, target, k, nonnegative=self.nonnegative, fused=self.fused, cuda_graph=self.cuda_graph
        )
        weights, fell_back = bounded_weights(coef, k, self.weights, self.max_weight)
        took_random = torch.zeros_like(fell_back)
        if self.weights != "uniform":
            safe_indices, safe_weights, took_random = no_worse_than_random(plain, indices, weights, generator)
            indices = torch.where(fell_back, safe_indices, indices)
            weights = torch.where(fell_back, safe_weights, weights)
        stats = {
            "max_abs_weight": weights.abs().amax(),
            "negative_weight_share": (weights < 0).float().mean(),
            "weight_fallbacks": self._fallbacks.add(fell_back),
            "random_fallbacks": self._random_fallbacks.add(fell_back & took_random),
        }
        return Selection(indices, weights, stats)

    def state_dict(self) -> dict[str, Any]:
        """The fallback counts: ``{"weight_fallbacks": int, "random_fallbacks": int}``."""
        return {"weight_fallbacks": self._fallbacks.value(), "random_fallbacks": self._random_fallbacks.value()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the fallback counts; they move to the scores' device at the next select."""
        self._fallbacks.restore(int(state.get("weight_fallbacks", 0)))
        self._random_fallbacks.restore(int(state.get("random_fallbacks", 0)))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
