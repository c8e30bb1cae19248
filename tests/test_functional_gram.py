import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_within, gamma
from torch import nn

from lightning_sbp.functional.gram import gradient_gram, gradient_norm_bound, last_layer_gram, logit_gradients

N, D, C = 9, 5, 4
# Roundings behind one logit gradient: the softmax's sum over C classes, its division, the smoothing and the
# class weight; the logits here are far from saturation, so softmax − target keeps that relative accuracy.
LOGIT_GRADIENT_ROUNDINGS = C + 8


def _gram_tolerance(grads: torch.Tensor) -> torch.Tensor:
    """Bound on the difference of two computations of ``K_ij = Σ_p g_ip g_jp`` from rounded ``g``: each sums the
    same ``P`` products in its own order (``(h·h + 1)(p·p)`` or a plain inner product) of factors that carry
    ``LOGIT_GRADIENT_ROUNDINGS`` roundings, so each errs by ``γ_{P + c} Σ_p |g_ip| |g_jp|``."""
    return 2 * gamma(grads.shape[1] + LOGIT_GRADIENT_ROUNDINGS, grads.dtype) * (grads.abs() @ grads.abs().T)


def _problem(bias: bool, seed: int = 0) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    layer = nn.Linear(D, C, bias=bias).double()
    features = torch.randn(N, D, dtype=torch.float64)
    targets = torch.randint(0, C, (N,))
    return layer, features, targets


def _per_example_grads(
    layer: nn.Linear, features: torch.Tensor, targets: torch.Tensor, label_smoothing: float, weight: torch.Tensor | None
) -> torch.Tensor:
    """[N, P]: the flattened gradient of each example's loss w.r.t. the layer's parameters, by autograd."""
    params = list(layer.parameters())
    rows = []
    for i in range(features.shape[0]):
        logits = layer(features[i : i + 1])
        loss = F.cross_entropy(
            logits, targets[i : i + 1], reduction="none", label_smoothing=label_smoothing, weight=weight
        ).sum()
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


LOSS_VARIANTS = [
    pytest.param(0.0, False, id="plain"),
    pytest.param(0.2, False, id="label_smoothing"),
    pytest.param(0.0, True, id="class_weights"),
    pytest.param(0.3, True, id="smoothing_and_weights"),
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("label_smoothing", "weighted"), LOSS_VARIANTS)
def test_last_layer_gram_matches_autograd(bias: bool, label_smoothing: float, weighted: bool) -> None:
    layer, features, targets = _problem(bias)
    weight = torch.rand(C, dtype=torch.float64) + 0.5 if weighted else None
    grads = _per_example_grads(layer, features, targets, label_smoothing, weight)
    with torch.no_grad():
        logits = layer(features)
    gram = last_layer_gram(features, logits, targets, bias=bias, label_smoothing=label_smoothing, weight=weight)
    assert gram.dtype == torch.float64
    assert_within(gram, grads @ grads.T, _gram_tolerance(grads), "gram")


@pytest.mark.parametrize(("label_smoothing", "weighted"), LOSS_VARIANTS)
def test_logit_gradients_match_autograd(label_smoothing: float, weighted: bool) -> None:
    torch.manual_seed(1)
    logits = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, C, (N,))
    weight = torch.rand(C, dtype=torch.float64) + 0.5 if weighted else None
    loss = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing, weight=weight)
    (expected,) = torch.autograd.grad(loss.sum(), logits)  # example i's loss depends on row i only
    actual = logit_gradients(logits.detach(), targets, label_smoothing=label_smoothing, weight=weight)
    # Each entry is a class weight times (softmax − target), of magnitude at most 2 max(weight); both sides
    # round it LOGIT_GRADIENT_ROUNDINGS times.
    scale = 2 * (1.0 if weight is None else float(weight.max()))
    assert_within(actual, expected, 2 * gamma(LOGIT_GRADIENT_ROUNDINGS, torch.float64) * scale, "logit gradients")


def test_logit_gradients_plain_is_softmax_minus_onehot() -> None:
    logits = torch.randn(N, C)
    targets = torch.randint(0, C, (N,))
    expected = logits.softmax(dim=1) - F.one_hot(targets, C).float()
    # Entries of magnitude at most 1, rounded LOGIT_GRADIENT_ROUNDINGS times on either side, in float32.
    assert_within(logit_gradients(logits, targets), expected, 2 * gamma(LOGIT_GRADIENT_ROUNDINGS, torch.float32))


def test_half_precision_is_upcast() -> None:
    logits = torch.randn(N, C).to(torch.bfloat16)
    features = torch.randn(N, D).to(torch.float16)
    targets = torch.randint(0, C, (N,))
    grads = logit_gradients(logits, targets)
    assert grads.dtype == torch.float32
    assert gradient_gram(features, grads).dtype == torch.float32
    assert gradient_norm_bound(features, grads).dtype == torch.float32
    # The same float32 computation on the same values: equal to a few float32 ulps of entries at most 1, while
    # a computation in bfloat16 would differ by its ulp, 2^-8.
    assert_within(grads, logit_gradients(logits.float(), targets), 2 * gamma(LOGIT_GRADIENT_ROUNDINGS, torch.float32))


@pytest.mark.parametrize("bias", [True, False])
def test_gradient_norm_bound_is_the_per_example_gradient_norm(bias: bool) -> None:
    layer, features, targets = _problem(bias, seed=2)
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    grads = _per_example_grads(layer, features, targets, 0.1, weight)
    with torch.no_grad():
        logit_grads = logit_gradients(layer(features), targets, label_smoothing=0.1, weight=weight)
    norms = gradient_norm_bound(features, logit_grads, bias=bias)
    # A sum of squares does not cancel: its rounding is relative to the result, and the square root halves it.
    relative = gamma(grads.shape[1] + LOGIT_GRADIENT_ROUNDINGS, torch.float64)
    assert_within(norms, grads.norm(dim=1), 2 * relative * grads.norm(dim=1), "norms")
    gram = gradient_gram(features, logit_grads, bias=bias)
    assert_within(norms, gram.diagonal().sqrt(), 2 * relative * norms, "norms against the Gram diagonal")


def test_bias_adds_the_outer_product_of_logit_gradients() -> None:
    features = torch.randn(N, D, dtype=torch.float64)
    logit_grads = torch.randn(N, C, dtype=torch.float64)
    difference = gradient_gram(features, logit_grads, bias=True) - gradient_gram(features, logit_grads, bias=False)
    # Each Gram errs by γ (|H||H|ᵀ + 1) ∘ (|P||P|ᵀ) (sums of D and C terms, then a product): the difference
    # cancels, its error does not.
    magnitude = (features.abs() @ features.abs().T + 1) * (logit_grads.abs() @ logit_grads.abs().T)
    assert_within(difference, logit_grads @ logit_grads.T, 3 * gamma(D + C + 2, torch.float64) * magnitude)


def test_logit_gradient_validation() -> None:
    logits = torch.randn(N, C)
    targets = torch.randint(0, C, (N,))
    with pytest.raises(ValueError, match="logits must have shape"):
        logit_gradients(logits[0], targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        logit_gradients(logits, targets[:-1])
    with pytest.raises(ValueError, match="integer class indices"):
        logit_gradients(logits, targets.float())
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        logit_gradients(logits, torch.full((N,), C))
    with pytest.raises(ValueError, match=r"in \[0, 4\)"):
        logit_gradients(logits, torch.full((N,), -1))
    with pytest.raises(ValueError, match="label_smoothing"):
        logit_gradients(logits, targets, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must have shape"):
        logit_gradients(logits, targets, weight=torch.ones(C + 1))
    with pytest.raises(ValueError, match="floating point"):
        logit_gradients(logits.long(), targets)


def test_gram_validation() -> None:
    features = torch.randn(N, D)
    logit_grads = torch.randn(N, C)
    with pytest.raises(ValueError, match="same number of rows"):
        gradient_gram(features[:-1], logit_grads)
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        gradient_gram(features.reshape(N, D, 1), logit_grads)
    with pytest.raises(ValueError, match="same number of rows"):
        gradient_norm_bound(features, logit_grads[:-1])
