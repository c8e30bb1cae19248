"""Validation and test steps shared by the recipes' classifiers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_sbp.mixin import SelectiveBackpropMixin

__all__ = ["ClassifierEvaluation"]


class ClassifierEvaluation(SelectiveBackpropMixin, pl.LightningModule):
    """Logs ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc`` (top-1 over all examples) once per epoch.

    Subclasses call :meth:`setup_accuracy` in ``__init__``; batches are read with :meth:`evaluation_outputs`.
    """

    def setup_accuracy(self, num_classes: int, ignore_index: int | None = None) -> None:
        """Create the validation and test accuracy metrics; targets equal to ``ignore_index`` are not counted."""
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=ignore_index)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro", ignore_index=ignore_index)

    def evaluation_outputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Logits ``[M, C]`` and targets ``[M]`` to score; ``sbp_forward(batch)`` by default."""
        return self.sbp_forward(batch)

    def _evaluate(self, batch: Any, prefix: str, accuracy: MulticlassAccuracy) -> None:
        logits, targets = self.evaluation_outputs(batch)
        loss = F.cross_entropy(logits.float(), targets)
        accuracy(logits, targets)
        self.log(f"{prefix}/loss", loss, prog_bar=prefix == "val", sync_dist=True)
        self.log(f"{prefix}/acc", accuracy, prog_bar=prefix == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``val/loss`` and ``val/acc``."""
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``test/loss`` and ``test/acc``."""
        self._evaluate(batch, "test", self.test_acc)
