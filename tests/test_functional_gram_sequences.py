"""The last-layer Gram matrix of heads applied at every position, against autograd in float64."""

import math

import pytest
import torch
import torch.nn.functional as F
from tolerances import SIGMAS, assert_within, gamma
from torch import nn

from lightning_sbp.functional.gram import choose_form, gradient_gram, gradient_norm_bound
from lightning_sbp.functional.sketch import gradient_sketch

IGNORE = -100


def _gram_tolerance(features: torch.Tensor, logit_grads: torch.Tensor) -> torch.Tensor:
    """Bound on the difference of two computations of ``K_ij = Σ_{t,s} (h_it·h_js + 1)(p_it·p_js)``.

    Any order of summing the ``T² (D + 1) C`` products, by position pairs or per example, errs by ``γ`` times
    the same sum over absolute values, which positions that cancel do not shrink; the per-position
    logit gradients (a softmax over ``C`` classes, divided by the count of positions) add ``C + 8`` roundings.
    """
    _, positions, dim = features.shape
    classes = logit_grads.shape[2]
    h, p = features.abs(), logit_grads.abs()
    magnitude = torch.einsum("itd,jsd,itc,jsc->ij", h, h, p, p) + torch.einsum("itc,jsc->ij", p, p)
    return 2 * gamma(positions * positions * (dim + 1) * classes + classes + 8, features.dtype) * magnitude


def _token_loss(logits: torch.Tensor, targets: torch.Tensor, shift: bool) -> torch.Tensor:
    """Per-example mean cross-entropy over the positions whose target is not ``IGNORE``, shape ``[N]``."""
    if shift:  # causal LM: position t predicts token t + 1
        logits, targets = logits[:, :-1], targets[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE)
    counted = (targets != IGNORE).sum(dim=1).clamp_min(1)
    return losses.sum(dim=1) / counted


def _sequence_problem(
    n: int, positions: int, dim: int, classes: int, bias: bool, shift: bool, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features ``[N, T, D]``, autograd logit gradients ``[N, T, C]`` and per-example gradients ``[N, P]``."""
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(dim, classes, bias=bias).double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    features = torch.randn(n, positions, dim, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, classes, (n, positions), generator=generator)
    masked = torch.rand(n, positions, generator=generator) < 0.3
    targets[masked] = IGNORE
    targets[0, :] = IGNORE  # an example without any counted position has a zero gradient

    rows = []
    for i in range(n):
        loss = _token_loss(layer(features[i : i + 1]), targets[i : i + 1], shift).sum()
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(layer.parameters()))]))
    logits = layer(features).detach().requires_grad_(True)
    (logit_grads,) = torch.autograd.grad(_token_loss(logits, targets, shift).sum(), logits)
    return features, logit_grads, torch.stack(rows)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shift", [False, True], ids=["token_classification", "causal_lm"])
@pytest.mark.parametrize("form", ["auto", "token_pairs", "per_example"])
@pytest.mark.parametrize("chunk_elements", [1 << 24, 7], ids=["one_block", "many_blocks"])
def test_sequence_gram_matches_autograd(bias: bool, shift: bool, form: str, chunk_elements: int) -> None:
    features, logit_grads, grads = _sequence_problem(6, 5, 4, 3, bias, shift)
    gram = gradient_gram(features, logit_grads, bias=bias, form=form, chunk_elements=chunk_elements)  # type: ignore[arg-type]
    assert gram.dtype == torch.float64
    assert_within(gram, grads @ grads.T, _gram_tolerance(features, logit_grads), "gram")
    assert float(gram[0].abs().max()) == 0.0  # the example whose positions are all masked


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("positions", "dim", "classes"), [(3, 5, 4), (2, 8, 8), (1, 5, 4)])
def test_sequence_gradient_norm_matches_autograd(bias: bool, positions: int, dim: int, classes: int) -> None:
    features, logit_grads, grads = _sequence_problem(5, positions, dim, classes, bias, shift=False, seed=3)
    # Compared squared: ‖g_i‖² sums position pairs that may cancel, so its error is bounded by the diagonal of
    # the Gram bound, not by ‖g_i‖², and the square root of a cancelled sum has no relative accuracy.
    tolerance = _gram_tolerance(features, logit_grads).diagonal()
    for chunk_elements in (1 << 24, 5):
        norms = gradient_norm_bound(features, logit_grads, bias=bias, chunk_elements=chunk_elements)
        assert_within(norms.square(), grads.norm(dim=1).square(), tolerance, f"squared norms, {chunk_elements}")


def test_two_dimensional_inputs_are_one_position() -> None:
    features, logit_grads, _ = _sequence_problem(7, 1, 4, 3, bias=True, shift=False, seed=4)
    flat = gradient_gram(features[:, 0], logit_grads[:, 0], chunk_elements=9)
    per_example = gradient_gram(features, logit_grads, form="per_example")
    assert_within(flat, per_example, _gram_tolerance(features, logit_grads), "one position")


def test_auto_takes_the_cheaper_exact_form() -> None:
    # Short sequences, large vocabulary: position pairs. Long sequences, small vocabulary: per example.
    assert choose_form(32, 4, 768, 50_000) == "token_pairs"
    assert choose_form(32, 512, 64, 8) == "per_example"
    assert choose_form(32, 512, 768, 50_257, sketch_dim=4096) == "sketch"
    assert choose_form(64, 1, 512, 10, sketch_dim=4096) == "token_pairs"


def test_half_precision_sequences_are_upcast() -> None:
    features, logit_grads, _ = _sequence_problem(4, 3, 5, 4, bias=True, shift=False, seed=5)
    gram = gradient_gram(features.to(torch.bfloat16), logit_grads.to(torch.float16), form="per_example")
    assert gram.dtype == torch.float32
    sketch = gradient_sketch(features.to(torch.bfloat16), logit_grads.to(torch.float16), 64)
    assert sketch.dtype == torch.float32


def test_sequence_validation() -> None:
    features, logit_grads = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="same number of positions"):
        gradient_gram(features, logit_grads[:, :2])
    with pytest.raises(ValueError, match=r"\[N, T, D\]"):
        gradient_gram(features, logit_grads[:, 0])
    with pytest.raises(ValueError, match="form must be one of"):
        gradient_gram(features, logit_grads, form="pairs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a sketch_dim"):
        gradient_gram(features, logit_grads, form="sketch")
    with pytest.raises(ValueError, match="sketch_dim must be a positive integer"):
        gradient_sketch(features, logit_grads, 0)
    with pytest.raises(ValueError, match="chunk_elements"):
        gradient_gram(features, logit_grads, chunk_elements=0)


# ----------------------------------------------------------------------------------------------- sketch


def _mid_size_gram() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features, logit_grads, grads = _sequence_problem(10, 6, 24, 40, bias=True, shift=True, seed=6)
    return features, logit_grads, grads @ grads.T


def _relative_error(estimate: torch.Tensor, exact: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(estimate - exact) / torch.linalg.matrix_norm(exact))


def test_sketch_is_seeded_and_chunking_does_not_change_it() -> None:
    features, logit_grads, _ = _mid_size_gram()
    one = gradient_sketch(features, logit_grads, 128, seed=3)
    # Chunks only regroup the sum over positions of the spectra; every entry of a sketch is a signed sum of
    # products |p_itc| |h_itd| (the FFTs add 2 log2(m) roundings), so the sum of all of them bounds its error.
    magnitude = torch.einsum("itc,itd->i", logit_grads.abs(), features.abs()) + logit_grads.abs().sum(dim=(1, 2))
    tolerance = 4 * gamma(features.shape[1] + 2 * int(math.log2(128)) + 8, torch.float64) * magnitude.unsqueeze(1)
    assert_within(gradient_sketch(features, logit_grads, 128, seed=3, chunk_elements=50), one, tolerance, "chunks")
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(gradient_sketch(features, logit_grads, 128, seed=generator), one), "the same projection"
    # Another seed is another estimate: entries differ by the sketch's own error, far above rounding.
    assert ((gradient_sketch(features, logit_grads, 128, seed=4) - one).abs() > tolerance).any()


def test_sketch_is_unbiased() -> None:
    features, logit_grads, exact = _mid_size_gram()
    seeds = 200
    draws = torch.stack(
        [gradient_gram(features, logit_grads, form="sketch", sketch_dim=64, seed=seed) for seed in range(seeds)]
    )
    # Every entry's mean over the seeds is within SIGMAS standard errors of the exact entry, the standard errors
    # estimated from the draws: a bias of a third of one sketch's error in any entry would show.
    standard_errors = draws.std(dim=0) / seeds**0.5
    assert_within(draws.mean(dim=0), exact, SIGMAS * standard_errors, "mean of the sketched Gram matrices")


def test_sketch_error_falls_like_one_over_root_sketch_dim() -> None:
    """RMS relative (Frobenius) error over seeds, against the documented bound and the 1/sqrt(m) rate."""
    features, logit_grads, exact = _mid_size_gram()
    dims = [64, 256, 1024, 4096]
    seeds = 12
    errors = []
    for dim in dims:
        squared = [
            _relative_error(gradient_gram(features, logit_grads, form="sketch", sketch_dim=dim, seed=s), exact) ** 2
            for s in range(seeds)
        ]
        errors.append(math.sqrt(sum(squared) / seeds))
    # The documented bound, E‖K̃ − K‖_F² ≤ (6 + 2 gcd(2, m) / m) / m · Σ_ij ‖g_i‖²‖g_j‖² = (…) tr(K)², relative to
    # ‖K‖_F. Here the RMS error is about half of it, and its own sampling error over 12 seeds about 11%.
    scale = float(exact.diagonal().sum() / torch.linalg.matrix_norm(exact))
    for dim, error in zip(dims, errors, strict=True):
        assert error <= math.sqrt((6 + 2 * math.gcd(2, dim) / dim) / dim) * scale
    # The rate: a fitted log-log slope of -1/2 within ±0.15, so the error falls by a factor of 8 over 64x. With
    # 11% noise on each log error, the slope's standard error over four dimensions a factor 4 apart is 0.035.
    xs = [math.log(dim) for dim in dims]
    ys = [math.log(error) for error in errors]
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True)) / sum((x - x_mean) ** 2 for x in xs)
    assert -0.65 <= slope <= -0.35, (errors, slope)
