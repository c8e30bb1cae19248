"""The variance of the TensorSketch estimate of a gradient inner product, against a Monte Carlo estimate."""

import math

import torch

from lightning_sbp.functional.sketch import gradient_sketch

SKETCH_DIM = 64


def _gradients(n: int, positions: int, dim: int, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``[N, T, D]``, logit gradients ``[N, T, C]`` and the gradient matrices ``G_i`` ``[N, C, D + 1]``.

    The first two examples have one position with a loss, so their ``G_i`` are rank one (a language model's
    single-token sequences, a classifier's examples): the case where the sketch errs most.
    """
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(n, positions, dim, generator=generator, dtype=torch.float64)
    logit_grads = torch.randn(n, positions, classes, generator=generator, dtype=torch.float64)
    logit_grads[:2, 1:] = 0.0
    with_bias = torch.cat([features, torch.ones(n, positions, 1, dtype=torch.float64)], dim=2)
    return features, logit_grads, torch.einsum("ntc,ntd->ncd", logit_grads, with_bias)


def sketch_variance(x: torch.Tensor, y: torch.Tensor, sketch_dim: int) -> float:
    """The exact variance of ``s(X) · s(Y)`` for a degree-two TensorSketch with fully random hashes.

    ``X, Y`` are ``C × F`` matrices; the sketch hashes rows (classes) and columns (features) apart. A pair of
    entries collides when both their rows and columns collide, when the rows are equal and the columns
    collide, or the other way round; the second and third cases make the terms ``‖X Yᵀ‖²``, ``‖Xᵀ Y‖²`` and
    their traces, each as large as ``‖X‖² ‖Y‖²`` for rank-one ``X = Y``. The ``gcd(2, m)`` counts the
    solutions of ``2b = 0`` modulo ``m``. The same expression is stated in docs/selectors.md.
    """
    kappa = (x * y).sum()
    norms = x.square().sum() * y.square().sum()
    rows, columns = x @ y.T, x.T @ y  # C × C and F × F
    row_dots, column_dots = (x * y).sum(1).square().sum(), (x * y).sum(0).square().sum()
    row_norms = (x.square().sum(1) * y.square().sum(1)).sum()
    column_norms = (x.square().sum(0) * y.square().sum(0)).sum()
    diagonal = (x * y).square().sum()
    leading = (
        norms
        - row_norms
        - column_norms
        + diagonal
        + kappa**2
        - row_dots
        - column_dots
        + diagonal
        + rows.square().sum()
        + torch.trace(rows @ rows)
        - 2 * row_dots
        + columns.square().sum()
        + torch.trace(columns @ columns)
        - 2 * column_dots
    )
    second = rows.square().sum() + columns.square().sum() - row_dots - column_dots - row_norms - column_norms
    second = second + 2 * diagonal
    return float(leading / sketch_dim + math.gcd(2, sketch_dim) * second / sketch_dim**2)


def test_sketched_inner_products_have_the_documented_variance() -> None:
    features, logit_grads, matrices = _gradients(n=4, positions=3, dim=15, classes=16)
    n, trials = matrices.shape[0], 3000
    generator = torch.Generator().manual_seed(1)
    samples = torch.stack(
        [(lambda s: s @ s.T)(gradient_sketch(features, logit_grads, SKETCH_DIM, seed=generator)) for _ in range(trials)]
    )
    exact = torch.einsum("icd,jcd->ij", matrices, matrices)
    squared_norms = matrices.square().sum(dim=(1, 2))
    for i in range(n):
        for j in range(i, n):
            estimates = samples[:, i, j]
            centred = estimates - estimates.mean()
            variance = float(centred.square().mean())
            # The sample variance of 3000 draws errs by sqrt((μ₄ − σ⁴) / trials), estimated from the draws; 5 of
            # those standard errors, so that ten fixed-seed comparisons hold with room to spare on any processor.
            spread = 5 * float((centred.pow(4).mean() - centred.square().mean() ** 2).sqrt()) / math.sqrt(trials)
            scale = float(squared_norms[i] * squared_norms[j])
            assert abs(float(estimates.mean() - exact[i, j])) <= 5 * math.sqrt(variance / trials), (i, j)  # unbiased
            expected = sketch_variance(matrices[i], matrices[j], SKETCH_DIM)
            assert abs(variance - expected) <= spread, (i, j, variance, expected, spread)
            # The documented bound, (6 + 2 gcd(2, m) / m) ‖g_i‖² ‖g_j‖² / m, at most 10 ‖g_i‖² ‖g_j‖² / m.
            assert expected <= (6 + 2 * math.gcd(2, SKETCH_DIM) / SKETCH_DIM) * scale / SKETCH_DIM
            if i == j:
                # The count-sketch term alone, (‖g_i‖² ‖g_j‖² + K_ij²) / m, even with the largest second-order
                # term 2 gcd(2, m) ‖g_i‖² ‖g_j‖² / m² added, is too small for a squared norm.
                count_sketch = (scale + float(exact[i, j]) ** 2) / SKETCH_DIM + 4 * scale / SKETCH_DIM**2
                assert variance - spread > count_sketch, (i, variance, count_sketch)
