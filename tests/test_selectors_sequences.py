"""Selectors on the scores of a head applied at every position ([N, T, D] features, [N, T, C] logits)."""

import torch
from tolerances import assert_within, solve_tolerance

from lightning_sbp.functional import gradient_gram, omp_gram, random_subset_gradient_error, subset_gradient_error
from lightning_sbp.selectors import Scores
from lightning_sbp.selectors.gradnorm import GradNormSelector
from lightning_sbp.selectors.omp import OMPSelector


def _scores(n: int, positions: int, dim: int, classes: int, seed: int = 0) -> Scores:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, positions, dim, generator=generator)
    logits = torch.randn(n, positions, classes, generator=generator)
    targets = torch.randint(0, classes, (n, positions), generator=generator)
    logit_grads = (logits.softmax(dim=2) - torch.nn.functional.one_hot(targets, classes)) / positions
    losses = torch.rand(n, generator=generator)
    return Scores(losses=losses, logits=logits, logit_grads=logit_grads, features=features, bias=True)


def test_omp_on_sequences_runs_on_the_exact_gram() -> None:
    scores = _scores(10, 6, 8, 5)
    selection = OMPSelector(weights="raw").select(scores, 4, torch.Generator().manual_seed(0))
    gram = gradient_gram(scores.features, scores.logit_grads)  # type: ignore[arg-type]
    indices, coef = omp_gram(gram, gram.mean(dim=1), 4)
    assert torch.equal(selection.indices, indices)
    # The selector's float32 fit against this one: two forward errors of the solve, times k = 4.
    tolerance = 2 * 4 * solve_tolerance(gram[indices][:, indices], coef, torch.float32)
    assert_within(selection.weights, 4 * coef, tolerance, "raw weights")


def test_omp_with_a_sketch_matches_the_batch_gradient_better_than_random() -> None:
    scores = _scores(8, 16, 64, 20_000, seed=1)  # large vocabulary: the sketch is the cheapest form
    exact = gradient_gram(scores.features, scores.logit_grads)  # type: ignore[arg-type]
    selection = OMPSelector(weights="raw", sketch_dim=512).select(scores, 4, torch.Generator().manual_seed(0))
    # It did sketch: the sketch's error (about 10% of the entries at m = 512) is far above torch's default
    # tolerance, as a float32 rounding of the exact matrix would not be.
    assert not torch.allclose(scores.gram_in(torch.float32, 512), exact)
    assert selection.indices.unique().numel() == 4
    error = subset_gradient_error(exact, selection.indices, selection.weights)
    assert error < random_subset_gradient_error(exact, 4)


def test_gradnorm_on_sequences_samples_by_the_exact_norms() -> None:
    scores = _scores(12, 5, 6, 4, seed=2)
    scores.features[3] = 0.0  # with bias, a zero feature still has a gradient through the bias
    scores.logit_grads[5] = 0.0  # no gradient at all: never sampled
    chosen = torch.zeros(12)
    for seed in range(50):
        selection = GradNormSelector().select(scores, 4, torch.Generator().manual_seed(seed))
        chosen[selection.indices] += 1
    assert chosen[5] == 0
    assert chosen.sum() == 200


def test_nonfinite_sequences_count_as_zero_gradients() -> None:
    scores = _scores(6, 3, 4, 3, seed=3)
    scores.features[2, 1, 0] = float("nan")
    gram = scores.gram
    assert torch.isfinite(gram).all()
    assert float(gram[2].abs().max()) == 0.0
