"""What a LightningModule adds to train on weighted subsets."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_sbp.batches import default_forward, is_lightning_module_class
from lightning_sbp.default_loss import DefaultLoss

__all__ = ["SelectiveBackpropMixin", "SubsetWeights", "default_loss_of", "subset_weights"]


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
    dicts with a label key, and :meth:`sbp_loss` for another per-example loss than the one the
    targets suggest (see :mod:`lightning_sbp.default_loss`).

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

        The default reads ``(inputs, targets, ...)`` tuples and lists, and dicts by the rule of
        :func:`~lightning_sbp.batches.default_forward`: the targets under a label key (``labels``,
        ``label``, ``targets``, ``target`` or ``y``), the other entries passed to ``forward`` by name, or
        the single input (``image``, ``pixel_values``, ``x``, ...) passed positionally to a ``forward``
        that takes one argument. An output with a ``logits`` attribute or key (as transformers models
        return) is unwrapped.

        Args:
            batch: a training batch or a subset of one.

        Returns:
            ``(logits [N, C], targets [N])``, or whatever shapes :meth:`sbp_loss` reads.
        """
        return default_forward(self, batch)  # type: ignore[arg-type]

    def sbp_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Per-example loss, shape ``[N]``, chosen from the targets at the first call.

        Integer class indices get softmax cross-entropy; one output per example gets the squared error
        (a regression) or, when every target is 0 or 1, binary cross-entropy with logits; targets of the
        outputs' shape get binary cross-entropy (multi-hot labels), cross-entropy (soft labels) or the
        squared error (see :mod:`lightning_sbp.default_loss`). Anything but class indices is said once.

        Any loss works as long as each example's loss depends only on its own logits: the
        last-layer gradients are derived from it with autograd.
        """
        return _default_loss(self)(logits, targets)

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
        if klass is SelectiveBackpropMixin or is_lightning_module_class(klass):
            continue
        if "training_step" in vars(klass):
            return vars(klass)["training_step"]
    return SelectiveBackpropMixin.training_step


def default_loss_of(module: object) -> DefaultLoss | None:
    """The default loss a mixin module's ``sbp_loss`` has chosen, if it has used one."""
    loss = vars(module).get("_sbp_default_loss")
    return loss if isinstance(loss, DefaultLoss) else None


def _default_loss(module: SelectiveBackpropMixin) -> DefaultLoss:
    """The module's own default loss, created at its first use: the choice it makes is kept with the module."""
    state = vars(module)
    if "_sbp_default_loss" not in state:
        state["_sbp_default_loss"] = DefaultLoss(
            f"{type(module).__name__}.sbp_loss, the default of SelectiveBackpropMixin, is the",
            f"an override of {type(module).__name__}.sbp_loss",
        )
    loss: DefaultLoss = state["_sbp_default_loss"]
    return loss


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
