"""A transformers sequence classifier (BERT and friends) trained with AdamW, ready for Selective Backprop."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sbp.batches import unwrap_logits
from lightning_sbp.recipes.evaluation import ClassifierEvaluation

__all__ = ["TextClassifier", "adamw_with_linear_warmup", "build_transformers_model", "check_fine_tuning"]

_NOT_MODEL_INPUTS = ("labels", "index")


def check_fine_tuning(lr: float, warmup_ratio: float) -> None:
    """Refuse a learning rate that is not positive or a warm-up fraction outside ``[0, 1)``."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")


def build_transformers_model(
    auto_class: str, model_name_or_path: str | None, config: dict[str, Any] | None, **model_kwargs: Any
) -> Any:
    """A transformers model from ``transformers.<auto_class>``: untrained from ``config``, else pretrained.

    Args:
        auto_class: the name of a transformers auto class, e.g. ``"AutoModelForSequenceClassification"``.
        model_name_or_path: hub name or local folder of a pretrained model; ignored when ``config`` is given.
        config: keyword arguments of ``transformers.AutoConfig.for_model``, ``model_type`` included.
        model_kwargs: further configuration, e.g. ``num_labels``.

    Raises:
        ValueError: when neither a model name nor a config is given, or the config has no ``model_type``.
        ImportError: when transformers is not installed.
    """
    if config is None and not model_name_or_path:
        raise ValueError("give model_name_or_path (a hub name or local folder) or config (a transformers config dict)")
    if config is not None and "model_type" not in config:
        raise ValueError("config needs a 'model_type' key, e.g. {'model_type': 'bert', 'hidden_size': 128}")
    try:
        import transformers
    except ImportError as err:
        raise ImportError("the transformers recipes need transformers: pip install 'lightning-sbp[text]'") from err
    auto = getattr(transformers, auto_class)
    if config is None:
        return auto.from_pretrained(model_name_or_path, **model_kwargs)
    settings = {key: value for key, value in config.items() if key != "model_type"}
    return auto.from_config(transformers.AutoConfig.for_model(config["model_type"], **model_kwargs, **settings))


class TextClassifier(ClassifierEvaluation):
    """``AutoModelForSequenceClassification`` fine-tuned with AdamW and a linear warm-up and decay.

    The model is either loaded with ``from_pretrained(model_name_or_path)`` (a hub name such as
    ``bert-base-uncased`` or a local folder; downloading needs network access on the machine that
    runs it) or, when ``config`` is given, built with random weights from a transformers config
    (``{"model_type": "bert", "hidden_size": 128, ...}``), which needs no files at all.

    Batches are dicts with ``input_ids``, ``attention_mask`` (and any other model inputs), ``labels``
    and optionally ``index``, as :class:`~lightning_sbp.recipes.TextClassificationDataModule` makes
    them. Logs ``train/loss`` (the weighted objective), ``train/loss_unweighted``, ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc``.

    Args:
        model_name_or_path: hub name or local path of a pretrained model; ignored when ``config`` is given.
        num_labels: number of classes.
        config: keyword arguments of ``transformers.AutoConfig.for_model``, ``model_type`` included,
            to build an untrained model instead of loading one.
        lr: peak learning rate.
        weight_decay: AdamW weight decay, not applied to biases and normalisation weights.
        warmup_ratio: fraction of the training steps spent warming the learning rate up from zero;
            it then decays linearly to zero at the last step.
        adam_epsilon: AdamW epsilon.

    Raises:
        ValueError: when neither a model name nor a config is given, or for out-of-range values.
    """

    def __init__(
        self,
        model_name_or_path: str | None = "bert-base-uncased",
        num_labels: int = 2,
        config: dict[str, Any] | None = None,
        lr: float = 2e-5,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        adam_epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        check_fine_tuning(lr, warmup_ratio)
        self.save_hyperparameters()
        self.model = build_transformers_model(
            "AutoModelForSequenceClassification", model_name_or_path, config, num_labels=num_labels
        )
        self.setup_accuracy(num_labels)

    def forward(self, **inputs: Tensor) -> Tensor:
        """Logits ``[N, num_labels]`` for the model inputs (``input_ids``, ``attention_mask``, ...)."""
        return unwrap_logits(self.model(**inputs))

    def sbp_forward(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Logits and labels of a dict batch; ``labels`` and ``index`` are not passed to the model."""
        if not isinstance(batch, Mapping) or "labels" not in batch:
            raise TypeError("TextClassifier expects dict batches with a 'labels' key")
        inputs = {key: value for key, value in batch.items() if key not in _NOT_MODEL_INPUTS}
        return self(**inputs), batch["labels"]

    def setup(self, stage: str) -> None:
        """Check that the datamodule, if it says how many classes it has, agrees with the model."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.hparams["num_labels"]:
            raise ValueError(
                f"the datamodule has {data_classes} classes but the model was built with "
                f"num_labels={self.hparams['num_labels']}; set model num_labels to {data_classes}"
            )

    def configure_optimizers(self) -> Any:
        """AdamW without decay on biases and normalisation weights, linear warm-up then linear decay per step."""
        hp = self.hparams
        return adamw_with_linear_warmup(self, hp["lr"], hp["weight_decay"], hp["warmup_ratio"], hp["adam_epsilon"])


def adamw_with_linear_warmup(
    module: pl.LightningModule, lr: float, weight_decay: float, warmup_ratio: float, adam_epsilon: float
) -> dict[str, Any]:
    """The fine-tuning optimiser of the transformers recipes, as ``configure_optimizers`` returns it.

    AdamW without weight decay on biases and normalisation weights; the learning rate rises linearly from
    zero over ``warmup_ratio`` of the training steps, then falls linearly to zero at the last step.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lr, eps=adam_epsilon)
    total = max(1, int(module.trainer.estimated_stepping_batches))
    warmup = round(warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LinearWarmupDecay(warmup, total))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _LinearWarmupDecay:
    """Learning-rate factor: linear from 0 to 1 over ``warmup`` steps, then linear to 0 at ``total``."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))
