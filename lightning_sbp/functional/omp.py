"""Orthogonal matching pursuit on a Gram matrix.

The atoms are the per-example gradients ``g_i`` of a batch, known only through their Gram matrix
``K[i, j] = g_i · g_j``; the signal is the mean gradient, known through its correlations with the atoms,
``target = K · 1 / N``. :func:`omp_gram` greedily picks ``k`` atoms whose least-squares combination
approximates the signal.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["omp_gram"]

# Rounds of projected least squares of the non-negative variant.
_NONNEGATIVE_ROUNDS = 5


def omp_gram(gram: Tensor, target: Tensor, k: int, nonnegative: bool = False) -> tuple[Tensor, Tensor]:
    """Orthogonal matching pursuit on a Gram matrix.

    Picks the atoms one at a time, ``k`` times: the unselected atom most correlated with the current
    residual (largest ``|r_j|`` with ``r = target - gram[:, S] @ coef``), after which the coefficients
    ``coef`` are refitted by least squares on the whole support ``S``. On a well-conditioned problem it
    selects the same atoms, in the same order, with the same coefficients as scikit-learn's
    ``orthogonal_mp_gram(gram, target, n_nonzero_coefs=k)``.

    The least-squares refit goes through a Cholesky factor ``L`` of ``gram[S][:, S]`` that grows by one
    row per step. The loop keeps ``W = gram[:, S] @ L^-T`` (a partial pivoted Cholesky factor of
    ``gram``, one column per step): the new row of ``L`` is the row of ``W`` at the new atom, so the
    triangular solve of the textbook update comes for free, and with ``z = L^-1 @ target[S]`` the
    residual correlation is ``r = target - W @ z``, updated by one matrix-vector product per step. The
    coefficients ``L^-T @ z`` are formed by one triangular solve after the last step. Everything stays
    on the device of ``gram``; the loop runs over the ``k`` picks, never over examples, and never
    synchronises with the host. The cost is ``O(N k^2)`` time and ``O(N k)`` memory.

    Degenerate problems (duplicated examples, all-zero gradients, atoms linearly dependent on the
    support) never stop the search early, unlike scikit-learn's:

    * with ``tol = max(sqrt(eps), N * eps)`` (``eps`` the machine epsilon of the dtype), an atom whose
      new Cholesky pivot ``gram[j, j] - |W[j]|^2`` is not above ``tol * gram[j, j]`` adds no new
      direction (the part of it outside the span of the support is below ``sqrt(tol)`` of its norm). It
      still joins the support, with coefficient 0, and the fit on the other atoms is unchanged;
    * residual correlations not above ``tol * max|target|`` count as zero. When no unselected atom
      is above that, the lowest unselected index is picked. The support is thus always filled with
      ``k`` distinct indices, deterministically;
    * NaN and infinite entries of ``gram`` and ``target`` are read as 0.

    With ``nonnegative=True`` an atom is picked for the largest positive residual correlation ``r_j``
    (when none is positive, the lowest unselected index, as above), and the coefficients are made
    non-negative after the greedy phase: the least-squares coefficients are clipped at 0, then five
    rounds of projected refitting follow, each solving least squares on the atoms whose coefficient is
    positive (a Cholesky solve) and moving the coefficients towards that solution as far as they stay
    non-negative (the inner step of the Lawson-Hanson algorithm). Every round lowers the residual or
    leaves it unchanged, so the result fits at least as well as clipping. Atoms whose coefficient ends
    at 0 stay in the support.

    The function is not differentiable; its outputs never require gradients.

    Args:
        gram: symmetric positive semi-definite matrix ``[N, N]`` of inner products of the atoms.
            Only its rows are read (its symmetry is assumed, not checked).
        target: ``[N]`` correlations of the atoms with the signal (``gram.mean(dim=1)`` to approximate the
            mean of the atoms).
        k: number of atoms to select, ``1 <= k <= N``.
        nonnegative: constrain the coefficients to be non-negative.

    Returns:
        ``(indices, coef)``: ``indices`` a ``long`` tensor ``[k]`` of distinct atom indices in the order
        they were selected, and ``coef`` their least-squares coefficients ``[k]`` (raw, not normalised),
        in the floating dtype of the inputs (at least ``float32``), on the device of ``gram``.

    Raises:
        ValueError: on shapes that do not match, inputs on different devices, non-floating inputs, or
            ``k`` outside ``[1, N]``.
    """
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix [N, N], got shape {tuple(gram.shape)}")
    n = gram.shape[0]
    if target.shape != (n,):
        raise ValueError(f"target must have shape [N] = [{n}] to match gram, got shape {tuple(target.shape)}")
    if not (gram.is_floating_point() and target.is_floating_point()):
        raise ValueError(f"gram and target must be floating point, got {gram.dtype} and {target.dtype}")
    if gram.device != target.device:
        raise ValueError(f"gram and target must be on the same device, got {gram.device} and {target.device}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= N = {n}, got {k!r}")

    dtype = torch.promote_types(torch.promote_types(gram.dtype, target.dtype), torch.float32)
    with torch.inference_mode():
        indices, coef = _omp_gram(
            torch.nan_to_num(gram.to(dtype), nan=0.0, posinf=0.0, neginf=0.0),
            torch.nan_to_num(target.to(dtype), nan=0.0, posinf=0.0, neginf=0.0),
            k,
            nonnegative,
        )
    # Plain tensors, not inference tensors, so that callers may use them in autograd graphs.
    return indices.clone(), coef.clone()


def _omp_gram(gram: Tensor, target: Tensor, k: int, nonnegative: bool) -> tuple[Tensor, Tensor]:
    n = gram.shape[0]
    dtype, device = gram.dtype, gram.device
    # Relative tolerance below which a pivot or a residual correlation counts as zero. Rounding in the
    # Schur complement of a dependent atom grows with the support size and the conditioning of its
    # factor, so the square root of eps leaves a wide margin above it.
    tol = max(torch.finfo(dtype).eps ** 0.5, n * torch.finfo(dtype).eps)
    # Row vectors [1, N] throughout, so that the [1, 1] values gathered at the picked atom broadcast
    # against them without reshaping.
    alpha = target.reshape(1, n).clone()  # residual correlations
    pivot_floor = gram.diagonal().clamp(min=0).mul(tol).reshape(1, n)
    score_floor = alpha.abs().amax().mul(tol).clamp(min=torch.finfo(dtype).tiny)
    # Caps the score: +inf for unselected atoms, 0 for selected ones, whose score thus stays below that of
    # any unselected atom (at least score_floor > 0). fmin also drops a NaN score to the cap.
    cap = torch.full((1, n), torch.inf, dtype=dtype, device=device)
    infinity = torch.tensor(torch.inf, dtype=dtype, device=device)
    w_rows = torch.empty(k, n, dtype=dtype, device=device)  # row s: column s of W
    picks: list[Tensor] = []
    z_parts: list[Tensor] = []

    for s in range(k):
        score = alpha.clamp(min=score_floor) if nonnegative else alpha.abs().clamp_(min=score_floor)
        lam = torch.fmin(score, cap).argmax(dim=1)  # shape [1]; ties go to the lowest index
        picks.append(lam)
        cap.index_fill_(1, lam, 0.0)

        # Column of W for the new atom: the part of gram[:, lam] that the support does not explain,
        # gram[:, lam] - W @ L[s, :s]^T, with L[s, :s] = W[lam, :s].
        w = w_rows[s : s + 1]
        gram_row = gram.index_select(0, lam)
        if s == 0:
            w.copy_(gram_row)
        else:
            past = w_rows[:s]
            torch.addmm(gram_row, past.T.index_select(0, lam), past, alpha=-1, out=w)
        pivot = w.index_select(1, lam)
        # 1 / sqrt(pivot), or 0 for an atom that adds no direction: its column of W and its z vanish.
        inv_sqrt = torch.where(pivot > pivot_floor.index_select(1, lam), pivot, infinity).rsqrt_()
        w.mul_(inv_sqrt)
        z_s = alpha.index_select(1, lam).mul_(inv_sqrt)
        z_parts.append(z_s)
        alpha.addcmul_(w, z_s, value=-1)

    indices = torch.cat(picks)
    # L^T[i, j] = W[indices[j], i] is upper triangular (the solve reads only that half). Its diagonal holds
    # sqrt(pivot), or exactly 0 for an atom without a direction; a unit pivot there gives that atom a
    # coefficient of 0, since its z and its row of L^T are 0.
    chol_t = w_rows.index_select(1, indices)
    diag = chol_t.diagonal()
    dependent = diag == 0
    diag.masked_fill_(dependent, 1.0)
    coef = torch.linalg.solve_triangular(chol_t, torch.cat(z_parts), upper=True).squeeze(1)
    if nonnegative:
        coef = _nonnegative_refit(gram, target, indices, coef, dependent)
    return indices, coef


def _nonnegative_refit(gram: Tensor, target: Tensor, indices: Tensor, coef: Tensor, dependent: Tensor) -> Tensor:
    """Non-negative coefficients on the support: clipping, then a few projected least-squares rounds."""
    gram_ss = gram.index_select(0, indices).index_select(1, indices)
    target_s = target.index_select(0, indices)
    eye = torch.eye(indices.shape[0], dtype=gram.dtype, device=gram.device)
    coef = coef.clamp(min=0).masked_fill_(dependent, 0.0)
    for _ in range(_NONNEGATIVE_ROUNDS):
        active = (coef > 0).to(gram.dtype)
        # Inactive atoms get an identity row and column, so the system stays positive definite.
        system = gram_ss * active.outer(active) + eye * (1 - active)
        factor, _ = torch.linalg.cholesky_ex(system)
        refit = torch.cholesky_solve((target_s * active).unsqueeze(1), factor).squeeze(1) * active
        refit = torch.where(refit.isfinite(), refit, coef)
        # The objective decreases along the segment from coef to refit, the least-squares optimum on the
        # active atoms; go as far along it as non-negativity allows.
        ratios = torch.where(refit < 0, coef / (coef - refit), 1.0)
        step = ratios.amin().clamp(max=1.0)
        blocking = (refit < 0) & (ratios <= step)
        coef = torch.lerp(coef, refit, step).masked_fill_(blocking, 0.0).clamp_(min=0)
    return coef
