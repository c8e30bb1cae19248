from __future__ import annotations

import torch
import torch.nn.functional as F
from tolerances import assert_within, gamma

from lightning_sbp.functional import (
    per_example_binary_cross_entropy,
    per_example_cross_entropy,
    per_example_squared_error,
)


def _cross_entropy_tolerance(logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bound on two computations of ``logsumexp(z) − z_t`` in ``dtype``: the loss cancels, its error is relative
    to the logits (a sum of ``C`` exponentials and its logarithm, ``γ_{C+4}`` of ``max|z| + log C`` each)."""
    classes = logits.shape[-1]
    return 2 * gamma(classes + 4, dtype) * (logits.abs().amax(dim=-1) + torch.log(torch.tensor(float(classes))))


def test_class_logits_give_plain_cross_entropy() -> None:
    logits, targets = torch.randn(5, 4), torch.randint(4, (5,))
    expected = torch.stack([F.cross_entropy(logits[i : i + 1], targets[i : i + 1]) for i in range(5)])
    assert_within(per_example_cross_entropy(logits, targets), expected, _cross_entropy_tolerance(logits, torch.float32))


def test_token_logits_average_over_the_counted_positions_of_each_example() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=generator, dtype=torch.float64)
    targets = torch.randint(5, (3, 6), generator=generator)
    targets[0, 4:] = -100
    targets[2] = -100
    losses = per_example_cross_entropy(logits, targets)
    for i in range(2):
        kept = targets[i] != -100
        expected = F.cross_entropy(logits[i][kept], targets[i][kept])
        # Returned in float32: the rounding of a float32 mean of float32 token losses, each within its bound.
        tolerance = _cross_entropy_tolerance(logits[i][kept], torch.float32).max() * (1 + gamma(6, torch.float32))
        assert_within(losses[i], expected, tolerance, f"example {i}")
    assert losses[2] == 0.0
    assert losses.dtype == torch.float32 and losses.shape == (3,)


def test_squared_error_and_binary_cross_entropy_average_each_examples_outputs_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(6, 3, generator=generator).bfloat16()
    targets = torch.rand(6, 3, generator=generator)
    squared = per_example_squared_error(outputs, targets)
    binary = per_example_binary_cross_entropy(outputs, targets)
    assert squared.dtype == binary.dtype == torch.float32 and squared.shape == binary.shape == (6,)
    # float64 references on the same bfloat16 values. The squared error sums non-negative terms, each a rounded
    # difference squared (2 roundings), then 2 additions and a division: within γ_5 of its value.
    exact = outputs.double()
    expected_squared = (exact - targets.double()).square().mean(1)
    assert_within(squared, expected_squared, gamma(5, torch.float32) * expected_squared, "squared error")
    # Binary cross-entropy with logits, max(x, 0) − x·t + log(1 + e^−|x|), cancels: each term errs by a few
    # roundings of its parts' magnitudes, at most 2|x| + log 2 (t in [0, 1]); the mean adds 3 more roundings.
    expected = F.binary_cross_entropy(torch.sigmoid(exact), targets.double(), reduction="none").mean(1)
    magnitude = (2 * exact.abs() + torch.log(torch.tensor(2.0, dtype=torch.float64))).mean(1)
    assert_within(binary, expected, gamma(8, torch.float32) * magnitude, "binary cross-entropy")
    # one output per example, squeezed or not, is the same regression
    column = (outputs[:, 0].float() - targets[:, 0]).square()
    torch.testing.assert_close(per_example_squared_error(outputs[:, 0], targets[:, :1]), column)
    torch.testing.assert_close(per_example_squared_error(outputs[:, :1], targets[:, 0]), column)
