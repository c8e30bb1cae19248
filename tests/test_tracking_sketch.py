"""Gradient-error tracking on a sketch of the last-layer gradients, for heads too large for the exact Gram matrix."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_sbp import SelectiveBackprop
from lightning_sbp.functional.gram import choose_form
from lightning_sbp.selectors import Scores
from lightning_sbp.tracking import GradientErrorTracker

N, T, D, C = 4, 128, 768, 8192


def wide_head_scores() -> Scores:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(N, T, D, generator=generator)
    logit_grads = torch.randn(N, T, C, generator=generator) / C
    return Scores(losses=torch.ones(N), logits=torch.zeros(N, T, C), logit_grads=logit_grads, features=features)


def test_the_sketched_gram_estimates_the_exact_one_and_is_drawn_apart_from_the_selectors() -> None:
    assert choose_form(N, T, D, C, sketch_dim=2048) == "sketch", "the test's head must be wide enough to sketch"
    scores = wide_head_scores()
    exact = GradientErrorTracker().gram(scores)
    tracker = GradientErrorTracker(sketch_dim=2048)
    sketched = tracker.gram(scores, seed=1)
    assert not torch.equal(sketched, exact)
    # The documented bound on the RMS relative error, sqrt((6 + 4/m) / m) tr(K) / ‖K‖_F, is 0.11 here. This seeded
    # draw measures 0.03, a fifth of the threshold; a sketch of the wrong scale or variance errs by order 1.
    error = torch.linalg.matrix_norm(sketched - exact) / torch.linalg.matrix_norm(exact)
    bound = math.sqrt((6 + 4 / 2048) / 2048) * float(exact.diagonal().sum() / torch.linalg.matrix_norm(exact))
    assert float(error) < 1.4 * bound
    # Another seed is another estimate, cached apart: a selector's sketch is never the tracker's.
    assert not torch.equal(tracker.gram(scores, seed=2), sketched)
    assert torch.equal(tracker.gram(scores, seed=1), sketched)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "64"])
def test_grad_error_sketch_dim_is_validated(bad: object) -> None:
    with pytest.raises(ValueError, match="grad_error_sketch_dim"):
        SelectiveBackprop(grad_error_sketch_dim=bad)  # type: ignore[arg-type]
