"""transformers models with a loss at every position, ready for Selective Backprop: causal LMs and token classifiers.

Selective Backprop selects whole sequences. Each sequence's loss is the mean of its token losses, and the
last-layer gradient of a sequence sums over its positions, so ``omp``, ``gradnorm`` and the gradient-error
metrics work on these models as on classifiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor

from lightning_sbp.functional.loss import IGNORE_INDEX
from lightning_sbp.recipes.evaluation import ClassifierEvaluation
from lightning_sbp.recipes.text import adamw_with_linear_warmup, build_transformers_model, check_fine_tuning

__all__ = ["IGNORE_INDEX", "CausalLMModule", "TokenClassifier", "TokenLevelModule"]

_NOT_MODEL_INPUTS = ("labels", "index")


class TokenLevelModule(ClassifierEvaluation):
    """A transformers model with a loss at every position, fine-tuned with AdamW and a linear warm-up and decay.

    The model is loaded with ``from_pretrained(model_name_or_path)`` or, when ``config`` is given, built
    with random weights from a transformers config (``{"model_type": "gpt2", "n_embd": 64, ...}``), which
    needs no files at all. Batches are dicts with ``input_ids``, ``attention_mask`` (and any other model
    inputs), ``labels`` (``[N, T]``, ``-100`` where there is no loss) and optionally ``index``.

    The per-example loss of the scoring pass is
    :func:`~lightning_sbp.functional.per_example_cross_entropy`. Logs ``train/loss`` (the weighted
    objective), ``train/loss_unweighted``, ``val/loss`` and ``val/acc`` (token accuracy over the
    counted positions), and the same under ``test/``.

    Args:
        model_name_or_path: hub name or local path of a pretrained model; ignored when ``config`` is given.
        config: keyword arguments of ``transformers.AutoConfig.for_model``, ``model_type`` included.
        lr: peak learning rate.
        weight_decay: AdamW weight decay, not applied to biases and normalisation weights.
        warmup_ratio: fraction of the training steps spent warming the learning rate up from zero.
        adam_epsilon: AdamW epsilon.

    Raises:
        ValueError: when neither a model name nor a config is given, or for out-of-range values.
    """

    auto_class: ClassVar[str]
    """The ``transformers`` auto class that builds the model."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        adam_epsilon: float = 1e-8,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        check_fine_tuning(lr, warmup_ratio)
        self.model = build_transformers_model(self.auto_class, model_name_or_path, config, **model_kwargs)
        self.setup_accuracy(self.num_classes, ignore_index=IGNORE_INDEX)

    @property
    def num_classes(self) -> int:
        """The number of outputs per position."""
        raise NotImplementedError

    def forward(self, **inputs: Tensor) -> Tensor:
        """Logits ``[N, T, C]`` for the model inputs (``input_ids``, ``attention_mask``, ...)."""
        return self.model(**inputs).logits

    def targets(self, labels: Tensor) -> Tensor:
        """The target of each position of the logits, ``[N, T]``; the labels themselves by default."""
        return labels

    def sbp_forward(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Logits ``[N, T, C]`` and targets ``[N, T]``; ``labels`` and ``index`` are not model inputs."""
        if not isinstance(batch, Mapping) or "labels" not in batch:
            raise TypeError(f"{type(self).__name__} expects dict batches with a 'labels' key")
        inputs = {key: value for key, value in batch.items() if key not in _NOT_MODEL_INPUTS}
        return self(**inputs), self.targets(batch["labels"])

    def evaluation_outputs(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Logits ``[N T, C]`` and targets ``[N T]`` of every position; ``-100`` targets are not counted."""
        logits, targets = self.sbp_forward(batch)
        return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)

    def configure_optimizers(self) -> Any:
        """AdamW without decay on biases and normalisation weights, linear warm-up then linear decay per step."""
        hp = self.hparams
        return adamw_with_linear_warmup(self, hp["lr"], hp["weight_decay"], hp["warmup_ratio"], hp["adam_epsilon"])


class CausalLMModule(TokenLevelModule):
    """A causal language model (``AutoModelForCausalLM``: GPT-2 and friends): position ``t`` predicts token ``t + 1``.

    ``labels`` are the token ids, ``-100`` at padding (as :class:`~lightning_sbp.recipes.GeneratedTokensDataModule`
    makes them); the targets are the labels shifted left by one, so that the logits of every position keep
    their place and the final ``nn.Linear`` (the LM head) sees ``[N, T, D]`` inputs. See
    :class:`TokenLevelModule` for the arguments.

    Example:
        >>> config = {"model_type": "gpt2", "vocab_size": 64, "n_positions": 32, "n_embd": 32, "n_layer": 1,
        ...           "n_head": 2}
        >>> model = CausalLMModule(config=config)
    """

    auto_class = "AutoModelForCausalLM"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        config: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        adam_epsilon: float = 1e-8,
    ) -> None:
        super().__init__(model_name_or_path, config, lr, weight_decay, warmup_ratio, adam_epsilon)
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        """The vocabulary size."""
        return int(self.model.config.vocab_size)

    def targets(self, labels: Tensor) -> Tensor:
        """``labels[:, t + 1]`` at position ``t``, and ``-100`` at the last position."""
        return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class TokenClassifier(TokenLevelModule):
    """A token classifier (``AutoModelForTokenClassification``: BERT and friends, tagging every position).

    ``labels`` hold one class per position, ``-100`` where there is none (padding, special tokens). See
    :class:`TokenLevelModule` for the other arguments.

    Args:
        num_labels: number of classes per position, at least 2.

    Example:
        >>> config = {"model_type": "bert", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
        ...           "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32}
        >>> model = TokenClassifier(config=config, num_labels=5)
    """

    auto_class = "AutoModelForTokenClassification"

    def __init__(
        self,
        model_name_or_path: str | None = None,
        num_labels: int = 2,
        config: dict[str, Any] | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_ratio: float = 0.1,
        adam_epsilon: float = 1e-8,
    ) -> None:
        if num_labels < 2:
            raise ValueError(f"num_labels must be at least 2, got {num_labels}")
        super().__init__(
            model_name_or_path, config, lr, weight_decay, warmup_ratio, adam_epsilon, num_labels=num_labels
        )
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        """The number of labels."""
        return int(self.model.config.num_labels)
