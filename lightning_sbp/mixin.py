"""What a LightningModule adds to train on weighted subsets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_sbp.batches import default_forward
from lightning_sbp.functional.loss import per_example_cross_entropy

__all__ = ["SelectiveBackpropMixin", "SubsetWeights", "subset_weights"]


class SelectiveBackpropMixin:
    """Mixin for a ``LightningModule`` trained with :class:`~lightning_sbp.SelectiveBackprop`.

    It splits the step into three small methods the callback can call on their own: the scoring
    pass needs logits and per-example losses for the whole batch, the subset pass needs the same
    for the selected rows and a weighted mean. The provided :meth:`training_step` is a plain
    classifier step built from them; a module that writes its own ``training_step`` reduces its
    per-example losses with :meth:`sbp_reduce` so that the selection weights are applied.

    The mixin never replaces a ``training_step`` that the module or another base class defines,
    whatever the order of the bases: its own is used only when no other class of the module's
    MRO (``LightningModule`` aside) has one.

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

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = _chosen_training_step(cls)
        if step is not getattr(cls, "training_step", None):
            cls.training_step = step  # type: ignore[method-assign]

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
        """The mean of per-example losses ``[k]``, weighted by the current selection when there is one.

        Raises:
            ValueError: inside a selective step, if ``losses`` is not one loss per selected example.
        """
        subset = _current_subset.get()
        if subset is None:
            return losses.mean()
        if losses.shape != subset.weights.shape:
            raise ValueError(
                f"sbp_reduce takes one loss per selected example, shape {tuple(subset.weights.shape)}, got shape "
                f"{tuple(losses.shape)}; reduce any other dimension (positions, say) into a per-example loss first"
            )
        subset.applied = True
        return (subset.weights.to(losses.dtype) * losses).mean()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        """A classifier step: ``sbp_reduce(sbp_loss(*sbp_forward(batch)))``.

        Logs two losses of the examples it trains on. ``train/loss`` is the objective it returns: under a
        weighted selector (``omp``, ``gradnorm``) the weighted mean ``(1/k) sum_i w_i l_i``, whose scale
        follows the weights (``omp``'s raw weights need not sum to ``k``), so it is not comparable across
        selectors. ``train/loss_unweighted`` is their plain mean, the same quantity under every selector and
        without one (equal to ``train/loss`` when the weights are all ones).
        """
        logits, targets = self.sbp_forward(batch)
        losses = self.sbp_loss(logits, targets)
        loss = self.sbp_reduce(losses)
        self.log("train/loss", loss, prog_bar=True)  # type: ignore[attr-defined]
        self.log("train/loss_unweighted", losses.detach().mean())  # type: ignore[attr-defined]
        return loss


def _chosen_training_step(cls: type) -> Any:
    """The ``training_step`` a class with the mixin runs.

    The first one a class of its MRO defines, skipping the mixin's own and the placeholder of
    ``LightningModule``; the mixin's when no other class has one.
    """
    for klass in cls.__mro__:
        if klass is SelectiveBackpropMixin or _is_lightning_module(klass):
            continue
        if "training_step" in vars(klass):
            return vars(klass)["training_step"]
    return SelectiveBackpropMixin.training_step


def _is_lightning_module(klass: type) -> bool:
    """Whether ``klass`` is Lightning's ``LightningModule`` itself, under either package name."""
    package = klass.__module__.split(".")[0]
    return klass.__qualname__ == "LightningModule" and package in {"lightning", "pytorch_lightning"}


@dataclass
class SubsetWeights:
    """The weights of the subset a training step runs on, and whether the module's step applied them.

    Attributes:
        weights: one weight per selected example, ``[k]``.
        applied: set by :meth:`SelectiveBackpropMixin.sbp_reduce` when it weighs losses with them.
    """

    weights: Tensor
    applied: bool = False


_current_subset: ContextVar[SubsetWeights | None] = ContextVar("lightning_sbp_subset_weights", default=None)


@contextmanager
def subset_weights(weights: Tensor) -> Iterator[SubsetWeights]:
    """Within the block, :meth:`SelectiveBackpropMixin.sbp_reduce` weighs per-example losses by ``weights``.

    The weights reach the module's ``training_step`` through this context, not through an attribute of the
    module: nothing is left on the module after the step, and the yielded record says whether the step
    applied them.
    """
    subset = SubsetWeights(weights)
    token = _current_subset.set(subset)
    try:
        yield subset
    finally:
        _current_subset.reset(token)
