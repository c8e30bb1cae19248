import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_sbp.functional.gram import gradient_gram, gradient_norm_bound, last_layer_gram, logit_gradients

N, D, C = 9, 5, 4


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
    torch.testing.assert_close(gram, grads @ grads.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(("label_smoothing", "weighted"), LOSS_VARIANTS)
def test_logit_gradients_match_autograd(label_smoothing: float, weighted: bool) -> None:
    torch.manual_seed(1)
    logits = torch.randn(N, C, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, C, (N,))
    weight = torch.rand(C, dtype=torch.float64) + 0.5 if weighted else None
    loss = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing, weight=weight)
    (expected,) = torch.autograd.grad(loss.sum(), logits)  # example i's loss depends on row i only
    actual = logit_gradients(logits.detach(), targets, label_smoothing=label_smoothing, weight=weight)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def test_logit_gradients_plain_is_softmax_minus_onehot() -> None:
    logits = torch.randn(N, C)
    targets = torch.randint(0, C, (N,))
    expected = logits.softmax(dim=1) - F.one_hot(targets, C).float()
    torch.testing.assert_close(logit_gradients(logits, targets), expected)


def test_half_precision_is_upcast() -> None:
    logits = torch.randn(N, C).to(torch.bfloat16)
    features = torch.randn(N, D).to(torch.float16)
    targets = torch.randint(0, C, (N,))
    grads = logit_gradients(logits, targets)
    assert grads.dtype == torch.float32
    assert gradient_gram(features, grads).dtype == torch.float32
    assert gradient_norm_bound(features, grads).dtype == torch.float32
    torch.testing.assert_close(grads, logit_gradients(logits.float(), targets))


@pytest.mark.parametrize("bias", [True, False])
def test_gradient_norm_bound_is_the_per_example_gradient_norm(bias: bool) -> None:
    layer, features, targets = _problem(bias, seed=2)
    weight = torch.rand(C, dtype=torch.float64) + 0.5
    grads = _per_example_grads(layer, features, targets, 0.1, weight)
    with torch.no_grad():
        logit_grads = logit_gradients(layer(features), targets, label_smoothing=0.1, weight=weight)
    norms = gradient_norm_bound(features, logit_grads, bias=bias)
    torch.testing.assert_close(norms, grads.norm(dim=1), rtol=1e-10, atol=1e-12)
    gram = gradient_gram(features, logit_grads, bias=bias)
    torch.testing.assert_close(norms, gram.diagonal().sqrt(), rtol=1e-10, atol=1e-12)


def test_bias_adds_the_outer_product_of_logit_gradients() -> None:
    features = torch.randn(N, D, dtype=torch.float64)
    logit_grads = torch.randn(N, C, dtype=torch.float64)
    difference = gradient_gram(features, logit_grads, bias=True) - gradient_gram(features, logit_grads, bias=False)
    torch.testing.assert_close(difference, logit_grads @ logit_grads.T)


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
