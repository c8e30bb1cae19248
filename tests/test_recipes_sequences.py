"""The sequence recipes: a causal LM and a token classifier from transformers configs, on generated tokens."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import tiny_gpt2_config
from helpers import trainer as quiet_trainer
from tolerances import gamma

from lightning_sbp.functional import per_example_cross_entropy
from lightning_sbp.recipes import CausalLMModule, GeneratedTokensDataModule, TokenClassifier

GPT2 = tiny_gpt2_config(vocab_size=16)
BERT = {
    "model_type": "bert",
    "vocab_size": 16,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 16,
}


def test_generated_tokens_are_padded_and_labelled() -> None:
    lm = GeneratedTokensDataModule("causal_lm", vocab_size=16, seq_len=12, train_size=40, val_size=8)
    lm.setup("fit")
    item = lm.train_set[3]  # type: ignore[index]
    mask = item["attention_mask"].bool()
    assert item["input_ids"].shape == (12,) and int(item["index"]) == 3
    assert mask[: 12 // 2].all() and (item["labels"][~mask] == -100).all()
    assert torch.equal(item["labels"][mask], item["input_ids"][mask])
    tagging = GeneratedTokensDataModule("token_classification", vocab_size=16, num_labels=4, seq_len=12, train_size=40)
    tagging.setup("fit")
    labels = tagging.train_set[3]["labels"]  # type: ignore[index]
    assert ((labels >= 0) & (labels < 4) | (labels == -100)).all()
    with pytest.raises(ValueError, match="task must be"):
        GeneratedTokensDataModule("translation")  # type: ignore[arg-type]


def test_token_mean_cross_entropy_averages_over_counted_positions() -> None:
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    targets = torch.tensor([[1, 2, -100, -100], [0, 0, 0, 0], [-100, -100, -100, -100]])
    losses = per_example_cross_entropy(logits, targets)
    first = torch.nn.functional.cross_entropy(logits[0, :2].float(), targets[0, :2])
    # A loss cancels (logsumexp − z_t): its float32 rounding is relative to the logits, a sum of 5 exponentials
    # and a logarithm, then the mean of 2 positions.
    tolerance = 2 * gamma(5 + 4 + 2, torch.float32) * (float(logits[0, :2].abs().max()) + math.log(5))
    assert abs(float(losses[0]) - float(first)) <= tolerance
    assert float(losses[2]) == 0.0


def test_causal_lm_targets_are_the_next_tokens() -> None:
    model = CausalLMModule(config=GPT2)
    batch = {
        "input_ids": torch.tensor([[3, 4, 5, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0]]),
        "labels": torch.tensor([[3, 4, 5, -100]]),
    }
    logits, targets = model.sbp_forward(batch)
    assert logits.shape == (1, 4, 16)
    assert targets.tolist() == [[4, 5, -100, -100]]


@pytest.mark.parametrize(
    ("model", "task"),
    [
        (lambda: CausalLMModule(config=GPT2, lr=3e-3), "causal_lm"),
        (lambda: TokenClassifier(config=BERT, num_labels=3, lr=3e-3), "token_classification"),
    ],
    ids=["causal_lm", "token_classification"],
)
def test_sequence_recipes_learn(model: Any, task: str) -> None:
    data = GeneratedTokensDataModule(
        task, vocab_size=16, num_labels=3, seq_len=12, train_size=96, val_size=32, batch_size=16
    )
    module = model()
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=2)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer = quiet_trainer(max_epochs=3, limit_val_batches=2)
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["val/loss"] < before
