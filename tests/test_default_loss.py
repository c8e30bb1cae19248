"""The default per-example loss follows the targets: each rule against an independent float64 reference."""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ddp_models import default_loss_worker, run_two_processes
from dispatch import DispatchRecorder
from tolerances import assert_within, gamma
from torch import Tensor

from lightning_sbp.default_loss import DefaultLoss, NoDefaultLoss, choose_loss


def squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    n = outputs.shape[0]
    return F.mse_loss(outputs.double().reshape(n, -1), targets.double().reshape(n, -1), reduction="none").mean(1)


def binary_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    n = outputs.shape[0]
    probabilities = torch.sigmoid(outputs.double().reshape(n, -1))
    return F.binary_cross_entropy(probabilities, targets.double().reshape(n, -1), reduction="none").mean(1)


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    log_probabilities = torch.log_softmax(outputs.double(), dim=-1)
    if targets.is_floating_point() and targets.shape == outputs.shape:
        return -(targets.double() * log_probabilities).sum(-1)
    return -log_probabilities.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def loss_tolerance(name: str, outputs: Tensor, targets: Tensor) -> Tensor:
    """Bound on ``|float32 loss − float64 loss|`` per example, from the terms each loss sums over its ``m`` outputs.

    Squared error: ``m`` rounded squares of rounded differences, positive, so relative to the loss. Binary
    cross-entropy: per output ``(1 − t) x − log σ(x)``, whose terms are at most ``|x|`` and ``|x| + log 2``, then a
    mean. Cross-entropy: ``logsumexp(x) − Σ_c t_c x_c`` with ``Σ_c t_c = 1`` (a sum of ``m`` exponentials, its
    logarithm and ``m`` products), relative to ``2 max|x| + log m``. Doubled: the float64 reference rounds too.
    """
    n = outputs.shape[0]
    x = outputs.double().reshape(n, -1)
    m = x.shape[1]
    if name == "squared error":
        return 2 * gamma(m + 4, torch.float32) * squared_error(outputs, targets)
    if name.startswith("binary"):
        return 2 * gamma(m + 6, torch.float32) * (2 * x.abs() + math.log(2)).mean(1)
    return 2 * gamma(2 * m + 4, torch.float32) * (2 * x.abs().amax(1) + math.log(m))


def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def soft_labels(n: int, classes: int) -> Tensor:
    g = generator()
    first, second = torch.randint(classes, (n,), generator=g), torch.randint(classes, (n,), generator=g)
    mix = torch.rand(n, 1, generator=g)
    return mix * F.one_hot(first, classes) + (1 - mix) * F.one_hot(second, classes)


CASES: dict[str, tuple[tuple[int, ...], Callable[[], Tensor], str, Callable[[Tensor, Tensor], Tensor]]] = {
    # name: (outputs' shape, targets, the loss's name, reference)
    "class indices": ((8, 4), lambda: torch.randint(4, (8,), generator=generator()), "cross-entropy", cross_entropy),
    "regression [N, 1]": ((8, 1), lambda: torch.randn(8, 1, generator=generator()), "squared error", squared_error),
    "regression [N]": ((8,), lambda: torch.randn(8, generator=generator()), "squared error", squared_error),
    "regression [N, 1] on [N] targets": (
        (8, 1),
        lambda: torch.randn(8, generator=generator()),
        "squared error",
        squared_error,
    ),
    "integer ratings on one output": (
        (8,),
        lambda: torch.randint(1, 6, (8,), generator=generator()),
        "squared error",
        squared_error,
    ),
    "binary logit, float labels": (
        (8, 1),
        lambda: torch.randint(2, (8, 1), generator=generator()).float(),
        "binary cross-entropy with logits",
        binary_cross_entropy,
    ),
    "binary logit, integer labels": (
        (8,),
        lambda: torch.randint(2, (8,), generator=generator()),
        "binary cross-entropy with logits",
        binary_cross_entropy,
    ),
    "multi-hot labels": (
        (8, 5),
        lambda: torch.randint(2, (8, 5), generator=generator()).float(),
        "binary cross-entropy with logits",
        binary_cross_entropy,
    ),
    "soft labels": ((8, 5), lambda: soft_labels(8, 5), "cross-entropy against class probabilities", cross_entropy),
    "soft labels in bfloat16": (
        (8, 5),
        lambda: soft_labels(8, 5).bfloat16(),
        "cross-entropy against class probabilities",
        cross_entropy,
    ),
    "regression with several outputs": (
        (8, 3),
        lambda: torch.randn(8, 3, generator=generator()),
        "squared error",
        squared_error,
    ),
    "class indices stored as floats": (
        (8, 4),
        lambda: torch.randint(4, (8,), generator=generator()).float(),
        "cross-entropy",
        cross_entropy,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_picks_its_loss_and_computes_it_per_example(case: str) -> None:
    shape, make_targets, name, reference = CASES[case]
    outputs = 2 * torch.randn(shape, generator=torch.Generator().manual_seed(1))
    targets = make_targets()
    choice = choose_loss(outputs, targets)
    assert choice.name == name
    losses = choice.loss_fn(outputs, targets)
    assert losses.dtype == torch.float32 and losses.shape == (shape[0],)
    assert_within(losses, reference(outputs, targets), loss_tolerance(name, outputs, targets), case)
    assert losses.std() > 0, "a loss that does not depend on the outputs would rank nothing"


def test_cross_entropy_on_a_single_output_is_never_chosen() -> None:
    outputs, targets = torch.randn(8, 1), torch.randn(8, 1)
    assert torch.equal(F.cross_entropy(outputs, targets, reduction="none"), torch.zeros(8)), "the trap it avoids"
    assert choose_loss(outputs, targets).name == "squared error"


def test_class_indices_are_decided_with_one_read_of_the_outputs() -> None:
    # Integer targets are class indices by their dtype; one read tells logits from probabilities.
    outputs, targets = torch.randn(8, 4), torch.randint(4, (8,))
    with DispatchRecorder() as recorder:
        choice = choose_loss(outputs, targets)
    assert choice.name == "cross-entropy" and not choice.inferred
    assert sum(recorder.host_syncs().values()) == 1


@pytest.mark.parametrize(
    "targets",
    [torch.randint(4, (8,)), torch.randint(4, (8,)).float(), torch.softmax(torch.randn(8, 4), -1)],
    ids=["class indices", "float class indices", "soft labels"],
)
def test_outputs_that_are_probabilities_are_not_scored_as_logits(targets: Tensor) -> None:
    logits = torch.randn(8, 4)
    with pytest.raises(NoDefaultLoss, match="sums to 1, as probabilities after a softmax are") as info:
        choose_loss(torch.softmax(logits, -1), targets)
    assert "log_softmax" in str(info.value) and "nll_loss" in str(info.value)
    # Logits, and log-probabilities (whose cross-entropy is their negative log-likelihood), are scored.
    assert choose_loss(logits, targets).name.startswith("cross-entropy")
    assert choose_loss(torch.log_softmax(logits, -1), targets).name.startswith("cross-entropy")


@pytest.mark.parametrize(
    ("outputs", "targets", "why"),
    [
        (torch.randn(8, 4), torch.randn(8), "floating-point targets need"),  # not whole numbers: not indices
        (torch.randn(8, 4), torch.randn(8, 3), "floating-point targets need"),
        (torch.randn(8, 4), torch.randint(4, (6,)), "8 rows and the targets 6"),
        (torch.randn(8, 4), [1, 2], "not a tensor"),
    ],
)
def test_targets_no_rule_fits_are_an_error_naming_the_shapes(outputs: Tensor, targets: object, why: str) -> None:
    with pytest.raises(NoDefaultLoss, match=r"no default per-example loss fits outputs of shape \(8, 4\)") as info:
        choose_loss(outputs, targets)
    assert why in str(info.value)


def test_the_default_loss_chooses_once_says_so_once_and_then_reads_nothing(caplog: pytest.LogCaptureFixture) -> None:
    loss = DefaultLoss("Net is scored with the", "loss_fn")
    outputs, targets = torch.randn(8, 1), torch.randn(8, 1)
    with caplog.at_level(logging.INFO):
        loss(outputs, targets)
        with DispatchRecorder() as recorder:
            later = loss(outputs, targets.clamp(0, 1).round())  # binary values now: the choice stands
    said = [record.getMessage() for record in caplog.records if "Net is scored" in record.getMessage()]
    assert said == [
        "Net is scored with the squared error of each example: the module gives one output per example and its "
        "targets take values other than 0 and 1, as a regression's. Set another with loss_fn."
    ]
    assert recorder.host_syncs() == {}
    binary = targets.clamp(0, 1).round()
    assert_within(later, squared_error(outputs, binary), loss_tolerance("squared error", outputs, binary), "later")


def test_targets_no_rule_fits_name_the_option_that_sets_a_loss() -> None:
    loss = DefaultLoss("Net is scored with the", "an override of Net.sbp_loss")
    with pytest.raises(ValueError, match=r"no default per-example loss fits .* set the loss with an override of Net"):
        loss(torch.randn(4, 3), torch.randn(4, 2))
    assert loss.choice is None


def test_class_indices_are_not_announced(caplog: pytest.LogCaptureFixture) -> None:
    loss = DefaultLoss("Net is scored with the", "loss_fn")
    with caplog.at_level(logging.INFO):
        loss(torch.randn(4, 3), torch.randint(3, (4,)))
    assert not [record for record in caplog.records if "Net is scored" in record.getMessage()]
    assert loss.name == "cross-entropy"


def test_later_targets_that_are_not_binary_are_said_once_without_reading_the_device_per_step() -> None:
    # Counts whose first batch held only 0 and 1 are taken for binary labels; later batches tell otherwise.
    loss = DefaultLoss("Net is scored with the", "loss_fn")
    outputs = torch.randn(8, 1)
    loss(outputs, torch.tensor([[0.0], [1.0]] * 4))
    with DispatchRecorder() as recorder:
        loss(outputs, torch.tensor([[0.0], [1.0]] * 4))
        loss(outputs, torch.tensor([[0.0], [3.0]] * 4))
    assert recorder.host_syncs() == {}, "the evidence is kept on the device until asked for"
    with pytest.warns(UserWarning, match="later batches hold other values"):
        loss.warn_if_contradicted()
    loss(outputs, torch.tensor([[2.0], [3.0]] * 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss.warn_if_contradicted()  # once only


def test_binary_targets_that_stay_binary_are_not_contradicted() -> None:
    loss = DefaultLoss("Net is scored with the", "loss_fn")
    for _ in range(3):
        loss(torch.randn(8, 1), torch.tensor([[0.0], [1.0]] * 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss.warn_if_contradicted()


def test_every_rank_chooses_the_same_loss_from_first_batches_that_differ(tmp_path: Path) -> None:
    # Rank 0's first batch is all 0 or 1 and its labels are its input ids; rank 1's holds counts and other labels.
    # Chosen alone, rank 0 would train a binary classifier (and shift its labels) while rank 1 regressed.
    run_two_processes(default_loss_worker, str(tmp_path))
    chosen = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert chosen[0] == chosen[1]
    assert chosen[0] == {
        "one output": "squared error",
        "multi-hot": "squared error",
        "binary everywhere": "binary cross-entropy with logits",
        "shifted labels": False,
    }
