"""What a LightningModule adds to train on weighted subsets."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_sbp.batches import default_forward
from lightning_sbp.functional.loss import per_example_cross_entropy

__all__ = ["SelectiveBackpropMixin"]


class SelectiveBackpropMixin:
    """Mixin for a ``LightningModule`` trained with :class:`~lightning_sbp.SelectiveBackprop`.

    It splits the step into three small methods the callback can call on their own: the scoring
    pass needs logits and per-example losses for the whole batch, the subset pass needs the same
    for the selected rows and a weighted mean. The provided :meth:`training_step` is a plain
    classifier step built from them; a module that writes its own ``training_step`` reduces its
    per-example losses with :meth:`sbp_reduce` so that the selection weights are applied.

    Override :meth:`sbp_forward` for batches that are not ``(inputs, targets, ...)`` tuples or
    dicts holding a ``labels`` key, and :meth:`sbp_loss` for another per-example loss.

    Example:
        >>> import lightning as L
        >>> class Net(SelectiveBackpropMixin, L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.body = torch.nn.Linear(4, 3)
        ...     def forward(self, x):
        ...         return self.body(x)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    """

    _sbp_weights: Tensor | None = None
    _sbp_reduced: bool = False

    def sbp_forward(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Logits and targets of a batch.

        The default takes ``(inputs, targets, ...)`` tuples and lists, or dicts with a label key
        (``labels``, ``label``, ``targets``, ``target`` or ``y``) whose other entries are passed to
        ``forward`` as keyword arguments; an output with a ``logits`` attribute or key (as
        transformers models return) is unwrapped.

        Args:
            batch: a training batch or a subset of one.

        Returns:
            ``(logits [N, C], targets [N])``.
        """
        return default_forward(self, batch)  # type: ignore[arg-type]

    def sbp_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-example loss, shape ``[N]``; the default is softmax cross-entropy.

        Any loss works as long as each example's loss depends only on its own logits: the
        last-layer gradients are derived from it with autograd.
        """
        return per_example_cross_entropy(logits, targets)

    def sbp_reduce(self, losses: Tensor) -> Tensor:
        """The mean of per-example losses, weighted by the current selection when there is one."""
        self._sbp_reduced = True
        weights = self._sbp_weights
        if weights is None:
            return losses.mean()
        return (weights.to(losses.dtype) * losses).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """A classifier step: ``sbp_reduce(sbp_loss(*sbp_forward(batch)))``, logged as ``train/loss``."""
        logits, targets = self.sbp_forward(batch)
        loss = self.sbp_reduce(self.sbp_loss(logits, targets))
        self.log("train/loss", loss, prog_bar=True)  # type: ignore[attr-defined]
        return loss
