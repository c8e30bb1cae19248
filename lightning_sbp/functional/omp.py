"""Orthogonal matching pursuit on a Gram matrix.

The atoms are the per-example gradients ``g_i`` of a batch, known only through their Gram matrix
``K[i, j] = g_i · g_j``; the signal is the mean gradient, known through its correlations with the atoms,
``target = K · 1 / N``. :func:`omp_gram` greedily picks ``k`` atoms whose least-squares combination
approximates the signal.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from lightning_sbp.functional._inputs import outside_autocast
from lightning_sbp.functional.graphs import Capture, GraphCache, autocast_state, capture_cuda_graph

__all__ = ["omp_gram"]

# Rounds of projected least squares of the non-negative variant.
_NONNEGATIVE_ROUNDS = 5
# Rows of the Cholesky factor read per block in the greedy loop.
_BLOCK = 16
# Row length multiple (in elements) of the loop's work matrices.
_ALIGN = 8
# Elements per piece when copying a matrix: below the size at which PyTorch's CPU kernels start a
# parallel region, whose wait for every thread of the pool costs milliseconds on a busy machine.
_COPY_CHUNK = 16384
# CUDA graphs kept at once, one per (N, k, dtype, options, device): the batch size and the last, shorter
# batch of an epoch, for a selector or two.
_CACHED_GRAPHS = 8
_GRAPHS: GraphCache[_ReplayedOMP] = GraphCache(size=_CACHED_GRAPHS)


@outside_autocast
def omp_gram(
    gram: Tensor, target: Tensor, k: int, nonnegative: bool = False, fused: bool = False, cuda_graph: bool = True
) -> tuple[Tensor, Tensor]:
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
    synchronises with the host. Autocast is off inside: under a mixed-precision training step the loop
    still runs in the dtype of its inputs. The cost is ``O(N k^2)`` time and ``O(N^2 + N k)`` memory: the loop
    works on a copy of ``gram`` (padded to a multiple of 8 rows and columns) stacked with ``W``. Every
    pick runs the same fixed sequence of about a dozen kernels on tensors of fixed shapes, so on a CUDA
    device the whole function is captured as a CUDA graph and replayed: one launch per call instead of
    one per kernel. A graph is captured per ``(N, k, dtype, nonnegative, fused, device)`` after two eager
    calls, on a side stream in thread-local mode; a capture that fails leaves that problem size eager,
    after one warning (see ``lightning_sbp.functional.graphs``). With ``fused=True`` each pick is one
    compiled function whose operators fuse into a few kernels.

    Degenerate problems (duplicated examples, all-zero gradients, atoms linearly dependent on the
    support) never stop the search early, unlike scikit-learn's:

    * with ``tol = max(sqrt(eps), N * eps)`` (``eps`` the machine epsilon of the dtype), an atom whose
      new Cholesky pivot ``gram[j, j] - |W[j]|^2`` is not above ``tol * gram[j, j]`` adds no new
      direction (the part of it outside the span of the support is below ``sqrt(tol)`` of its norm). It
      still joins the support, with coefficient 0, and the fit on the other atoms is unchanged;
    * residual correlations not above ``tol * max|target|`` count as zero. When no unselected atom
      is above that, the lowest unselected index is picked. The support is thus always filled with
      ``k`` distinct indices, deterministically, even when ``gram`` or ``target`` hold NaN or infinite
      values (the coefficients are then unspecified and may be non-finite).

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
        gram: symmetric positive semi-definite matrix ``[N, N]`` of inner products of the atoms (its
            symmetry is assumed, not checked).
        target: ``[N]`` correlations of the atoms with the signal (``gram.mean(dim=1)`` to approximate the
            mean of the atoms).
        k: number of atoms to select, ``1 <= k <= N``.
        nonnegative: constrain the coefficients to be non-negative.
        fused: run each pick as one function compiled by ``torch.compile`` (Triton kernels on a GPU,
            C++ on the CPU), which fuses its dozen operators into a few kernels. The first call for a
            shape compiles, which takes seconds to a minute; later calls, and on CUDA the replays of
            the captured graph, launch the fused kernels. Each compiled pick reads all of ``W`` (the
            eager loop only the columns written so far), twice the arithmetic, so that its shapes
            never change. Meant for accelerators when ``k`` is in the hundreds; on the CPU the eager
            loop is two to four times faster. Needs what ``torch.compile`` needs: Triton on a GPU, a
            C++ compiler on the CPU. Under a ``TorchDispatchMode`` (a FLOP counter, say), which
            ``torch.compile`` does not support, the eager loop runs instead.
        cuda_graph: on a CUDA device, replay the loop as a CUDA graph; ``False`` launches every kernel.

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
    if isinstance(k, bool) or not hasattr(k, "__index__") or not 1 <= operator.index(k) <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= N = {n}, got {k!r}")
    k = operator.index(k)

    dtype = torch.promote_types(torch.promote_types(gram.dtype, target.dtype), torch.float32)
    # The loop is a dozen tiny operations per pick; inference mode spares each its autograd bookkeeping.
    with torch.inference_mode():
        runner = None
        if cuda_graph and gram.device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            device = gram.device
            key = (n, k, dtype, nonnegative, fused, device, autocast_state(device))
            runner = _GRAPHS.get(key, lambda capture: _ReplayedOMP(n, k, dtype, nonnegative, fused, device, capture))
        if runner is not None:
            indices, coef = runner(gram, target)
        else:
            indices, coef = _omp_gram(gram.to(dtype), target.to(dtype), k, nonnegative, fused)
    # Plain tensors, not inference tensors (nor a graph's static outputs), so that callers may keep them.
    return indices.clone(), coef.clone()


class _ReplayedOMP:
    """:func:`_omp_gram` for one ``(N, k, dtype, nonnegative, fused)`` on one device, captured once and replayed.

    Inputs are copied into static buffers, the captured kernels run on them, and the results land in
    static outputs: every call reuses the same memory, so callers must copy the outputs they keep.

    Args:
        n: the number of atoms.
        k: the number of picks.
        dtype: the floating dtype of the computation.
        nonnegative: the non-negative variant.
        fused: the compiled per-pick function instead of one operator at a time.
        device: the device of the buffers.
        capture: turns a function of the buffers into its replay (see ``lightning_sbp.functional.graphs``).
    """

    def __init__(
        self,
        n: int,
        k: int,
        dtype: torch.dtype,
        nonnegative: bool,
        fused: bool,
        device: torch.device,
        capture: Capture = capture_cuda_graph,
    ) -> None:
        self.k, self.nonnegative, self.fused = k, nonnegative, fused
        # Zeros take the same path as any input: the loop has no data-dependent control flow.
        self.gram = torch.zeros(n, n, dtype=dtype, device=device)
        self.target = torch.zeros(n, dtype=dtype, device=device)
        self.indices = torch.zeros(k, dtype=torch.long, device=device)
        self.coef = torch.zeros(k, dtype=dtype, device=device)
        self.replay = capture(self._run, device)

    def _run(self) -> None:
        indices, coef = _omp_gram(self.gram, self.target, self.k, self.nonnegative, self.fused)
        self.indices.copy_(indices)
        self.coef.copy_(coef)

    def __call__(self, gram: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        self.gram.copy_(gram)
        self.target.copy_(target)
        self.replay()
        return self.indices, self.coef


def _omp_gram(gram: Tensor, target: Tensor, k: int, nonnegative: bool, fused: bool) -> tuple[Tensor, Tensor]:
    n = gram.shape[0]
    dtype, device = gram.dtype, gram.device
    # Relative tolerance below which a pivot or a residual correlation counts as zero. Rounding in the
    # Schur complement of a dependent atom grows with the support size and the conditioning of its
    # factor, so the square root of eps leaves a wide margin above it.
    tol = max(torch.finfo(dtype).eps ** 0.5, n * torch.finfo(dtype).eps)
    # Everything a pick reads about atom j is column j of one matrix, so that one gather fetches it:
    #   rows [0, m):       gram[:, j], then target[j], then zeros up to m (a row length that keeps the rows
    #                      of W aligned for the matrix-vector products);
    #   rows [m, m + k):   W[j, s] for the picks s so far (zeroed a block ahead): row m + s is column s of W,
    #                      followed by z[s] at coordinate n;
    #   row m + k:         the pivot floor tol * gram[j, j] of atom j.
    # The product that gives the new column of W then also gives target[lam] - W[lam] @ z, the residual
    # correlation that z[s] needs, and the scaling that stores the column stores z[s] as well.
    m = -(-(n + 1) // _ALIGN) * _ALIGN
    # Rows of W are zeroed a block at a time in the loop; a single fill of the whole table would start a
    # parallel region on the CPU (see _COPY_CHUNK).
    table = torch.empty(m + k + 1, m, dtype=dtype, device=device)
    _copy_rows(table[:n, :n], gram)
    table[:n, n:] = 0.0
    table[n:m] = 0.0
    table[n, :n] = target
    table[m + k] = 0.0
    table[m + k, :n] = gram.diagonal().clamp(min=0).mul(tol)
    w_ext = table[m : m + k]

    # Per-atom vectors are columns [m, 1], like the columns of W. alpha_ext holds the residual
    # correlations r = target - W @ z in its first N coordinates.
    alpha_ext = torch.zeros(m, 1, dtype=dtype, device=device)
    alpha_ext[:n, 0] = target
    score_floor = target.abs().amax().mul(tol).clamp(min=torch.finfo(dtype).tiny)
    # Caps the score: +inf for unselected atoms; for the atom picked at step s, s - k < 0, below any score
    # of an unselected atom (at least score_floor > 0), and a record of the order of the picks. fmin also
    # drops a NaN score to the cap.
    cap = torch.full((n, 1), torch.inf, dtype=dtype, device=device)

    # torch.compile refuses to run under a dispatch mode (a FLOP counter, an operator recorder): the
    # eager loop then runs, with the same results.
    if fused and _get_current_dispatch_mode() is None:
        # Every pick reads and writes all of W (rows not written yet are zero), so that its shapes, and
        # with them the one compiled function, are the same at every step.
        _copy_rows(w_ext, torch.zeros(1, m, dtype=dtype, device=device).expand(k, m))
        step = torch.zeros((), dtype=torch.long, device=device)
        pick = _compiled_pick()
        for _ in range(k):
            pick(table, alpha_ext, cap, step, score_floor, n, k, nonnegative)
    else:
        _eager_picks(table, alpha_ext, cap, score_floor, n, k, nonnegative)

    # The picks, in order: cap holds -k, ..., -1 at them and +inf elsewhere.
    indices = torch.topk(cap.squeeze(1), k, largest=False, sorted=True).indices
    # L^T[i, j] = W[indices[j], i] is upper triangular (the solve reads only that half). Its diagonal holds
    # sqrt(pivot), or exactly 0 for an atom without a direction; a unit pivot there gives that atom a
    # coefficient of 0, since its z and its row of L^T are 0.
    chol_t = w_ext.index_select(1, indices)
    diag = chol_t.diagonal()
    dependent = diag == 0
    diag.masked_fill_(dependent, 1.0)
    coef = torch.linalg.solve_triangular(chol_t, w_ext[:, n : n + 1], upper=True).squeeze(1)
    if nonnegative:
        coef = _nonnegative_refit(gram, target, indices, coef, dependent)
    return indices, coef


def _eager_picks(
    table: Tensor, alpha_ext: Tensor, cap: Tensor, score_floor: Tensor, n: int, k: int, nonnegative: bool
) -> None:
    """The ``k`` picks of the greedy loop, one ATen operator at a time (about a dozen per pick)."""
    m = table.shape[1]
    w_ext = table[m : m + k]
    # Views of every row of W (and of its z entry), made in one call each rather than one per step.
    w_views = w_ext.unsqueeze(2).unbind(0)  # [m, 1]: column s of W, z[s], zeros
    z_views = w_ext[:, n : n + 1].unsqueeze(1).unbind(0)  # [1, 1]: z[s]
    alpha = alpha_ext[:n]
    infinity = torch.full((), torch.inf, dtype=table.dtype, device=table.device)  # capturable, unlike a copy
    for s in range(k):
        score = alpha.clamp(min=score_floor) if nonnegative else alpha.abs().clamp_(min=score_floor)
        lam = torch.fmin(score, cap).argmax()  # 0-dim; ties go to the lowest index
        cap.index_fill_(0, lam, s - k)

        if s % _BLOCK == 0:
            # The product below reads W a block of rows at a time, rows not written yet being zero: the
            # views are then made once per block, for a few zero rows of extra arithmetic.
            rows = min(k, s + _BLOCK)
            w_ext[s:rows].zero_()
            block_t = w_ext[:rows].T
        column = table.index_select(1, lam)  # [m + k + 1, 1]
        # New column of W: the part of gram[:, lam] that the support does not explain,
        # gram[:, lam] - W @ L[s, :s]^T with L[s, :s] = W[lam, :s] (gram is symmetric).
        fresh = torch.addmm(column[:m], block_t, column[m : m + rows], alpha=-1)
        pivot = fresh.take(lam)
        # 1 / sqrt(pivot), or 0 for an atom that adds no direction: its column of W and its z vanish.
        inv_sqrt = torch.where(pivot > column[m + k], pivot, infinity).rsqrt_()
        torch.mul(fresh, inv_sqrt, out=w_views[s])
        alpha_ext.addcmul_(w_views[s], z_views[s], value=-1)


def _pick(
    table: Tensor, alpha_ext: Tensor, cap: Tensor, step: Tensor, score_floor: Tensor, n: int, k: int, nonnegative: bool
) -> None:
    """One pick of the greedy loop, the same arithmetic as :func:`_eager_picks`, as one compilable function.

    The step number is a device counter, so that every pick is the same function of the same shapes:
    compiled once, its operators fuse into a few kernels.
    """
    m = table.shape[1]
    alpha = alpha_ext[:n]
    score = alpha.clamp(min=score_floor) if nonnegative else alpha.abs().clamp(min=score_floor)
    lam = torch.fmin(score, cap).argmax().view(1)
    cap.index_fill_(0, lam, (step - k).to(cap.dtype))
    column = table.index_select(1, lam)
    fresh = torch.addmm(column[:m], table[m : m + k].T, column[m : m + k], alpha=-1)
    pivot = fresh.index_select(0, lam)
    inv_sqrt = torch.where(pivot > column[m + k], pivot, torch.inf).rsqrt()
    new = fresh * inv_sqrt  # column s of W, with z[s] at coordinate n
    table[m : m + k].index_copy_(0, step.view(1), new.T)
    alpha_ext.sub_(new * new[n])
    step.add_(1)


@functools.cache
def _compiled_pick() -> Callable[..., None]:
    return torch.compile(_pick, fullgraph=True, dynamic=False)


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


def _copy_rows(dst: Tensor, src: Tensor) -> None:
    """``dst.copy_(src)`` for matrices, a few rows at a time (see ``_COPY_CHUNK``)."""
    rows = max(1, _COPY_CHUNK // max(1, src.shape[1]))
    for start in range(0, src.shape[0], rows):
        dst[start : start + rows].copy_(src[start : start + rows])
