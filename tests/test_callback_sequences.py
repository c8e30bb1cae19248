"""Selective Backprop through the callback on a causal language model: a tiny GPT-2 whose head sees every position."""

from __future__ import annotations

import statistics
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import tiny_gpt2_config, trainer

from lightning_sbp import SelectiveBackprop
from lightning_sbp.functional import per_example_cross_entropy
from lightning_sbp.recipes import CausalLMModule, GeneratedTokensDataModule
from lightning_sbp.selectors.omp import OMPSelector

GPT2 = tiny_gpt2_config(vocab_size=24)


class MetricLog(pl.Callback):
    """The ``sbp/`` step values of every training batch."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.steps.append({key: float(value) for key, value in metrics.items() if key.endswith("_step")})


def _fit(selector: Any, steps: int = 8, **kwargs: Any) -> list[dict[str, float]]:
    torch.manual_seed(0)
    model = CausalLMModule(config=GPT2, lr=3e-3, warmup_ratio=0.0)
    data = GeneratedTokensDataModule(vocab_size=24, seq_len=12, train_size=16 * steps, batch_size=16, seed=1)
    log = MetricLog()
    sbp = SelectiveBackprop(selector, keep=0.25, **kwargs)
    trainer(callbacks=[sbp, log], max_steps=steps, log_every_n_steps=1, limit_val_batches=0).fit(model, data)
    assert sbp.last_selection is not None and sbp.last_selection.indices.shape == (4,)
    return log.steps


def test_omp_on_a_causal_lm_matches_the_batch_gradient_better_than_random() -> None:
    # Measured on every step: by default only the first of these eight is, and its value is repeated.
    steps = _fit("omp", grad_error_every=1)
    ratios = [step["sbp/grad_error_ratio_step"] for step in steps]
    assert len(ratios) == 8 and len(set(ratios)) > 1
    # Measured: 0.47 to 0.54 on every step; a selector no better than random sits near 1.
    assert sum(ratio < 1 for ratio in ratios) >= 6, ratios


def test_a_sketch_dim_is_harmless_where_the_exact_gram_is_cheaper() -> None:
    steps = _fit(OMPSelector(sketch_dim=256), steps=3)
    assert all(step["sbp/grad_error_step"] >= 0 for step in steps)


def test_exact_error_orders_selectors_as_the_last_layer_error_does() -> None:
    errors = {}
    # OMP's least-squares weights, not rescaled: the subset that matches the last layer's batch gradient best.
    for name, selector in (("omp", OMPSelector(weights="raw")), ("random", "random")):
        steps = _fit(selector, exact_grad_error_every=1)
        last_layer = statistics.mean(step["sbp/grad_error_step"] for step in steps)
        exact = statistics.mean(step["sbp/grad_error_exact_step"] for step in steps)
        errors[name] = (last_layer, exact)
    # Measured: OMP's mean errors are 0.51 (last layer) and 0.55 (all parameters) of random's.
    assert errors["omp"][0] < 0.8 * errors["random"][0], errors
    assert errors["omp"][1] < 0.8 * errors["random"][1], errors


@pytest.mark.parametrize("selector", ["gradnorm", "loss"])
def test_other_selectors_train_a_causal_lm(selector: str) -> None:
    steps = _fit(selector, steps=2)
    assert all(step["sbp/grad_error_step"] > 0 for step in steps)


def shifted_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A per-sequence causal-LM loss on unshifted labels: position ``t`` predicts ``labels[:, t + 1]``."""
    return per_example_cross_entropy(logits, torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100))


class PlainLM(pl.LightningModule):
    """A GPT-2 LightningModule without the mixin: the patch path, scored with ``forward`` and a given loss."""

    def __init__(self) -> None:
        super().__init__()
        self.model = CausalLMModule(config=GPT2).model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, index: Any = None) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        return shifted_token_loss(logits, batch["labels"]).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def test_the_patch_path_tracks_gradient_errors_of_a_causal_lm() -> None:
    torch.manual_seed(0)
    data = GeneratedTokensDataModule(vocab_size=24, seq_len=12, train_size=48, batch_size=16, seed=1)
    log = MetricLog()
    sbp = SelectiveBackprop("topk", keep=0.5, loss_fn=shifted_token_loss, exact_grad_error_every=1)
    trainer(callbacks=[sbp, log], max_steps=3, log_every_n_steps=1, limit_val_batches=0).fit(PlainLM(), data)
    assert len(log.steps) == 3
    for step in log.steps:
        assert step["sbp/grad_error_step"] > 0 and step["sbp/grad_error_exact_step"] > 0
