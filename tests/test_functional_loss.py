from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_sbp.functional import per_example_cross_entropy


def test_class_logits_give_plain_cross_entropy() -> None:
    logits, targets = torch.randn(5, 4), torch.randint(4, (5,))
    expected = torch.stack([F.cross_entropy(logits[i : i + 1], targets[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(per_example_cross_entropy(logits, targets), expected)


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
        torch.testing.assert_close(losses[i], expected.float())
    assert losses[2] == 0.0
    assert losses.dtype == torch.float32 and losses.shape == (3,)
