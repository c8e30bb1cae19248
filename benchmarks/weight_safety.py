"""Can a weighted step be worse than random? OMP's fallback candidates and gradnorm's weight bounds, step by step.

Three tasks, each trained with ``SelectiveBackprop(keep=0.25)`` on batches of 64 (``k = 16``), in
memory, nothing downloaded: scikit-learn's digits (10 classes, an MLP), scikit-learn's breast-cancer
table with 20% of the training labels flipped (binary, an MLP) and a tiny GPT-2 language model on
generated token sequences (a head at every position). On every selective step a probe reads the
step's scores, builds the last-layer Gram matrix ``K`` in float64 and measures, against the closed
form of a uniformly random subset's expected error (``random_subset_gradient_error``):

* ``--part omp``: for OMP's ``raw`` and ``normalized`` weights at ``max_weight`` 8 and 2, every
  fallback candidate on the support OMP chose: all ones (the former fallback), the scheme's weights
  clipped to ``±max_weight``, the least-squares weights ``k · c`` clipped the same way, a ridge refit
  (``λ = 0.1 · mean diag K``) clipped too, and a fresh random subset (ratio 1 in expectation, by the
  closed form); next to them, what the selector shipped. Reported on the steps on which the selector
  fell back and, as a wider test of the same candidates, on every step.
* ``--part gradnorm``: the sampling designs of ``gradnorm`` with weights bounded by ``M = 8``, on
  every fourth selective step of fits with the default ``gradnorm``: unbounded Horvitz-Thompson
  weights (``max_weight=None``), the same weights clipped at ``M`` (biased), a defensive mixture
  with uniform sampling (``smoothing = 1/M``) and the floor design (``π = clamp(c · b, k / (N M), 1)``,
  the default). For each: the largest weight, the bias ``‖E ĝ_S − ḡ‖ / ‖ḡ‖`` (exact, from the
  inclusion probabilities) and the root mean squared error over 256 draws relative to random's, on
  the last-layer gradients and on the gradients of all parameters (materialised one example at a
  time).

Run ``nice python benchmarks/weight_safety.py`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_sbp import SelectiveBackprop
from lightning_sbp.functional import (
    batch_size,
    index_batch,
    omp_gram,
    random_subset_gradient_error,
    subset_gradient_error,
)
from lightning_sbp.recipes import CausalLMModule, DigitsDataModule, GeneratedTokensDataModule, ImageClassifier
from lightning_sbp.selectors import GradNormSelector, OMPSelector, Scores, Selection, Selector

sys.path.insert(0, str(Path(__file__).parent))
from omp_weights import cancer

TASKS = ("digits", "cancer", "gpt2")
BOUND = 8.0
RIDGE = 0.1
N_BATCH = 64
KEEP = 0.25


def digits_task(seed: int) -> tuple[pl.LightningModule, Any, int]:
    """The digits with an MLP, 30 epochs (about 660 steps)."""
    model = ImageClassifier(backbone="mlp", num_classes=10, in_channels=1, lr=0.05, schedule="constant")
    return model, DigitsDataModule(image_size=8, batch_size=N_BATCH), 30


def cancer_task(seed: int) -> tuple[pl.LightningModule, Any, int]:
    """The breast-cancer table with 20% label noise, 25 epochs (200 steps)."""
    model, loaders, _ = cancer(0.2, seed)
    return model, loaders, 25


def gpt2_task(seed: int) -> tuple[pl.LightningModule, Any, int]:
    """A one-layer GPT-2 (32 features, no dropout) on generated sequences of 16 tokens, 12 epochs (192 steps)."""
    config = {
        "model_type": "gpt2",
        "vocab_size": 32,
        "n_positions": 16,
        "n_embd": 32,
        "n_layer": 1,
        "n_head": 2,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    model = CausalLMModule(config=config, lr=3e-3, warmup_ratio=0.0)
    data = GeneratedTokensDataModule(
        "causal_lm", vocab_size=32, seq_len=16, train_size=1024, batch_size=N_BATCH, seed=seed
    )
    return model, data, 12


BUILDERS: dict[str, Callable[[int], tuple[pl.LightningModule, Any, int]]] = {
    "digits": digits_task,
    "cancer": cancer_task,
    "gpt2": gpt2_task,
}


# --- the probe ------------------------------------------------------------------------------------------


class Probe(Selector):
    """Selects as the wrapped selector does, and hands every step's scores and selection to an analysis."""

    needs_last_layer = True
    weighted = True

    def __init__(self, inner: Selector, analyse: Callable[[Scores, int, Selection], None]) -> None:
        self.inner = inner
        self.analyse = analyse

    def select(self, scores: Scores, k: int, generator: torch.Generator) -> Selection:
        """The wrapped selector's selection; the analysis runs on the side."""
        selection = self.inner.select(scores, k, generator)
        self.analyse(scores, k, selection)
        return selection


def fit(task: str, seed: int, selector: Selector, callbacks: list[pl.Callback] | None = None) -> None:
    """One training run of ``task`` with ``selector`` at ``keep = 0.25``."""
    pl.seed_everything(seed, verbose=False)
    model, data, epochs = BUILDERS[task](seed)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[SelectiveBackprop(selector, keep=KEEP, seed=seed, track_grad_error=False), *(callbacks or [])],
    )
    if isinstance(data, tuple):
        trainer.fit(model, data[0])
    else:
        trainer.fit(model, datamodule=data)


# --- OMP's fallback --------------------------------------------------------------------------------------

OMP_CANDIDATES = ("ones", "clipped", "clipped raw", "ridge", "random", "shipped")


def omp_candidates(scores: Scores, k: int, scheme: str, bound: float) -> dict[str, float]:
    """Gradient-error ratios to random of the fallback candidates on one batch.

    OMP runs on the float32 Gram matrix, as the selector does, so that the support is the selector's; the
    errors are measured on the float64 one.
    """
    gram = scores.gram_in(torch.float64)
    indices, coef = omp_gram(scores.gram, scores.gram.mean(dim=1), k)
    coef = coef.double()
    raw = k * coef
    weights = raw if scheme == "raw" else raw / coef.sum()
    if not torch.isfinite(weights).all() or (scheme != "raw" and float(coef.sum()) <= 0):
        weights = raw
    random_error = float(random_subset_gradient_error(gram, k))

    def ratio(w: Tensor) -> float:
        return float(subset_gradient_error(gram, indices, w)) / random_error

    target = gram.mean(dim=1)
    on_support = gram.index_select(0, indices).index_select(1, indices)
    ridge = k * torch.linalg.solve(
        on_support + RIDGE * gram.diagonal().mean() * torch.eye(k, dtype=gram.dtype), target[indices]
    )
    if scheme != "raw" and float(ridge.sum()) > 0:
        ridge = ridge * k / ridge.sum()
    return {
        "ones": ratio(torch.ones_like(coef)),
        "clipped": ratio(weights.clamp(-bound, bound)),
        "clipped raw": ratio(raw.clamp(-bound, bound)),
        "ridge": ratio(ridge.clamp(-bound, bound)),
        "random": 1.0,
    }


def omp_part(tasks: list[str], seeds: list[int], bounds: list[float]) -> list[dict[str, Any]]:
    """Candidate ratios on every selective step of every fit, one row per step, scheme and bound."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for scheme in ("raw", "normalized"):
            for bound in bounds:
                for seed in seeds:
                    key = {"task": task, "scheme": scheme, "bound": bound, "seed": seed}
                    started = time.perf_counter()
                    selector = OMPSelector(weights=scheme, max_weight=bound)  # type: ignore[arg-type]
                    fit(task, seed, Probe(selector, functools.partial(omp_step, rows, key)))
                    print(f"  omp {key}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return rows


def omp_step(rows: list[dict[str, Any]], key: dict[str, Any], scores: Scores, k: int, selection: Selection) -> None:
    """Append the row of one step: the candidates, and what the selector did (a fallback? to a random subset?)."""
    previous = rows[-1] if rows and all(rows[-1][name] == value for name, value in key.items()) else None
    fallbacks = float(selection.stats["weight_fallbacks"])
    random_fallbacks = float(selection.stats["random_fallbacks"])
    row = {**key, **omp_candidates(scores, k, key["scheme"], key["bound"])}
    row["fallbacks"], row["random fallbacks"] = fallbacks, random_fallbacks
    row["fallback"] = fallbacks > (previous["fallbacks"] if previous else 0.0)
    took_random = random_fallbacks > (previous["random fallbacks"] if previous else 0.0)
    gram = scores.gram_in(torch.float64)
    shipped = float(subset_gradient_error(gram, selection.indices, selection.weights))
    # A random subset is judged by its expectation, which the closed form gives exactly: ratio 1.
    row["shipped"] = 1.0 if took_random else shipped / float(random_subset_gradient_error(gram, k))
    row["took random"] = took_random
    rows.append(row)


def omp_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per task, scheme, bound and step set, each candidate's mean and largest ratio to random."""
    lines = [
        "| task | weights | bound | steps | " + " | ".join(OMP_CANDIDATES) + " |",
        "|---|---|---:|---|" + "---:|" * len(OMP_CANDIDATES),
    ]
    keys = sorted(
        {(r["task"], r["scheme"], r["bound"]) for r in rows}, key=lambda t: (TASKS.index(t[0]), -len(t[1]), -t[2])
    )
    for task, scheme, bound in keys:
        cell = [r for r in rows if (r["task"], r["scheme"], r["bound"]) == (task, scheme, bound)]
        for label, subset in (("fallback", [r for r in cell if r["fallback"]]), ("every", cell)):
            count = f"{label}: {len(subset)}" + (f" of {len(cell)}" if label == "fallback" else "")
            if not subset:
                lines.append(f"| {task} | {scheme} | {bound:g} | {count} |" + " — |" * len(OMP_CANDIDATES))
                continue
            if label == "fallback":
                count += f" ({sum(r['took random'] for r in subset)} random)"
            values = []
            for name in OMP_CANDIDATES:
                ratios = [r[name] for r in subset]
                values.append(f"{statistics.fmean(ratios):.2f} ({max(ratios):.2f})")
            lines.append(f"| {task} | {scheme} | {bound:g} | {count} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# --- gradnorm's bound ------------------------------------------------------------------------------------

GRADNORM_DESIGNS = ("unbounded", "clipped", "mixture", "floor")
DRAWS = 256


class AllParameterGram(pl.Callback):
    """The Gram matrix of the per-example gradients of all parameters, on every ``every``-th training batch.

    One backward pass per example, through the module's own ``sbp_forward`` and ``sbp_loss`` (the models
    here have no dropout and no BatchNorm, so one example alone computes what it computes in its batch).
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.gram: Tensor | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Compute the Gram matrix of this batch, or forget the last one."""
        self.gram = None
        if trainer.global_step % self.every:
            return
        params = [p for p in pl_module.parameters() if p.requires_grad]
        rows = []
        with torch.enable_grad():
            for i in range(batch_size(batch)):
                logits, targets = pl_module.sbp_forward(index_batch(batch, torch.tensor([i])))
                grads = torch.autograd.grad(pl_module.sbp_loss(logits, targets).sum(), params, allow_unused=True)
                flat = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
                rows.append(torch.cat([g.flatten() for g in flat]).double())
        gradients = torch.stack(rows)
        self.gram = gradients @ gradients.T


def relative_errors(gram: Tensor, weights: Tensor, k: int) -> Tensor:
    """``‖(1/k) Σ_i w_i g_i − ḡ‖² / ‖ḡ‖²`` for every row of ``weights`` ``[R, N]`` (zero for examples not drawn)."""
    n = gram.shape[0]
    mean_sq = gram.sum() / n**2
    quadratic = ((weights @ gram) * weights).sum(dim=1) / k**2
    cross = (weights @ gram.sum(dim=1)) / (k * n)
    return (quadratic - 2 * cross + mean_sq).clamp_min(0) / mean_sq


def gradnorm_designs(scores: Scores, k: int, grams: dict[str, Tensor], bound: float) -> dict[str, float]:
    """Largest weight, exact bias and root mean squared error over ``DRAWS`` draws of every design."""
    n = scores.size
    selectors = {
        "unbounded": GradNormSelector(max_weight=None),
        "clipped": GradNormSelector(max_weight=None),
        "mixture": GradNormSelector(smoothing=1 / bound, max_weight=None),
        "floor": GradNormSelector(max_weight=bound),
    }
    row: dict[str, float] = {}
    bound_values = scores.gram_in(torch.float64).diagonal().clamp_min(0).sqrt()
    positive = bound_values[bound_values > 0]
    row["decades"] = float(torch.log10(positive.max() / positive.min())) if positive.numel() else 0.0
    for name, selector in selectors.items():
        prob = selector.inclusion_probabilities(scores, k).double()
        if name == "floor":
            # The share of the budget that the floor spends on examples it raised (float32 probabilities).
            row["floor share"] = float(prob[(prob > 0) & (prob <= k / (n * bound) * (1 + 1e-5))].sum()) / k
        ht = torch.where(prob > 0, k / (n * prob.clamp_min(1e-300)), 0.0)
        per_example = (prob * ht.clamp(max=bound)) if name == "clipped" else prob * ht  # E[w_i 1{i in S}]
        drawn = torch.zeros(DRAWS, n, dtype=torch.float64)
        for r in range(DRAWS):
            selection = selector.select(scores, k, torch.Generator().manual_seed(r))
            weights = selection.weights.double()
            drawn[r].index_copy_(0, selection.indices, weights.clamp(max=bound) if name == "clipped" else weights)
        row[f"{name} max w"] = float(drawn.max())
        for where, gram in grams.items():
            bias = float(relative_errors(gram, per_example.unsqueeze(0), k)[0].sqrt())
            rmse = float(relative_errors(gram, drawn, k).mean().sqrt())
            random = float(random_subset_gradient_error(gram, k))
            row[f"{name} bias {where}"] = bias
            row[f"{name} rmse {where}"] = rmse / random
    return row


def gradnorm_part(tasks: list[str], seeds: list[int], every: int) -> list[dict[str, Any]]:
    """Every design on every ``every``-th step of fits that train with the default ``gradnorm``."""
    rows: list[dict[str, Any]] = []
    for task in tasks:
        for seed in seeds:
            full = AllParameterGram(every)
            started = time.perf_counter()
            fit(task, seed, Probe(GradNormSelector(), functools.partial(gradnorm_step, rows, full, task, seed)), [full])
            print(f"  gradnorm {task} seed {seed}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return rows


def gradnorm_step(
    rows: list[dict[str, Any]], full: AllParameterGram, task: str, seed: int, scores: Scores, k: int, _: Selection
) -> None:
    """Append the row of one step on which the all-parameter Gram matrix was computed."""
    if full.gram is not None:
        grams = {"last layer": scores.gram_in(torch.float64), "all parameters": full.gram}
        rows.append({"task": task, "seed": seed, **gradnorm_designs(scores, k, grams, BOUND)})


def gradnorm_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per task and design, the largest weight, the mean bias and the mean error ratio to random."""
    lines = [
        "| task | steps | bound span (decades) | design | max w | budget at the floor | bias, last layer "
        "| error / random, last layer | bias, all parameters | error / random, all parameters |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task in TASKS:
        cell = [r for r in rows if r["task"] == task]
        if not cell:
            continue
        decades = sorted(r["decades"] for r in cell)
        span = f"{statistics.median(decades):.1f} (max {decades[-1]:.1f})"
        for name in GRADNORM_DESIGNS:
            floor_share = f"{statistics.fmean(r['floor share'] for r in cell):.1%}" if name == "floor" else "—"
            values = [
                f"{max(r[f'{name} max w'] for r in cell):.3g}",
                floor_share,
                *(
                    f"{statistics.fmean(r[f'{name} {what} {where}'] for r in cell):.3f}"
                    for where in ("last layer", "all parameters")
                    for what in ("bias", "rmse")
                ),
            ]
            lines.append(f"| {task} | {len(cell)} | {span} | {name} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the fits of the chosen part and print its table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--part", choices=("omp", "gradnorm"), default="omp", help="which table (default: omp)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="default: all three")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="default: 0 1")
    parser.add_argument(
        "--bounds", nargs="+", type=float, default=[BOUND, 2.0], help="OMP's max_weight values (default: 8 2)"
    )
    parser.add_argument("--every", type=int, default=4, help="gradnorm: measure every this many steps (default: 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.part == "omp":
        print(omp_table(omp_part(args.tasks, args.seeds, args.bounds)))
    else:
        print(gradnorm_table(gradnorm_part(args.tasks, args.seeds, args.every)))


if __name__ == "__main__":
    main()
