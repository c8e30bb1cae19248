"""The contract between the training step and a selection policy."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_sbp.functional.gram import gradient_gram

__all__ = ["Scores", "Selection", "Selector"]


@dataclass(frozen=True)
class Selection:
    """The examples of a batch that go through the backward pass.

    Attributes:
        indices: ``long`` tensor of shape ``[k]`` with distinct row indices into the batch.
        weights: float tensor of shape ``[k]`` in example units: all ones for a uniform subset. They
            sum to ``k`` on every step for ``omp``'s ``normalized`` weights, only in expectation for
            ``gradnorm``'s unbiased importance weights, and not by construction for ``omp``'s ``raw`` ones.
        stats: per-selection diagnostics as 0-dim tensors on the device of the scores, e.g.
            ``max_abs_weight``; the callback logs each entry as ``sbp/<key>`` on logging steps. Empty
            unless the selector has something to report.
    """

    indices: Tensor
    weights: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict, compare=False)

    @classmethod
    def uniform(cls, indices: Tensor) -> Selection:
        """A subset whose examples all weigh one."""
        return cls(indices, torch.ones(indices.shape[0], device=indices.device))


@dataclass(frozen=True)
class Scores:
    """What the scoring pass learned about every example of a batch.

    Attributes:
        losses: per-example losses, shape ``[N]``; may hold NaN or inf.
        logits: outputs of the final linear layer, shape ``[N, C]`` (``[N, T, C]`` for a head applied
            at every position), when captured.
        logit_grads: gradient of each example's loss with respect to its own logits, of the shape of
            ``logits`` (``softmax - onehot`` for plain cross-entropy), when captured.
        features: inputs of the final linear layer, shape ``[N, D]`` (``[N, T, D]``), when captured.
        bias: whether the final linear layer has a bias.
    """

    losses: Tensor
    logits: Tensor | None = None
    logit_grads: Tensor | None = None
    features: Tensor | None = None
    bias: bool = True
    _grams: dict[tuple[torch.dtype, int | None, int | torch.Generator | None], Tensor] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    @property
    def size(self) -> int:
        """The number of examples scored."""
        return int(self.losses.shape[0])

    @property
    def gram(self) -> Tensor:
        """The float32 Gram matrix ``[N, N]`` of per-example last-layer gradients (see :meth:`gram_in`)."""
        return self.gram_in(torch.float32)

    def gram_in(self, dtype: torch.dtype, sketch_dim: int | None = None, seed: int | torch.Generator = 0) -> Tensor:
        """The Gram matrix of per-example last-layer gradients in ``dtype``, computed once per batch.

        Examples whose loss, features or logit gradients are not finite count as zero gradients.
        Features and logit gradients may be ``[N, D]``/``[N, C]`` or, for a head applied per position,
        ``[N, T, D]``/``[N, T, C]`` (see :func:`~lightning_sbp.functional.gradient_gram`).

        Args:
            dtype: the floating dtype of the result.
            sketch_dim: allow a TensorSketch of this dimension when it is cheaper than the exact forms.
            seed: seeds the sketch (an integer or a generator on the device of the scores).

        Raises:
            RuntimeError: if the scoring pass did not capture the last layer.
        """
        # Sketches drawn from different seeds are different estimates: a selector's and the tracker's stay apart.
        key = (dtype, sketch_dim, None if sketch_dim is None else seed)
        if key not in self._grams:
            features, logit_grads = self.require_last_layer("the last-layer Gram matrix")
            gram = gradient_gram(features, logit_grads, bias=self.bias, sketch_dim=sketch_dim, seed=seed, dtype=dtype)
            # A non-finite input of example i makes K[i, i] non-finite and touches only row and column i, so the
            # diagonal finds the examples to zero without scanning a [N, T, C] head again.
            valid = torch.isfinite(self.losses) & torch.isfinite(gram.diagonal())
            self._grams[key] = torch.where(valid.unsqueeze(0) & valid.unsqueeze(1), gram, 0.0)
        return self._grams[key]

    def require_last_layer(self, who: str) -> tuple[Tensor, Tensor]:
        """The last-layer features and logit gradients, or a clear error when they were not captured."""
        if self.features is None or self.logit_grads is None:
            raise RuntimeError(
                f"{who} needs the inputs of the final linear layer, but the scoring pass did not capture them. "
                "Set `needs_last_layer = True` on the selector class."
            )
        return self.features, self.logit_grads


class Selector(ABC):
    """A selection policy: given the scores of N examples, pick k of them and weigh them.

    Subclasses implement :meth:`select` as a pure tensor function on the device of the scores,
    without host-device synchronisation or Python loops over examples. Stateful selectors
    (a loss history) override :meth:`state_dict` and :meth:`load_state_dict`.

    Attributes:
        needs_scores: whether :meth:`select` reads any score. A selector that reads only
            ``scores.size`` and the device of ``scores.losses`` (random selection) sets it to
            ``False``: with nothing else reading the scores, the step skips the scoring pass and
            hands it scores whose losses are NaN.
        needs_last_layer: whether :meth:`select` reads ``scores.features`` and ``scores.logit_grads``,
            so that the scoring pass captures them only when something needs them.
        weighted: whether the selection can carry non-uniform weights, which only a module with
            :class:`~lightning_sbp.SelectiveBackpropMixin` can apply.
    """

    needs_scores: ClassVar[bool] = True
    needs_last_layer: ClassVar[bool] = False
    weighted: ClassVar[bool] = False

    @abstractmethod
    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """Choose ``k`` distinct examples.

        Args:
            scores: what the scoring pass measured on the batch.
            k: the number of examples to keep, ``1 <= k <= scores.size``.
            generator: a generator on the device of the scores, seeded per rank and step.

        Returns:
            The indices of the kept examples and their weights.
        """

    def setup(self, model: nn.Module) -> None:  # noqa: B027 - optional hook
        """Check, once before training, that the model can be served; raise ``ValueError`` if not."""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint; stateless selectors return an empty dict."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what :meth:`state_dict` returned."""

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


def finite_or_lowest(losses: Tensor) -> Tensor:
    """Losses with NaN and ±inf replaced by the lowest float, so that ranking never prefers them."""
    lowest = torch.finfo(losses.dtype).min
    return torch.where(torch.isfinite(losses), losses, torch.full_like(losses, lowest))
