"""The per-example loss of a module that names none: chosen once from its targets' dtype, shape and values.

Integer class indices are scored with cross-entropy. Other targets follow the rule transformers applies to
its classification heads, refined by the values of the first batch: one output per example is a regression
(squared error) unless every target is 0 or 1, which makes it a binary classifier's logit (binary
cross-entropy with logits); floating-point targets of the outputs' shape are multi-hot labels (binary
cross-entropy with logits) when every value is 0 or 1, soft class labels (cross-entropy) when every row is a
probability distribution, and a regression with several outputs (squared error) otherwise. Cross-entropy on
a single output, which is 0 whatever the model does, is never chosen, nor cross-entropy on outputs that are
probabilities (every row non-negative and summing to 1), which it would read as logits.

The choice reads the targets on the host (for class indices, whether the outputs are probabilities rather
than logits), once, at the first call; every later call applies it without a host-device synchronisation.
Under torch.distributed every process sees its own first batch, so the facts the choice rests on are agreed
across processes (a value holds only where it holds on every rank, one small all-reduce at that call): every
rank chooses the same loss, and none stops while the others wait.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_sbp.functional.loss import (
    IGNORE_INDEX,
    per_example_binary_cross_entropy,
    per_example_cross_entropy,
    per_example_next_token_cross_entropy,
    per_example_squared_error,
)

__all__ = [
    "NEXT_TOKEN",
    "DefaultLoss",
    "LossChoice",
    "NoDefaultLoss",
    "choose_loss",
    "describe_targets",
    "labels_are_the_inputs",
]


class NoDefaultLoss(ValueError):
    """No default per-example loss fits a module's outputs and targets.

    Attributes:
        reason: the shapes and dtypes, and why no rule fits them.
    """

    def __init__(self, reason: str, option: str | None = None) -> None:
        super().__init__(reason if option is None else f"{reason}; set the loss with {option}")
        self.reason = reason


@dataclass(frozen=True)
class LossChoice:
    """A per-example loss and why it fits the targets.

    Attributes:
        loss_fn: ``(outputs, targets) -> [N]`` losses in float32.
        name: what the loss is, for messages.
        reason: what of the targets made it the choice, for messages.
        inferred: whether anything but integer class indices decided it (then the choice is worth saying).
        binary: whether it rests on every target of the first batch being 0 or 1, which later batches may
            contradict (counts whose first batch held only 0 and 1).
    """

    loss_fn: Callable[[Tensor, Tensor], Tensor]
    name: str
    reason: str
    inferred: bool = True
    binary: bool = False


NEXT_TOKEN = LossChoice(
    per_example_next_token_cross_entropy,
    "next-token cross-entropy",
    "the labels are the batch's input_ids at their own positions and the outputs have one row per position, as "
    "transformers' causal language models take them (they shift inside their loss): each position is scored "
    "against the next position's label",
)
"""The loss of a causal language model whose labels are its inputs, shifted as transformers shifts them."""


def labels_are_the_inputs(batch: Any, outputs: Tensor, targets: Any) -> bool:
    """Whether a dict batch's targets are its ``input_ids`` (``-100`` aside) for per-position outputs ``[N, T, C]``.

    That is how transformers' causal language models take their labels; scored at their own positions, every
    position would predict the token it reads. Reads the batch on the host: call it once.
    """
    inputs = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor) or outputs.dim() != 3:
        return False
    if targets.shape != inputs.shape or targets.is_floating_point():
        return False
    labelled = targets != IGNORE_INDEX
    same, unlabelled = _on_every_rank(((targets == inputs) | ~labelled).all(), ~labelled.any())
    return same and not unlabelled


def choose_loss(outputs: Tensor, targets: Any) -> LossChoice:
    """The per-example loss that fits ``targets`` for model outputs ``outputs`` (see the module's rule).

    Every case reads values on the host, once: the targets', or, for class indices, the outputs' (to tell
    logits from probabilities, which cross-entropy would misread).

    Raises:
        NoDefaultLoss: when no rule fits, naming the shapes and why.
    """
    if not isinstance(targets, Tensor) or targets.dim() == 0 or outputs.dim() == 0:
        raise NoDefaultLoss(_no_rule(outputs, targets, "the targets are not a tensor with one row per example"))
    n = outputs.shape[0]
    if targets.shape[0] != n:
        raise NoDefaultLoss(_no_rule(outputs, targets, f"the outputs have {n} rows and the targets {targets.shape[0]}"))
    floating = targets.is_floating_point() or targets.dtype == torch.bool
    if outputs.numel() == n and targets.numel() == n:
        [binary] = _on_every_rank(_all_binary(targets))
        if binary:
            return LossChoice(
                per_example_binary_cross_entropy,
                "binary cross-entropy with logits",
                "the module gives one output per example and every target is 0 or 1, as a binary classifier's logit",
                binary=True,
            )
        return LossChoice(
            per_example_squared_error,
            "squared error",
            "the module gives one output per example and its targets take values other than 0 and 1, as a regression's",
        )
    if not floating:
        if _on_every_rank(_are_probabilities(outputs))[0]:
            raise NoDefaultLoss(_probabilities(outputs, targets))
        return LossChoice(per_example_cross_entropy, "cross-entropy", "the targets are class indices", inferred=False)
    if targets.shape == outputs.shape:
        binary, distributions, probabilities = _on_every_rank(
            _all_binary(targets), _all_distributions(targets), _are_probabilities(outputs)
        )
        if binary:
            return LossChoice(
                per_example_binary_cross_entropy,
                "binary cross-entropy with logits",
                "the targets have the outputs' shape and every value is 0 or 1: multi-hot labels, as a multi-label "
                "classifier's",
                binary=True,
            )
        if distributions and outputs.dim() == 2:
            if probabilities:
                raise NoDefaultLoss(_probabilities(outputs, targets))
            return LossChoice(
                per_example_cross_entropy,
                "cross-entropy against class probabilities",
                "the targets have the outputs' shape and every row is a probability distribution: soft class "
                "labels, as mixup or cutmix make them",
            )
        return LossChoice(
            per_example_squared_error,
            "squared error",
            "the targets have the outputs' shape and values other than 0 and 1: a regression with several outputs",
        )
    if targets.shape == outputs.shape[:-1]:
        indices, probabilities = _on_every_rank(
            _all_class_indices(targets, outputs.shape[-1]), _are_probabilities(outputs)
        )
    else:
        indices = probabilities = False
    if indices:
        if probabilities:
            raise NoDefaultLoss(_probabilities(outputs, targets))
        return LossChoice(
            class_indices_cross_entropy,
            "cross-entropy",
            "the targets are whole numbers below the number of outputs, one per example: class indices stored as "
            "floating point",
        )
    raise NoDefaultLoss(
        _no_rule(
            outputs,
            targets,
            "class indices get cross-entropy, and floating-point targets need one output per example or the "
            "outputs' shape",
        )
    )


def _on_every_rank(*facts: Tensor) -> list[bool]:
    """Whether each of ``facts`` (boolean scalars) holds on every process; on its own, whether it holds here.

    One all-reduce of the stacked facts under torch.distributed (on their device, which the backend serves),
    and a read on the host of each. Every process must call it at the same point, as the first batch's choice
    does.
    """
    device = facts[0].device  # the targets' device, which the backend serves (outputs may sit elsewhere)
    stacked = torch.stack([fact.reshape(()).to(device) for fact in facts]).to(torch.int32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked, op=dist.ReduceOp.MIN)
    return [bool(value) for value in stacked]


def class_indices_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-example cross-entropy of class indices stored in a floating-point tensor."""
    return per_example_cross_entropy(logits, targets.long())


def _all_binary(targets: Tensor) -> Tensor:
    return ((targets == 0) | (targets == 1)).all()


def _all_distributions(targets: Tensor) -> Tensor:
    # Rows stored in the targets' dtype sum to 1 within half an ulp of that dtype per unit of mass (the values
    # are non-negative and sum to 1), and a float32 sum of C values adds at most C float32 ulps.
    values = targets.float()
    tolerance = torch.finfo(targets.dtype).eps + targets.shape[-1] * torch.finfo(torch.float32).eps
    return (values >= 0).all() & ((values.sum(dim=-1) - 1).abs() <= tolerance).all()


def _are_probabilities(outputs: Tensor, rows: int = 64) -> Tensor:
    """Whether float outputs over ``C > 1`` classes are probability distributions (a softmax), row by row.

    The first ``rows`` rows decide: a softmax makes every row one and logits almost never are, and a language
    model's ``[N, T, V]`` outputs are not copied to float32 whole for it.
    """
    if not outputs.is_floating_point() or outputs.dim() < 2 or outputs.shape[-1] < 2 or outputs.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=outputs.device)
    return _all_distributions(outputs.detach().reshape(-1, outputs.shape[-1])[:rows])


def _probabilities(outputs: Tensor, targets: Tensor) -> str:
    return _no_rule(
        outputs,
        targets,
        "every row of the outputs is non-negative and sums to 1, as probabilities after a softmax are, but "
        "cross-entropy reads logits and would rank the examples by something else. Return the logits, or their "
        "log_softmax, from forward (and apply the softmax where probabilities are needed); or give a loss that "
        "reads probabilities, e.g. lambda p, y: F.nll_loss(p.clamp_min(1e-12).log(), y, reduction='none')",
    )


def _all_class_indices(targets: Tensor, classes: int) -> Tensor:
    return ((targets == targets.round()) & (targets >= 0) & (targets < classes)).all()


def describe_targets(targets: Any) -> str:
    """``"<dtype> targets of shape <shape>"``, or the type of targets that are not a tensor, for messages."""
    if isinstance(targets, Tensor):
        return f"{targets.dtype} targets of shape {tuple(targets.shape)}"
    return f"targets of type {type(targets).__name__}"


def _no_rule(outputs: Tensor, targets: Any, why: str) -> str:
    return (
        f"no default per-example loss fits outputs of shape {tuple(outputs.shape)} and {describe_targets(targets)}: "
        f"{why}"
    )


class DefaultLoss:
    """The per-example loss :func:`choose_loss` picks at the first call, applied to every call after it.

    Args:
        subject: what the announcement says before the loss's name, e.g. ``"SelectiveBackprop scores Net with the"``.
        option: what sets another loss, e.g. ``"SelectiveBackprop(loss_fn=...)"``.

    Attributes:
        choice: the loss chosen at the first call; ``None`` before it.
    """

    def __init__(self, subject: str, option: str) -> None:
        self.subject = subject
        self.option = option
        self.choice: LossChoice | None = None
        self._contradicted: Tensor | None = None
        self._warned = False

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example losses ``[N]`` in float32.

        Raises:
            NoDefaultLoss: at the first call, when no default loss fits the targets, naming the option that sets one.
        """
        if self.choice is None:
            try:
                self.choice = choose_loss(outputs, targets)
            except NoDefaultLoss as error:
                raise NoDefaultLoss(error.reason, self.option) from None
            if self.choice.inferred:
                self._announce(self.choice)
        elif self.choice.binary and not self._warned and isinstance(targets, Tensor):
            # Kept on the device: read only by warn_if_contradicted, on the steps the loggers write.
            flag = ~_all_binary(targets.detach())
            self._contradicted = flag if self._contradicted is None else self._contradicted | flag
        return self.choice.loss_fn(outputs, targets)

    def warn_if_contradicted(self) -> None:
        """Warn once when later targets were not all 0 or 1 although the loss was chosen as if they were.

        Reads a flag kept on the device (one synchronisation): call it where the host reads values anyway.
        """
        if self._contradicted is None or self._warned:
            return
        contradicted, self._contradicted = bool(self._contradicted), None
        if contradicted and self.choice is not None:
            self._warned = True
            # On whichever process saw them: the other ranks' batches may all have been 0 or 1.
            warnings.warn(
                f"{self.subject} {self.choice.name}, chosen because every target of the first batch was 0 or 1, but "
                "later batches hold other values (counts, say), which that loss does not fit. Set the loss with "
                f"{self.option}.",
                UserWarning,
                stacklevel=2,
            )

    def choose(self, choice: LossChoice) -> None:
        """Take ``choice`` instead of what the targets alone would pick, and say so once (before the first call)."""
        self.choice = choice
        self._announce(choice)

    def _announce(self, choice: LossChoice) -> None:
        rank_zero_info(
            f"{self.subject} {choice.name} of each example: {choice.reason}. Set another with {self.option}."
        )

    @property
    def name(self) -> str:
        """The chosen loss, or ``"the default loss"`` before the first call."""
        return self.choice.name if self.choice is not None else "the default loss"
