"""Which OMP weighting trains best? The weighting candidates of ``omp`` on three small tasks, with paired seeds.

Tasks (all in memory, nothing downloaded): the embedded digits (10 classes, the digits recipe),
scikit-learn's breast-cancer table (binary, 30 features, an MLP) and generated token sequences
(4 classes, a bag-of-embeddings model), each without and with 20% of the training labels flipped.
Every fit keeps a quarter of each batch of 64 (``k = 16``). Candidates:

* ``normalized``: the paper's ``w = k c / Σc``, guarded (falls back to uniform outside the bound);
* ``raw``: ``w = k c``; ``nonnegative``: non-negative coefficients, normalised;
* ``ridge``: a ridge fit (``ridge=0.1``), normalised;
* ``unguarded``: the paper's weights with no bound (``max_weight=1e30``), the former behaviour;
* ``uniform``: OMP's subset with all weights one; ``random``: a uniform random subset.

Reported per task and noise level: the mean final validation accuracy, the mean over training of
``sbp/grad_error_ratio`` (the subset's last-layer gradient error over a random subset's; random's
own averages a little below 1, so compare with the ``random`` row), the largest ``|w|`` seen, the
fallbacks, and each candidate's paired difference in
accuracy from ``normalized`` (same seed: same initial weights, data order and noisy labels) with a
95% t interval. Results go to a JSON Lines file, one fit per line; a repeated command skips fits
already there.

Run ``nice python benchmarks/omp_weights.py`` (``--help`` for options); ``--table`` only prints.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sbp import SelectiveBackprop
from lightning_sbp.recipes import DigitsDataModule, ImageClassifier, flip_labels
from lightning_sbp.recipes.evaluation import ClassifierEvaluation
from lightning_sbp.selectors import OMPSelector, Selector, get_selector

CANDIDATES: dict[str, dict[str, Any] | None] = {
    "normalized": {"weights": "normalized", "nonnegative": False},
    "raw": {"weights": "raw", "nonnegative": False},
    "nonnegative": {"weights": "normalized", "nonnegative": True},
    "ridge": {"weights": "normalized", "ridge": 0.1, "nonnegative": False},
    "unguarded": {"weights": "normalized", "max_weight": 1e30, "nonnegative": False},
    "uniform": {"weights": "uniform"},
    "random": None,
}
TASKS = ("digits", "cancer", "sequences")
REFERENCE = "normalized"
# Two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


class MLPClassifier(ClassifierEvaluation):
    """A small MLP (or a bag of token embeddings followed by one) trained with SGD and momentum."""

    def __init__(self, inputs: int, classes: int, hidden: int = 32, vocab: int = 0, lr: float = 0.05) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab, hidden, mode="mean") if vocab else None
        self.body = nn.Sequential(nn.Linear(hidden if vocab else inputs, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)
        self.lr = lr
        self.setup_accuracy(classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of feature rows (or token rows)."""
        if self.embed is not None:
            x = self.embed(x)
        return self.head(self.body(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _loaders(x: Tensor, y: Tensor, xv: Tensor, yv: Tensor, seed: int) -> tuple[DataLoader, DataLoader]:
    order = torch.Generator().manual_seed(seed)
    train = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=order)
    return train, DataLoader(TensorDataset(xv, yv), batch_size=256)


def cancer(noise: float, seed: int) -> tuple[pl.LightningModule, Any, int]:
    """Breast-cancer table: a fixed stratified 80/20 split, standardised, 20 epochs."""
    from sklearn.datasets import load_breast_cancer

    x, y = (torch.as_tensor(a) for a in load_breast_cancer(return_X_y=True))
    x, y = x.float(), y.long()
    split = torch.Generator().manual_seed(0)
    held = torch.zeros(len(y), dtype=torch.bool)
    for label in (0, 1):
        members = torch.nonzero(y == label).flatten()
        held[members[torch.randperm(len(members), generator=split)[: round(0.2 * len(members))]]] = True
    mean, std = x[~held].mean(0), x[~held].std(0)
    x = (x - mean) / std
    labels = flip_labels(y[~held], noise, 2, seed=seed).targets
    return MLPClassifier(30, 2), _loaders(x[~held], labels, x[held], y[held], seed), 20


def sequences(noise: float, seed: int) -> tuple[pl.LightningModule, Any, int]:
    """Generated token sequences: two of 16 tokens name the class, one names another class; 5 epochs."""
    vocab, length, classes = 120, 16, 4
    g = torch.Generator().manual_seed(1)

    def make(n: int) -> tuple[Tensor, Tensor]:
        y = torch.randint(classes, (n,), generator=g)
        tokens = torch.randint(20, vocab, (n, length), generator=g)
        signal = 5 * y.unsqueeze(1) + torch.randint(5, (n, 2), generator=g)
        other = (y + torch.randint(1, classes, (n,), generator=g)) % classes
        decoy = 5 * other.unsqueeze(1) + torch.randint(5, (n, 1), generator=g)
        tokens[:, :3] = torch.cat([signal, decoy], dim=1)
        return tokens[:, torch.randperm(length, generator=g)], y

    x, y = make(2000)
    xv, yv = make(1000)
    labels = flip_labels(y, noise, classes, seed=seed).targets
    return MLPClassifier(0, classes, vocab=vocab, lr=0.1), _loaders(x, labels, xv, yv, seed), 5


def digits(noise: float, seed: int) -> tuple[pl.LightningModule, Any, int]:
    """The digits recipe (``examples/configs/digits_full.yaml``), 3 epochs."""
    model = ImageClassifier(backbone="digits_cnn", num_classes=10, in_channels=1, lr=0.05, schedule="cosine")
    data = DigitsDataModule(image_size=8, batch_size=64, label_noise=noise, noise_seed=seed)
    return model, data, 3


class SelectionRecorder(pl.Callback):
    """Per-step gradient-error ratio and weight statistics of a SelectiveBackprop callback."""

    def __init__(self, sbp: SelectiveBackprop) -> None:
        self.sbp = sbp
        self.ratios: list[float] = []
        self.max_abs_weight = 0.0
        self.negative = 0.0
        self.fallbacks = 0.0
        self.steps = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Read the step's ratio and the selection's stats."""
        ratio = trainer.callback_metrics.get("sbp/grad_error_ratio_step")
        if ratio is not None and math.isfinite(float(ratio)):
            self.ratios.append(float(ratio))
        stats = self.sbp.last_selection.stats if self.sbp.last_selection is not None else {}
        if stats:
            self.steps += 1
            self.max_abs_weight = max(self.max_abs_weight, float(stats["max_abs_weight"]))
            self.negative += float(stats["negative_weight_share"])
            self.fallbacks = float(stats["weight_fallbacks"])


def fit(task: str, method: str, noise: float, seed: int) -> dict[str, Any]:
    """One fit; returns its record."""
    pl.seed_everything(seed, verbose=False)
    model, data, epochs = {"digits": digits, "cancer": cancer, "sequences": sequences}[task](noise, seed)
    options = CANDIDATES[method]
    selector: Selector = get_selector("random") if options is None else OMPSelector(**options)
    sbp = SelectiveBackprop(selector, keep=0.25, seed=seed, grad_error_every=1)
    recorder = SelectionRecorder(sbp)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=epochs,
        callbacks=[sbp, recorder],
    )
    started = time.perf_counter()
    if isinstance(data, tuple):
        trainer.fit(model, *data)
    else:
        trainer.fit(model, datamodule=data)
    return {
        "task": task,
        "method": method,
        "noise": noise,
        "seed": seed,
        "acc": float(trainer.callback_metrics["val/acc"]),
        "ratio": statistics.fmean(recorder.ratios) if recorder.ratios else None,
        "max_abs_weight": recorder.max_abs_weight if recorder.steps else None,
        "negative_share": recorder.negative / recorder.steps if recorder.steps else None,
        "fallbacks": recorder.fallbacks if recorder.steps else None,
        "steps": recorder.steps,
        "seconds": time.perf_counter() - started,
    }


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, _T975[min(len(values) - 1, len(_T975)) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def table(records: list[dict[str, Any]]) -> str:
    """A Markdown table: one row per task, noise level and method."""
    lines = [
        "| task | noise | method | accuracy | Δ acc vs normalized (95% CI) | grad-error ratio "
        "| Δ ratio vs normalized (95% CI) | max \\|w\\| | fallbacks / run |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["task"], r["noise"]) for r in records}, key=lambda key: (TASKS.index(key[0]), key[1]))
    for task, noise in keys:
        cell = [r for r in records if r["task"] == task and r["noise"] == noise]
        reference = {r["seed"]: r for r in cell if r["method"] == REFERENCE}
        for method in CANDIDATES:
            runs = [r for r in cell if r["method"] == method]
            if not runs:
                continue
            acc = statistics.fmean(r["acc"] for r in runs)
            ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
            paired = [(r, reference[r["seed"]]) for r in runs if r["seed"] in reference]
            dacc = _interval([100 * (r["acc"] - ref["acc"]) for r, ref in paired], method)
            dratio = _interval([r["ratio"] - ref["ratio"] for r, ref in paired if r["ratio"] is not None], method)
            weights = [r["max_abs_weight"] for r in runs if r["max_abs_weight"] is not None]
            fallbacks = [r["fallbacks"] for r in runs if r["fallbacks"] is not None]
            lines.append(
                f"| {task} | {noise:g} | {method} | {100 * acc:.1f} | {dacc} | "
                f"{statistics.fmean(ratios):.3f} | {dratio} | "
                f"{_fmt(max(weights) if weights else None)} | "
                f"{_fmt(statistics.fmean(fallbacks) if fallbacks else None)} |"
            )
    return "\n".join(lines)


def _interval(values: list[float], method: str) -> str:
    if method == REFERENCE or not values:
        return "—"
    mean, half = t_interval(values)
    return f"{mean:+.2f} ± {half:.2f}" if abs(mean) < 100 else f"{mean:+.3g} ± {half:.3g}"


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3g}" if value < 1e4 else f"{value:.1e}"


def main(argv: list[str] | None = None) -> None:
    """Run the missing fits, then print the table."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.2])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=Path("omp_weights.jsonl"))
    parser.add_argument("--table", action="store_true", help="only print the table of the fits done")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    done: list[dict[str, Any]] = []
    if args.output.is_file():
        done = [json.loads(line) for line in args.output.read_text().splitlines() if line.strip()]
    if not args.table:
        seen = {(r["task"], r["method"], r["noise"], r["seed"]) for r in done}
        for seed in args.seeds:
            for task in args.tasks:
                for noise in args.noise:
                    for method in args.methods:
                        if (task, method, noise, seed) in seen:
                            continue
                        record = fit(task, method, noise, seed)
                        done.append(record)
                        with args.output.open("a") as handle:
                            handle.write(json.dumps(record) + "\n")
                        print(json.dumps(record), flush=True)
    print(table(done))


if __name__ == "__main__":
    main()
