"""An image classifier trained with SGD, ready for Selective Backprop."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_sbp.recipes.backbones import build_backbone
from lightning_sbp.recipes.evaluation import ClassifierEvaluation

__all__ = ["ImageClassifier"]


class ImageClassifier(ClassifierEvaluation):
    """A backbone from :mod:`lightning_sbp.recipes.backbones` trained with SGD and momentum.

    Training uses the mixin's step (per-example cross-entropy, reduced with the selection
    weights, logged as ``train/loss`` next to the plain mean ``train/loss_unweighted``). Validation
    and test log ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc`` (top-1 accuracy over all
    examples) once per epoch. Batches are ``(images, targets)`` or ``(images, targets, indices)``.

    Args:
        backbone: name of the network: ``resnet18``, ``wrn16_8``, ``wrn28_10``, ``digits_cnn`` or ``mlp``.
        num_classes: number of classes.
        in_channels: channels of the input images (3 for colour, 1 for grey).
        backbone_kwargs: extra arguments of the backbone factory, e.g. ``{"dropout": 0.3}`` for wide ResNets
            or ``{"image_size": 16}`` for ``mlp``.
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty applied to every parameter.
        nesterov: use Nesterov momentum (needs ``momentum > 0``).
        schedule: ``cosine`` anneals the learning rate to zero over all training steps, updated every
            step; ``step`` multiplies it by ``gamma`` at each epoch in ``milestones``; ``constant`` keeps it.
        milestones: epochs at which the ``step`` schedule decays the learning rate.
        gamma: decay factor of the ``step`` schedule.
        warmup_epochs: epochs of linear warm-up from zero before the schedule (fractions allowed).

    Raises:
        ValueError: for an unknown backbone or schedule, or out-of-range hyperparameters.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        backbone_kwargs: dict[str, Any] | None = None,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = True,
        schedule: Literal["cosine", "step", "constant"] = "cosine",
        milestones: list[int] | None = None,
        gamma: float = 0.1,
        warmup_epochs: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        if schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule must be one of cosine, step, constant; got {schedule!r}")
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be non-negative, got {warmup_epochs}")
        self.save_hyperparameters()
        self.model = build_backbone(
            backbone, num_classes=num_classes, in_channels=in_channels, **(backbone_kwargs or {})
        )
        self.milestones = sorted(milestones) if milestones is not None else []
        self.setup_accuracy(num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[N, num_classes]`` of images ``[N, C, H, W]``."""
        return self.model(x)

    def setup(self, stage: str) -> None:
        """Check that the datamodule, if it says how many classes it has, agrees with the model."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.hparams["num_classes"]:
            raise ValueError(
                f"the datamodule has {data_classes} classes but the model was built with "
                f"num_classes={self.hparams['num_classes']}; set model num_classes to {data_classes}"
            )

    def configure_optimizers(self) -> Any:
        """SGD with the configured schedule; the cosine and warm-up schedules step every optimiser step."""
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=hp["lr"],
            momentum=hp["momentum"],
            weight_decay=hp["weight_decay"],
            nesterov=hp["nesterov"],
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else None
        steps_per_epoch = total / max_epochs if max_epochs else float(total)
        warmup = min(total, round(hp["warmup_epochs"] * steps_per_epoch))
        milestones = [round(epoch * steps_per_epoch) for epoch in self.milestones]
        factor = _LearningRateFactor(hp["schedule"], total, warmup, milestones, hp["gamma"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _LearningRateFactor:
    """The learning-rate multiplier at an optimiser step (a picklable callable, so checkpoints keep it)."""

    def __init__(self, schedule: str, total: int, warmup: int, milestones: list[int], gamma: float) -> None:
        self.schedule = schedule
        self.total = total
        self.warmup = warmup
        self.milestones = milestones
        self.gamma = gamma

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.schedule == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, (step - self.warmup) / span)
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return self.gamma ** sum(step >= milestone for milestone in self.milestones)
        return 1.0
